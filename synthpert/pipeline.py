"""`synthpert run CONFIG.yaml`: data -> generate -> judge -> train -> (rl) -> eval in one run directory.

``runs/NAME/`` holds one folder per stage and ``manifest.json``. A stage is skipped when its record
(``<stage>/stage.json``) says it completed with the same inputs (its config section plus the output
hashes of the stages it reads); otherwise it runs and resumes its own partial work — cached API
responses (generate, judge), checkpoints (train), appended predictions (eval). ``--from STAGE`` reruns
a stage and everything after it; ``--force STAGE`` reruns just that stage (later stages then rerun only
if its outputs changed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from .config import validate_config
from .config.data import DataConfig, SubsampleConfig
from .config.run import RunConfig
from .errors import SynthpertError
from .runs import Manifest, StageRecord, Timer, hash_json, hash_paths, student_weight_files, write_json_atomic
from .schema import jsonable

STAGES = ("data", "base_model", "generate", "judge", "train", "rl", "eval")
TINY = "tiny"  # train.base_model value: build the offline tiny model inside the run
# SynthPert sent 15% of the training triples to the teacher and about 2% of the training data survived
# the judge: about 2 traces in 15 were kept. Shown beside the dry run's upper bound, as an expectation.
PUBLISHED_KEEP_RATE = 2 / 15


class Pipeline:
    """One run directory's stages; ``log`` receives one line per stage event (the CLI prints them)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, log: Callable[[str], None] = lambda line: None):
        self.cfg = cfg
        self.dir = run_dir
        self.log = log  # the run folder is created by the first stage that runs, not by a run refused up front
        self.manifest = Manifest(run_dir, cfg.model_dump(mode="json"), cfg.seed)
        self.outputs: dict[str, str] = {}  # stage -> outputs hash

    # -- paths ------------------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    @property
    def train_data(self) -> Path:
        return self.stage_dir("data") / "train"

    def eval_data(self, name: str) -> Path:
        return self.stage_dir("data") / "eval" / name

    @property
    def base_model(self) -> str:
        b = self.cfg.train.base_model
        return str(self.stage_dir("base_model")) if b == TINY else b

    # -- stage mechanics --------------------------------------------------------------------------------
    def _run_stage(self, name: str, config: dict, upstream: list[str], fn: Callable[[Path, bool], dict],
                   outputs: Callable[[Path], list[Path]], force: bool) -> dict:
        folder = self.stage_dir(name)
        inputs_hash = hash_json({"config": config, "upstream": {u: self.outputs[u] for u in upstream}})
        record = StageRecord.load(folder)
        if record and record.inputs_hash == inputs_hash and not force:
            paths = outputs(folder)
            if all(p.exists() for p in paths) and hash_paths(paths) == record.outputs_hash:
                self.outputs[name] = record.outputs_hash
                self.manifest.record_stage(name, record, skipped=True)
                self.log(f"[{name}] up to date, skipped ({record.seconds:.1f} s when it ran)")
                return record.summary
        folder.mkdir(parents=True, exist_ok=True)
        pending = folder / "stage.pending.json"
        resume = pending.exists() and json.loads(pending.read_text()).get("inputs_hash") == inputs_hash and not force
        (folder / "stage.json").unlink(missing_ok=True)
        write_json_atomic(pending, {"inputs_hash": inputs_hash})
        self.log(f"[{name}] {'resuming' if resume else 'running'} …")
        with Timer() as t:
            summary = fn(folder, resume)
        if isinstance(summary, dict) and summary.get("complete") is False:
            stopped = summary.get("engine", {}).get("stopped") or "some requests failed"
            raise SynthpertError(f"stage {name} did not finish ({stopped}); everything received is cached — rerun "
                                 "the same command to continue")
        paths = outputs(folder)
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise SynthpertError(f"stage {name} finished without writing {missing}")
        record = StageRecord(name, inputs_hash, hash_paths(paths), round(t.seconds, 2), jsonable(summary),
                             time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        record.save(folder)
        pending.unlink(missing_ok=True)
        self.outputs[name] = record.outputs_hash
        self.manifest.record_stage(name, record, skipped=False)
        self.log(f"[{name}] done in {t.seconds:.1f} s")
        return summary

    # -- stages -----------------------------------------------------------------------------------------
    def _data(self, folder: Path, resume: bool) -> dict:
        from .dataset import load_lines
        from .data import build

        _, summary = build(self.cfg.data, folder / "train", load_lines(self.cfg.data))
        return summary

    def _base_model(self, folder: Path, resume: bool) -> dict:
        from .dataset import source_for_lines
        from .tiny import build_tiny_model

        # the tiny model's vocabulary reads PerturbQA's gene names when they are at hand, else a built-in list
        d = self.cfg.data
        source = source_for_lines(d, [*d.train_cells, *d.test_cells])
        build_tiny_model(folder, source=source or "", seed=self.cfg.seed,
                         **self.cfg.tiny_model.model_dump())
        return {"base_model": "tiny", "path": str(folder)}

    # generate and judge always resume: their response cache is content-addressed, so a changed setting
    # sends only the requests it changed and nothing already paid for is bought again.
    def _generate(self, folder: Path, resume: bool) -> dict:
        from .generate import run_generate

        return run_generate(self.cfg.teacher, self.train_data, folder)

    def _judge(self, folder: Path, resume: bool) -> dict:
        from .judge import run_judge

        return run_judge(self.cfg.judge, self.stage_dir("generate") / "traces.jsonl", folder)

    def _train(self, folder: Path, resume: bool) -> dict:
        from .train import run_train

        has_checkpoint = any((folder / "checkpoints").glob("checkpoint-*"))
        if not (resume and has_checkpoint):
            _clear(folder, keep={"stage.pending.json"})  # stale run of other inputs: start afresh
        tcfg = self.cfg.train.model_copy(update={"base_model": self.base_model, "dataset_dir": str(self.train_data),
                                                 "resume": resume and has_checkpoint})
        if tcfg.mode == "label_only":
            source = self.train_data
        else:
            source = self.stage_dir("judge") / "kept.jsonl"
            self._check_kept()
        return run_train(tcfg, source, folder)

    def _check_kept(self) -> None:
        """A judge that kept nothing stops the run with what it rejected and why, not with an empty-file error."""
        summary = json.loads((self.stage_dir("judge") / "summary.json").read_text())
        if summary.get("kept", 1) > 0:
            return
        reasons = ", ".join(f"{k} {v}" for k, v in (summary.get("rejection_reasons") or {}).items()) or "none given"
        rejected = self.stage_dir("judge") / "rejected.jsonl"
        raise SynthpertError(f"the judge kept none of the {summary.get('traces', 0)} traces (rejected: {reasons}); "
                             f"nothing to train on. Their texts and reasons: {rejected}. "
                             "More samples per triple (teacher.samples), a stronger teacher or a lower "
                             "judge.threshold keep more")

    def _rl(self, folder: Path, resume: bool) -> dict:
        from .rl import run_rl

        has_checkpoint = any((folder / "checkpoints").glob("checkpoint-*"))
        if not (resume and has_checkpoint):
            _clear(folder, keep={"stage.pending.json"})
        rcfg = self.cfg.rl.model_copy(update={
            "adapter": str(self.stage_dir("train")), "dataset_dir": str(self.train_data),
            "base_model": None, "resume": resume and has_checkpoint})
        return run_rl(rcfg, folder)

    def _eval(self, folder: Path, resume: bool) -> dict:
        """Each eval set is built with the run's training lines, then scored (predictions resume)."""
        from .backends import make_backend
        from .dataset import load_lines
        from .data import build
        from .evaluate import fit_decision, run_eval

        out = {}
        sft = str(self.stage_dir("train"))
        adapter = str(self.stage_dir("rl")) if self.cfg.rl is not None else sft
        backends: dict = {}  # one loaded model per adapter for every eval set (an 8B load takes minutes)
        try:
            for name in self.cfg.eval_sets:
                dcfg = self.eval_data_config(name)
                data_dir = folder / name / "data"
                if not (resume and (data_dir / "data_config.json").exists()):
                    build(dcfg, data_dir, load_lines(dcfg))
                runs = [(name, self.cfg.eval, adapter)]
                if adapter != sft:  # SFT and SFT+RL side by side, on the same pairs
                    runs.append((f"{name}_sft", self.cfg.eval.model_copy(update={"name": "SFT (before RL)"}), sft))
                if self.cfg.zero_shot:
                    runs.append((f"{name}_zero_shot",
                                 self.cfg.eval.model_copy(update={"name": "base model (zero-shot)"}), None))
                for label, ecfg, adp in runs:
                    inference = ecfg.inference.model_copy(update={"model": self.base_model, "adapter": adp})
                    ecfg = ecfg.model_copy(update={"inference": inference})
                    if adp not in backends:  # eval.engine ray: the actors load the model, this process none
                        backends[adp] = make_backend(inference) if ecfg.engine == "local" else None
                        if adp and ecfg.decision == "tuned":  # fitted on the run's validation rows, never test
                            self.log(f"[eval] fitting the tuned decision rule on {ecfg.decision_fit_n} validation rows")
                            # one fit per adapter: each is bound to its adapter's hash (SFT and RL differ)
                            key = "decision_fit" if adp == adapter else f"decision_fit_{Path(adp).name}"
                            fit = fit_decision(ecfg.model_copy(update={"dataset": str(self.train_data),
                                                                       "split": "validation",
                                                                       "n": ecfg.decision_fit_n}),
                                               folder / key, backend=backends[adp])
                            out[key] = fit
                    out[label] = run_eval(ecfg, data_dir, folder / label / "result", backend=backends[adp],
                                          overwrite=not resume)
        finally:
            for b in backends.values():
                if b is not None:
                    b.close()
        unfinished = [k for k, v in out.items() if not v.get("complete", True)]
        if unfinished:
            raise SynthpertError(f"evaluation of {unfinished} stopped early; rerun to continue (finished "
                                 "predictions are kept)")
        return out

    def eval_data_config(self, name: str) -> DataConfig:
        """The data settings of one eval set: the run's training lines, the set's test lines and sample."""
        es = self.cfg.eval_sets[name]
        dcfg = self.cfg.data.model_copy(update={"test_cells": es.test_cells, "protocol": es.protocol,
                                                "train_subsample": None, "val_subsample": None,
                                                "test_subsample": SubsampleConfig(n=es.n, genes=es.genes, seed=es.seed)
                                                if es.n or es.genes else None})
        return validate_config(DataConfig, dcfg.model_dump(), origin=f"eval_sets.{name}")

    # -- before anything runs ---------------------------------------------------------------------------
    def _will_run(self, stage: str, stages: list[str], forced: set[str]) -> bool:
        return stage in stages and (stage in forced or StageRecord.load(self.stage_dir(stage)) is None)

    def preflight(self, stages: list[str], forced: set[str]) -> list[tuple[str, str]]:
        """(stage, problem) for everything that would stop a stage that is going to run, found before any
        stage runs: a missing API key, QLoRA without CUDA, the vLLM backend without vLLM."""
        problems = []
        cfg = self.cfg
        clients = []
        if not cfg.teacher.offline:
            clients.append(("generate", "teacher", cfg.teacher.api_key_env))
        if cfg.judge.kind == "llm":
            clients.append(("judge", "judge", cfg.judge.api_key_env))
        missing: dict[str, list[tuple[str, str]]] = {}  # env var -> [(stage, section)]
        for stage, section, env in clients:
            if env and self._will_run(stage, stages, forced) and not os.environ.get(env):
                missing.setdefault(env, []).append((stage, section))
        for env, users in missing.items():
            who = " and the ".join(sec for _, sec in users)
            needs = "needs" if len(users) == 1 else "need"
            problems.append((users[0][0], f"environment variable {env} is not set (the {who} {needs} "
                             f"an API key): export {env}=..., or set {users[0][1]}.api_key_env to the variable "
                             "that holds your key (null for a server without authentication)"))
        inf = cfg.eval.inference
        if self._will_run("eval", stages, forced):
            if inf.backend == "openai" and inf.api_key_env and not os.environ.get(inf.api_key_env):
                problems.append(("eval", f"eval.inference: environment variable {inf.api_key_env} is not set"))
            if inf.backend == "vllm" and importlib.util.find_spec("vllm") is None:
                from .backends.vllm import VLLM_MISSING

                problems.append(("eval", f"eval.inference.backend=vllm: {VLLM_MISSING}"))
        if cfg.rl is not None and cfg.rl.use_vllm and self._will_run("rl", stages, forced) and not _cuda():
            problems.append(("rl", "rl.use_vllm=true needs a CUDA GPU (and vllm); set rl.use_vllm=false to generate "
                             "rollouts with transformers, or run the rl stage on a GPU machine (--until train here)"))
        if cfg.train.base_model != TINY and (self._will_run("train", stages, forced)
                                             or self._will_run("eval", stages, forced)):
            from .model_check import base_model_problem

            problem = base_model_problem(cfg.train.base_model, cfg.train.revision)
            if problem:
                problems.append(("train", f"train.base_model: {problem}"))
        if cfg.train.quantization == "4bit" and self._will_run("train", stages, forced) and not _cuda():
            problems.append(("train", "train.quantization=4bit (QLoRA) needs a CUDA GPU and bitsandbytes, and "
                             "this machine has no CUDA device; set train.quantization=none to train in full "
                             "precision, or run the training stage on a GPU machine (--until judge here)"))
        return problems

    def stage_names(self, until: str | None = None) -> list[str]:
        names = [s for s in STAGES if (s != "base_model" or self.cfg.train.base_model == TINY)
                 and (s != "rl" or self.cfg.rl is not None)]
        if self.cfg.train.mode == "label_only":
            names = [s for s in names if s not in ("generate", "judge")]
        if until:
            names = names[:names.index(until) + 1] if until in names else names
        return names

    def dry_run(self, until: str | None = None) -> dict:
        """Build the data (free), then say per stage what a real run would do: requests and cost at the
        configured prices, training examples and steps, evaluation pairs. Sends nothing, loads no model."""
        from .dataset import load_examples, load_lines
        from .data import build_frames
        from .generate import run_generate
        from .judge import estimate_judge

        cfg = self.cfg
        names = self.stage_names(until)
        plan: dict[str, dict] = {}
        plan["data"] = self.run(until="data")["data"]
        train_n = plan["data"]["splits"]["train"]["n"]
        traces = None
        if "generate" in names:
            plan["generate"] = run_generate(cfg.teacher, self.train_data, self.stage_dir("generate"), dry_run=True)
            traces = plan["generate"]["examples"] * cfg.teacher.samples
        if "judge" in names:
            examples = load_examples(self.train_data, cfg.teacher.split, cfg.teacher.subsample, cfg.teacher.seed)
            plan["judge"] = estimate_judge(cfg.judge, examples, cfg.teacher.samples,
                                           cfg.teacher.completion_tokens_estimate, self.stage_dir("judge"))
        if "train" in names:
            t, o = cfg.train, cfg.train.optim
            upper = train_n if t.mode == "label_only" else traces
            n = round(upper * (1 - t.eval_fraction)) if t.mode != "label_only" else upper
            per_epoch = -(-n // (o.batch_size * o.grad_accum)) if n else 0
            plan["train"] = {"base_model": self.base_model, "mode": t.mode, "max_examples": upper,
                             "examples_bound": "exact" if t.mode == "label_only" else
                             "upper bound: every trace kept (the judge decides)",
                             "steps_per_epoch_max": per_epoch, "epochs": o.epochs,
                             "published_keep_rate": PUBLISHED_KEEP_RATE
                             if t.mode == "reasoning" and cfg.judge.kind == "llm" else None,
                             "optimizer_steps_max": o.max_steps or int(per_epoch * o.epochs),
                             "quantization": t.quantization, "precision": t.precision, "lora_r": t.lora.r,
                             "max_length": t.max_length, "cuda_available": _cuda()}
        if "rl" in names:
            r = cfg.rl
            plan["rl"] = {"num_generations": r.num_generations, "max_steps": r.max_steps, "epochs": r.epochs,
                          "max_prompts": r.max_prompts, "max_completion_length": r.max_completion_length,
                          "completions_per_step": r.generation_batch_size or r.batch_size * r.grad_accum,
                          "use_vllm": r.use_vllm, "cuda_available": _cuda()}
        if "eval" in names:
            sets = {}
            for name in cfg.eval_sets:
                dcfg = self.eval_data_config(name)
                test = build_frames(dcfg, load_lines(dcfg))["test"]
                sets[name] = {"test_cells": dcfg.test_cells, "pairs": len(test),
                              "by_class": test["label"].value_counts().to_dict()}
            inf = cfg.eval.inference
            plan["eval"] = {"backend": inf.backend, "max_new_tokens": inf.max_new_tokens,
                            "models": 2 if cfg.zero_shot else 1, "sets": sets,
                            "max_generated_tokens": sum(v["pairs"] for v in sets.values()) * inf.max_new_tokens
                            * inf.n_samples * (2 if cfg.zero_shot else 1)}
        plan["problems"] = [f"[{s}] {p}" for s, p in self.preflight(names, set(STAGES))]
        return plan

    # -- driver -----------------------------------------------------------------------------------------
    def run(self, from_stage: str | None = None, force: list[str] | None = None,
            until: str | None = None) -> dict:
        for s in [from_stage, until, *(force or [])]:
            if s is not None and s not in STAGES:
                raise SynthpertError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
        cfg = self.cfg
        if cfg.train.evidence and not cfg.data.disjoint_evidence:
            self.log("warning: train.evidence is on but data.disjoint_evidence is off: examples of one gene from "
                     "different perturbation folds see counts that differ by their own labels (docs/configuration.md)")
        from .model_check import learning_rate_note

        note = learning_rate_note(cfg.train.base_model, cfg.train.base_model == TINY, cfg.train.optim.lr)
        if note and "train" in self.stage_names(until):
            self.log(f"warning: {note}")
        forced = set(force or [])
        if from_stage:
            forced |= set(STAGES[STAGES.index(from_stage):])
        plan = [
            ("data", {"data": cfg.data.model_dump(mode="json"), "csv": self._csv_fingerprint(
                set(cfg.data.train_cells) | set(cfg.data.test_cells))}, [], self._data,
             lambda d: [d / "train"]),
            ("base_model", {"tiny_model": cfg.tiny_model.model_dump(exclude_defaults=True), "seed": cfg.seed},
             ["data"], self._base_model,
             lambda d: [d / "config.json", d / "tokenizer.json"]),
            ("generate", cfg.teacher.model_dump(mode="json"), ["data"], self._generate,
             lambda d: [d / "traces.jsonl"]),
            ("judge", cfg.judge.model_dump(mode="json"), ["generate"], self._judge,
             lambda d: [d / "kept.jsonl"]),
            ("train", cfg.train.model_dump(mode="json"),
             ["data", "judge"] + (["base_model"] if cfg.train.base_model == TINY else []), self._train,
             student_weight_files),  # the adapter, or a full fine-tune's model
            ("rl", cfg.rl.model_dump(mode="json") if cfg.rl is not None else None, ["data", "train"], self._rl,
             student_weight_files),
            ("eval", {"eval": cfg.eval.model_dump(mode="json"), "zero_shot": cfg.zero_shot,
                      "eval_sets": {k: v.model_dump() for k, v in cfg.eval_sets.items()},
                      "csv": self._csv_fingerprint({c for es in cfg.eval_sets.values() for c in es.test_cells})},
             ["data", "train", "rl"], self._eval,
             lambda d: [d / name / "result" / "metrics.json" for name in cfg.eval_sets]),
        ]
        names = self.stage_names()  # label_only: the ablation trains on the dataset, no teacher or judge
        plan = [(n, c, [u for u in up if u in names], f, o) for n, c, up, f, o in plan if n in names]
        stages = self.stage_names(until)
        problems = self.preflight(stages, forced)
        if problems:  # before the data stage: nothing is built or paid for a run that cannot finish
            raise SynthpertError("; ".join(p for _, p in problems))
        summaries = {}
        for name, config, upstream, fn, outputs in plan:
            summaries[name] = self._run_stage(name, config, upstream, fn, outputs, name in forced)
            if until == name:
                break
        self.manifest.data["counts"] = _counts(summaries)
        self.manifest.save()
        return summaries

    def _csv_fingerprint(self, names: set[str]) -> dict:
        """Size and mtime of the CSVs a stage reads (cheap; a changed file reruns the stage)."""
        from .dataset import line_csvs, source_for_lines

        src = source_for_lines(self.cfg.data, names)
        out = {}
        for c in sorted(names):
            for f in line_csvs(self.cfg.data, c, src):
                out[f.name] = [f.stat().st_size, int(f.stat().st_mtime)] if f.exists() else None
        return out


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _clear(folder: Path, keep: set[str]) -> None:
    import shutil

    for p in folder.iterdir():
        if p.name in keep:
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _counts(summaries: dict) -> dict:
    g, j, t = summaries.get("generate", {}), summaries.get("judge", {}), summaries.get("train", {})
    return {"traces_generated": g.get("traces"), "traces_kept": j.get("kept"),
            "examples_trained": t.get("n_train"),
            "evaluated": {k: v.get("n") for k, v in summaries.get("eval", {}).items() if isinstance(v, dict)}}


def run_pipeline(cfg: RunConfig, runs_dir: Path, from_stage: str | None = None, force: list[str] | None = None,
                 until: str | None = None, log: Callable[[str], None] = lambda line: None) -> tuple[Pipeline, dict]:
    """Run (or resume) the pipeline in ``runs_dir/cfg.name``; returns the pipeline and the stages' summaries."""
    pipe = Pipeline(cfg, Path(runs_dir) / cfg.name, log=log)
    return pipe, pipe.run(from_stage, force, until)
