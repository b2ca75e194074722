"""`synthpert run CONFIG.yaml`: data -> generate -> judge -> train -> eval in one run directory.

``runs/NAME/`` holds one folder per stage and ``manifest.json``. A stage is skipped when its record
(``<stage>/stage.json``) says it completed with the same inputs (its config section plus the output
hashes of the stages it reads); otherwise it runs and resumes its own partial work — cached API
responses (generate, judge), checkpoints (train), appended predictions (eval). ``--from STAGE`` reruns
a stage and everything after it; ``--force STAGE`` reruns just that stage (later stages then rerun only
if its outputs changed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field, model_validator

from .config import DataConfig, StrictModel, SubsampleConfig, deep_merge, parse_overrides, read_yaml, validate_config
from .errors import SynthpertError
from .evaluate import EvalConfig
from .generate import TeacherConfig
from .judge import JudgeConfig
from .runs import Manifest, StageRecord, Timer, hash_json, hash_paths, write_json_atomic
from .train import TrainConfig

STAGES = ("data", "base_model", "generate", "judge", "train", "eval")
TINY = "tiny"  # train.base_model value: build the offline tiny model inside the run


class EvalSet(StrictModel):
    """One evaluation: a test line (or lines) scored by the trained model, beside the baselines."""

    test_cells: list[str] = Field(..., description="lines whose test split is scored")
    genes: int | None = Field(None, ge=1, description="keep every test pair of this many random readout genes "
                              "(seeded), so PerturbQA's per-gene AUROC is measurable on a sample")
    n: int | None = Field(None, ge=1, description="seeded subsample of that test split (all when unset)")
    protocol: str = Field("split", description="'split' or 'published' (unseen lines only)")


class RunConfig(StrictModel):
    name: str = Field(..., description="run name: the folder runs/NAME (a rerun finds it again)")
    seed: int = Field(0, description="seed for every stage that has none of its own set")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    eval_sets: dict[str, EvalSet] = Field(
        default_factory=lambda: {"test": EvalSet(test_cells=["k562"])},
        description="name -> test lines; each is built with data.train_cells as the training lines")
    zero_shot: bool = Field(False, description="also evaluate the base model without the adapter")
    tiny_model: dict = Field(default_factory=dict, description="options of the offline tiny model (base_model: tiny)")

    @model_validator(mode="after")
    def _checks(self):
        if not self.eval_sets:
            raise ValueError("eval_sets is empty: name at least one test set")
        if not self.train.base_model:
            raise ValueError("train.base_model is not set (a hub id, a local folder, or 'tiny')")
        return self


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, dict]:
    raw = deep_merge(read_yaml(path), parse_overrides(overrides))
    cfg = validate_config(RunConfig, raw, origin=str(path))
    return cfg, raw


# ---------------------------------------------------------------------------------------------------------


class Pipeline:
    def __init__(self, cfg: RunConfig, run_dir: Path, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.dir = run_dir
        self.log = log
        self.dir.mkdir(parents=True, exist_ok=True)
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
        record = StageRecord(name, inputs_hash, hash_paths(paths), round(t.seconds, 2), _jsonable(summary),
                             time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        record.save(folder)
        pending.unlink(missing_ok=True)
        self.outputs[name] = record.outputs_hash
        self.manifest.record_stage(name, record, skipped=False)
        self.log(f"[{name}] done in {t.seconds:.1f} s")
        return summary

    # -- stages -----------------------------------------------------------------------------------------
    def _data(self, folder: Path, resume: bool) -> dict:
        from .data import build, load_lines

        _, summary = build(self.cfg.data, folder / "train", load_lines(self.cfg.data))
        return summary

    def _base_model(self, folder: Path, resume: bool) -> dict:
        from .tiny import build_tiny_model

        from .data import resolve_source

        build_tiny_model(folder, source=resolve_source(self.cfg.data.source), seed=self.cfg.seed,
                         **self.cfg.tiny_model)
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
        return run_train(tcfg, source, folder)

    def _eval(self, folder: Path, resume: bool) -> dict:
        """Each eval set is built with the run's training lines, then scored (predictions resume)."""
        from .data import build, load_lines
        from .evaluate import run_eval

        out = {}
        adapter = str(self.stage_dir("train"))
        for name, es in self.cfg.eval_sets.items():
            dcfg = self.cfg.data.model_copy(update={"test_cells": es.test_cells, "protocol": es.protocol,
                                                    "train_subsample": None, "val_subsample": None,
                                                    "test_subsample": SubsampleConfig(n=es.n, genes=es.genes)
                                                    if es.n or es.genes else None})
            dcfg = validate_config(DataConfig, dcfg.model_dump(), origin=f"eval_sets.{name}")
            data_dir = folder / name / "data"
            if not (resume and (data_dir / "data_config.json").exists()):
                build(dcfg, data_dir, load_lines(dcfg))
            runs = [(name, self.cfg.eval, adapter)]
            if self.cfg.zero_shot:
                runs.append((f"{name}_zero_shot", self.cfg.eval.model_copy(update={"name": "base model (zero-shot)"}),
                             None))
            for label, ecfg, adp in runs:
                out[label] = run_eval(ecfg, data_dir, folder / label / "result", model=self.base_model,
                                      adapter=adp, overwrite=not resume)
        unfinished = [k for k, v in out.items() if not v.get("complete", True)]
        if unfinished:
            raise SynthpertError(f"evaluation of {unfinished} stopped early; rerun to continue (finished "
                                 "predictions are kept)")
        return out

    # -- driver -----------------------------------------------------------------------------------------
    def run(self, from_stage: str | None = None, force: list[str] | None = None,
            until: str | None = None) -> dict:
        for s in [from_stage, until, *(force or [])]:
            if s is not None and s not in STAGES:
                raise SynthpertError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
        cfg = self.cfg
        forced = set(force or [])
        if from_stage:
            forced |= set(STAGES[STAGES.index(from_stage):])
        plan = [
            ("data", {"data": cfg.data.model_dump(mode="json"), "csv": self._csv_fingerprint(
                set(cfg.data.train_cells) | set(cfg.data.test_cells))}, [], self._data,
             lambda d: [d / "train"]),
            ("base_model", {"tiny_model": cfg.tiny_model, "seed": cfg.seed}, ["data"], self._base_model,
             lambda d: [d / "config.json", d / "tokenizer.json"]),
            ("generate", cfg.teacher.model_dump(mode="json"), ["data"], self._generate,
             lambda d: [d / "traces.jsonl"]),
            ("judge", cfg.judge.model_dump(mode="json"), ["generate"], self._judge,
             lambda d: [d / "kept.jsonl"]),
            ("train", cfg.train.model_dump(mode="json"),
             ["data", "judge"] + (["base_model"] if cfg.train.base_model == TINY else []), self._train,
             lambda d: [d / "adapter_config.json", d / "adapter_model.safetensors"]),
            ("eval", {"eval": cfg.eval.model_dump(mode="json"), "zero_shot": cfg.zero_shot,
                      "eval_sets": {k: v.model_dump() for k, v in cfg.eval_sets.items()},
                      "csv": self._csv_fingerprint({c for es in cfg.eval_sets.values() for c in es.test_cells})},
             ["data", "train"], self._eval,
             lambda d: [d / name / "result" / "metrics.json" for name in cfg.eval_sets]),
        ]
        if cfg.train.base_model != TINY:
            plan = [p for p in plan if p[0] != "base_model"]
        if cfg.train.mode == "label_only":  # the ablation trains on the dataset, no teacher or judge
            plan = [p for p in plan if p[0] not in ("generate", "judge")]
            plan = [(n, c, [u for u in up if u != "judge"], f, o) for n, c, up, f, o in plan]
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
        from .data import resolve_source

        src = resolve_source(self.cfg.data.source)
        out = {}
        for c in sorted(names):
            extra = self.cfg.data.extra_cell_lines.get(c)
            folder = resolve_source(extra.source) if extra and extra.source else src
            for kind in ("de", "dir"):
                f = folder / f"{c}-{kind}.csv"
                out[f.name] = [f.stat().st_size, int(f.stat().st_mtime)] if f.exists() else None
        return out


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


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def run_pipeline(cfg: RunConfig, runs_dir: Path, from_stage: str | None = None, force: list[str] | None = None,
                 until: str | None = None) -> dict:
    """Run (or resume) the pipeline and print where everything is and how the model compares."""
    from rich.console import Console

    console = Console()
    run_dir = Path(runs_dir) / cfg.name
    console.print(f"[bold]synthpert run[/] {cfg.name} → {run_dir}")
    pipe = Pipeline(cfg, run_dir, log=lambda m: console.print(m, markup=False, highlight=False))
    summaries = pipe.run(from_stage, force, until)
    _print_outcome(console, pipe, summaries)
    return summaries


def _print_outcome(console, pipe: Pipeline, summaries: dict) -> None:
    counts = pipe.manifest.data.get("counts", {})
    console.print(f"traces generated: {counts.get('traces_generated')}, kept: {counts.get('traces_kept')}, "
                  f"trained on: {counts.get('examples_trained')}")
    for name in pipe.cfg.eval_sets:
        report = pipe.stage_dir("eval") / name / "result" / "report.md"
        if report.exists():
            console.rule(f"eval: {name}")
            console.print(report.read_text(), markup=False, highlight=False)
    if "train" in summaries:
        console.print("\nServe the trained model locally:")
        evidence = f" --evidence-from {pipe.train_data}" if pipe.cfg.train.evidence else ""
        console.print(f"  synthpert serve --model {pipe.base_model} --adapter {pipe.stage_dir('train')}{evidence}",
                      markup=False, highlight=False, soft_wrap=True)
    console.print(f"manifest: {pipe.manifest.path}")
