"""`synthpert eval`: predictions, metrics beside the baselines, a report and figures, resumable.

Output folder::

    predictions.jsonl   one Prediction per example, appended as each chunk finishes (resume skips them)
    eval_run.json       what produced them (model, adapter, prompt/chat-template hashes, sampling, seed,
                        versions); a rerun with different settings into the same folder is refused
    metrics.json        model (strict and lenient parse) and baselines on the SAME examples, overall and
                        per seen/unseen stratum, bootstrap CIs over perturbations
    report.md           the tables, a plain verdict against the baselines, and the figures
    figures/*.png       confusion matrix, per-class F1 vs baselines, calibration of class probabilities
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .answer import LABELS, LENIENT, SHORT, STRICT
from .backends import Backend, adapter_version, make_backend
from .baselines import baseline_report, score_predictions
from .ceiling import noise_ceilings
from .config.data import SubsampleConfig
from .config.evaluate import EvalConfig, InferenceConfig
from .dataset import built_config, load_examples
from .decision import Decision, decision_for
from .errors import SynthpertError
from .evidence import training_stats
from .inference import Predictor, Triple
from .lookup import LOOKUP_SEED, adapter_lookup, evidence_blocks
from .chat.progress import count_progress
from .prompting import student_prompt_hash
from .report import write_figures, write_report
from .tracking import log_eval_metrics
from .verdict import DECIDED, accuracy_vs_majority, verdict, verdict_row  # noqa: F401 (verdict_row: API)
from .runs import adapter_manifest, check_writable, is_full_model, library_versions, write_json_atomic
from .schema import HARD_LABEL, Prediction, jsonable, read_jsonl

log = logging.getLogger("synthpert.evaluate")

PREDICTIONS = "predictions.jsonl"
RUN_FILE = "eval_run.json"
METRICS = "metrics.json"


# ---------------------------------------------------------------------------------------------------------
# Examples, evidence, manifest


def examples_of(cfg: EvalConfig) -> pd.DataFrame:
    """The examples ``cfg`` scores: its dataset's split, seeded subsample of ``n``."""
    if not cfg.dataset:
        raise SynthpertError("no dataset given: pass --dataset DIR (a folder written by `synthpert data build`)")
    return load_examples(cfg.dataset, cfg.split, SubsampleConfig(n=cfg.n) if cfg.n is not None else None, cfg.seed)


def use_evidence(cfg: EvalConfig) -> bool:
    """Ask the question the way the adapter was trained: with the evidence block iff its manifest says so."""
    if cfg.evidence is not None:
        return cfg.evidence
    return bool(adapter_manifest(cfg.inference.adapter).get("evidence", False))


def use_lookup(cfg: EvalConfig, evidence: bool) -> bool:
    """The evidence block carries the lookup line iff the adapter was trained with it (lookup.py)."""
    return evidence and adapter_lookup(cfg.inference.adapter)


def fingerprint(cfg: EvalConfig, evidence: bool, lookup: bool = False) -> dict:
    """Settings that change predictions: a resumed run must match them exactly."""
    inf = cfg.inference
    return {"dataset": str(Path(cfg.dataset).resolve()), "split": cfg.split, "n": cfg.n, "seed": cfg.seed,
            "evidence": evidence, **({"evidence_lookup": True} if lookup else {}),  # old runs' keys unchanged
            "backend": inf.backend, "model": inf.model, "adapter": inf.adapter,
            "adapter_version": adapter_version(inf.adapter) if inf.adapter else None,
            "merge_adapter": inf.merge_adapter, "base_url": inf.base_url,
            "prompt_sha256": student_prompt_hash(),
            "sampling": {"max_new_tokens": inf.max_new_tokens, "temperature": inf.temperature, "top_p": inf.top_p,
                         "n_samples": inf.n_samples, "seed": inf.seed,
                         "probability_method": inf.probability_method}}


# ---------------------------------------------------------------------------------------------------------
# Resumable predictions


def repair_tail(path: Path) -> int:
    """Make the file end on a whole line before records are appended to it: a last line without its newline
    is kept (the newline added) when it is a whole record, else cut and reported (the process was killed
    mid-write; that example is predicted again). Returns the number of bytes cut."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        data = f.seek(0) or f.read()
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both
            f.truncate(start)
            log.warning("%s: cut a torn last line (%d bytes, the process was killed mid-write); its example is "
                        "predicted again", path, len(data) - start)
            return len(data) - start
        f.write(b"\n")
        return 0


def read_predictions(path: Path) -> dict[str, Prediction]:
    """Finished predictions by id (the first record of an id wins; duplicates are never written)."""
    out: dict[str, Prediction] = {}
    if not path.exists():
        return out
    for rec in read_jsonl(path, Prediction):
        out.setdefault(rec.id, rec)
    return out


def append_predictions(path: Path, records: list[Prediction]) -> None:
    append_lines(path, [r.model_dump_json() for r in records])


def append_lines(path: Path, lines: list[str]) -> None:
    """Whole JSON records, one a line, made durable before the caller counts them as done."""
    with open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def shortest_first(examples: pd.DataFrame, evidence: list[str | None]) -> list[int]:
    """Row order for prediction, shortest prompt first: a batch of similar lengths pads less (local backends
    pad every row to the longest; the evidence block's length varies most). Stable, so a resumed run keeps it."""
    size = [len(e or "") + len(r.perturbation) + len(r.gene) for r, e in zip(examples.itertuples(), evidence)]
    return sorted(range(len(examples)), key=size.__getitem__)


def predict_missing(predictor: Predictor | None, examples: pd.DataFrame, out: Path, evidence_stats, chunk_size: int,
                    progress: bool = True, ray_cfg: EvalConfig | None = None, lookup: bool = False) -> dict:
    """Predict the examples without a record yet, appending each chunk as it finishes: here with
    ``predictor``, or on a Ray actor pool when ``ray_cfg`` is given. Returns the engine's statistics
    (``predicted``: how many were predicted this time)."""
    path = out / PREDICTIONS
    repair_tail(path)
    done = set(read_predictions(path))
    todo = examples[~examples["id"].isin(done)]
    if todo.empty:
        return {"engine": ray_cfg.engine if ray_cfg else "local", "predicted": 0}
    bar, task = count_progress(len(examples), len(examples) - len(todo), "eval") if progress else (None, None)
    evidence = evidence_blocks(evidence_stats, todo, lookup)
    order = shortest_first(todo, evidence)
    todo, evidence = todo.iloc[order], [evidence[i] for i in order]

    written = 0

    def write(lines: list[str], asked: int | None = None) -> None:
        nonlocal written
        append_lines(path, lines)
        written += len(lines)
        if bar is not None:  # a request that failed (openai) is still done for this run
            bar.update(task, advance=len(lines) if asked is None else asked)

    try:
        if bar is not None:
            bar.start()
        if ray_cfg is not None:
            from .evaluate_ray import rows_of, score_on_ray

            return score_on_ray(ray_cfg, rows_of(todo, evidence), ray_cfg.inference, write)
        t0 = time.perf_counter()
        for start in range(0, len(todo), chunk_size):
            part = todo.iloc[start:start + chunk_size]
            triples = [Triple(r.id, r.cell_line, r.perturbation, r.gene, r.label, e)
                       for r, e in zip(part.itertuples(), evidence[start:start + chunk_size])]
            write([p.model_dump_json() for p in predictor.predict(triples)], len(part))
        return {"engine": "local", "predicted": written, "scoring_s": round(time.perf_counter() - t0, 2)}
    finally:
        if bar is not None:
            bar.stop()


# ---------------------------------------------------------------------------------------------------------
# Metrics


SCORED = "scored"  # rows from class probabilities: their argmax (DECIDED: the decision rule's)


def model_metrics(examples: pd.DataFrame, preds: dict[str, Prediction], n_bootstrap: int, seed: int,
                  decision: Decision | None = None) -> dict:
    """Metrics of the model on ``examples`` (which must all have predictions): its generated answer parsed
    strictly and leniently (unparseable answers count as wrong) and, where class probabilities exist, their
    argmax (``scored``: every example gets a label) and the decision rule's label (``decided``)."""
    recs = [preds[i] for i in examples["id"]]
    method = _method(recs)
    out = {}
    probs = None
    if method != HARD_LABEL:
        probs = np.array([r.prob_vector() or [1 / 3] * 3 for r in recs], dtype=float)
    for mode in (STRICT, LENIENT):
        labels = [r.label(mode) for r in recs]
        out[mode] = score_predictions(examples, labels, probs, n_bootstrap=n_bootstrap, seed=seed)
    if probs is not None:
        out[SCORED] = score_predictions(examples, Decision().labels_for(probs), probs, n_bootstrap, seed)
        if decision is not None and decision.rule != "argmax":
            out[DECIDED] = score_predictions(examples, decision.labels_for(probs), decision.adjusted(probs),
                                             n_bootstrap, seed)
    return out


def _method(recs: list[Prediction]) -> str:
    methods = {r.probability_method for r in recs if r.probability_method}
    if not methods:
        return HARD_LABEL
    return sorted(methods)[0] if len(methods) == 1 else "+".join(sorted(methods))


def compute_all_metrics(examples: pd.DataFrame, preds: dict[str, Prediction], stats, train_cells: list[str],
                        n_bootstrap: int, seed: int, decision: Decision | None = None, lookup: bool = False) -> dict:
    scored = examples[examples["id"].isin(preds)].reset_index(drop=True)
    recs = [preds[i] for i in scored["id"]]
    out = {
        "n_examples": len(examples), "n_predicted": len(scored), "complete": len(scored) == len(examples),
        "probability_method": _method(recs) if recs else None,
        "n_pert_seen_in_train_lines": int((scored["pert_seen_in_train_lines"].map(len) > 0).sum()),
        "class_counts": {SHORT[lab]: int((scored["label"] == lab).sum()) for lab in LABELS},
        "model": model_metrics(scored, preds, n_bootstrap, seed, decision) if len(scored) else {},
        "decision": ({**decision.model_dump(mode="json"), "description": decision.describe()}
                     if decision is not None else None),
        # with the lookup, combined is the very fit whose probabilities the prompts stated (its sample's seed
        # moves a K562 pair's probabilities by up to 0.14)
        "baselines": (baseline_report(stats, scored, train_cells, n_bootstrap=n_bootstrap, seed=seed,
                                      combined_seed=LOOKUP_SEED if lookup else None) if len(scored) else {}),
        # the prompt stated combined's probabilities: the verdict asks first whether the model adds to them
        **({"evidence_lookup": True} if lookup else {}),
        "tokens": {"prompt_mean": float(np.mean([r.prompt_tokens for r in recs])) if recs else None,
                   "completion_mean": float(np.mean([r.completion_tokens for r in recs])) if recs else None,
                   "finished_by_length": int(sum(any(s.finish_reason == "length" for s in r.samples) for r in recs))},
    }
    out["verdict"] = verdict(out)
    out["accuracy_vs_majority"] = accuracy_vs_majority(out)
    return jsonable(out)


# ---------------------------------------------------------------------------------------------------------
# Entry point


def run_eval(cfg: EvalConfig, dataset_path: str | Path | None = None, out_dir: str | Path | None = None,
             model: str | None = None, adapter: str | None = None, backend: Backend | None = None,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Evaluate one model (+ adapter) on a built dataset split; returns a summary (metrics.json's headline).

    ``backend``: an already-loaded backend to reuse (its config then describes the model); otherwise one is
    built from ``cfg.inference`` with ``model`` / ``adapter`` overriding it.
    """
    if out_dir is None:
        raise SynthpertError("no output folder given (--out DIR)")
    updates = {k: v for k, v in {"dataset": str(dataset_path) if dataset_path else None}.items() if v}
    cfg = cfg.model_copy(update=updates)
    inf_updates = {k: v for k, v in {"model": model, "adapter": adapter}.items() if v is not None}
    if backend is not None:
        inf = backend.cfg
    else:
        inf = cfg.inference.model_copy(update=inf_updates)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out)  # a read-only or full folder fails now, not after the model has loaded
    if inf.backend == "openai" and not inf.cache_path:
        inf = inf.model_copy(update={"cache_path": str(out / "cache.sqlite")})
    cfg = cfg.model_copy(update={"inference": inf})
    if not inf.model and not is_full_model(inf.adapter):  # a train.method=full folder is the model itself
        raise SynthpertError("no model given: pass --model DIR (or a model name with --backend openai)")

    examples = examples_of(cfg)
    data_cfg = built_config(Path(cfg.dataset))
    evidence = use_evidence(cfg)
    lookup = use_lookup(cfg, evidence)
    fp = fingerprint(cfg, evidence, lookup)
    _check_resume(out, fp, overwrite)

    stats = training_stats(data_cfg)
    decision = decision_for(cfg.decision, inf.adapter, stats)
    on_ray = cfg.engine == "ray" and backend is None
    if on_ray:
        from .evaluate_ray import check_local_paths, ray_backend_info

        check_local_paths(cfg)
    owned = backend is None and not on_ray
    t0 = time.perf_counter()
    if owned:
        backend = make_backend(inf)
    load_s = time.perf_counter() - t0
    try:
        run = {**fp, "backend_info": ray_backend_info(inf) if on_ray else backend.describe(),
               "model_name": cfg.name or _default_name(inf),
               "versions": library_versions(), "data_config": data_cfg.model_dump(mode="json"),
               "n_bootstrap": cfg.n_bootstrap, "config": cfg.model_dump(mode="json")}
        write_json_atomic(out / RUN_FILE, jsonable(run))
        engine = predict_missing(None if on_ray else Predictor(backend), examples, out, stats if evidence else None,
                                 cfg.chunk_size, progress, cfg if on_ray else None, lookup)
        engine_stats = None if on_ray else getattr(backend, "last_stats", None)
        if not on_ray and engine["predicted"]:
            engine["setup_s"] = round(load_s, 2)  # loading the model (Ray's own: starting Ray)
    finally:
        if owned:
            backend.close()

    preds = read_predictions(out / PREDICTIONS)
    metrics = compute_all_metrics(examples, preds, stats, list(data_cfg.train_cells), cfg.n_bootstrap, cfg.seed,
                                  decision, lookup)
    metrics["run"] = jsonable(run)
    ceilings = noise_ceilings(data_cfg)
    if ceilings:
        metrics["noise_ceiling"] = ceilings
    if engine_stats:
        metrics["client"] = engine_stats
    write_json_atomic(out / METRICS, metrics)  # a full disk leaves the old file or none, never half of one
    figures = write_figures(out, metrics, examples, preds, run["model_name"]) if cfg.figures and preds else []
    write_report(out, metrics, run, figures)
    result = summary(metrics, out)
    result["engine"] = engine
    result["tracked"] = log_to_training_trackers(inf.adapter, cfg, metrics)
    return result


def eval_set_name(cfg: EvalConfig) -> str:
    """How an evaluation set is named in a tracker: the built dataset folder and its split (k562-test)."""
    return f"{Path(cfg.dataset).name}-{cfg.split}"


def log_to_training_trackers(adapter: str | None, cfg: EvalConfig, metrics: dict) -> list[str]:
    """The adapter's training run had trackers (manifest ``tracking``): add this set's metrics to that
    same run, at the run's last training step."""
    manifest = adapter_manifest(adapter)
    rec = manifest.get("tracking") or {}
    if not rec.get("report_to"):
        return []
    return log_eval_metrics(rec, eval_set_name(cfg), metrics, int(manifest.get("global_step") or 0))


def _default_name(inf: InferenceConfig) -> str:
    model = Path(inf.model).name if inf.model else "model"
    if is_full_model(inf.adapter):
        return f"{Path(inf.adapter).name} (full fine-tune)"
    if inf.adapter:
        return f"{model} + {Path(inf.adapter).name}"
    return f"{model} (zero-shot)"


def _check_resume(out: Path, fp: dict, overwrite: bool) -> None:
    pred, run = out / PREDICTIONS, out / RUN_FILE
    if overwrite:
        pred.unlink(missing_ok=True)
        return
    if not pred.exists() or not run.exists():
        return
    old = json.loads(run.read_text())
    diffs = [k for k in fp if jsonable(old.get(k)) != jsonable(fp[k])]
    if diffs:
        raise SynthpertError(f"{out} holds predictions made with different settings ({', '.join(diffs)}); "
                             "use another --out folder, or --overwrite to start again")


def summary(metrics: dict, out: Path) -> dict:
    m = (metrics.get("model") or {}).get(STRICT, {}).get("overall", {})
    lm = (metrics.get("model") or {}).get(LENIENT, {}).get("overall", {})
    dm = (metrics.get("model") or {}).get(DECIDED, {}).get("overall", {})
    return {"out": str(out), "n": metrics["n_predicted"], "complete": metrics["complete"],
            "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"),
            "balanced_accuracy": m.get("balanced_accuracy"), "auroc_de_per_gene": m.get("auroc_de_per_gene"),
            "auroc_dir_per_gene": m.get("auroc_dir_per_gene"), "unparseable_rate": m.get("unparseable_rate"),
            "macro_f1_lenient": lm.get("macro_f1"), "unparseable_rate_lenient": lm.get("unparseable_rate"),
            "probability_method": metrics.get("probability_method"),
            "decision": (metrics.get("decision") or {}).get("rule"),
            "macro_f1_decided": dm.get("macro_f1"), "accuracy_decided": dm.get("accuracy"),
            "beats_baselines": {k: v["beats"] for k, v in metrics.get("verdict", {}).items()}}


# ---------------------------------------------------------------------------------------------------------
# Fitting a decision rule on validation rows


def fit_decision(cfg: EvalConfig, out_dir: str | Path, objective: str = "macro_f1", progress: bool = True,
                 backend: Backend | None = None) -> dict:
    """Predict the dataset's VALIDATION split with the adapter, fit tuned log-offsets on it (starting from the
    prior-shift rule), and save ``decision.json`` beside the adapter. Returns the fitted rule and its scores."""
    from .decision import ValidationRows, fit_tuned, objective_value, save_decision

    adapter = backend.cfg.adapter if backend is not None else cfg.inference.adapter
    if not adapter:
        raise SynthpertError("a decision rule is fitted for an adapter: pass --adapter DIR")
    if cfg.split != "validation":
        raise SynthpertError(f"decision rules are fitted on the validation split, not {cfg.split!r}")
    from .dataset import load_built

    if not cfg.dataset or len(load_built(Path(cfg.dataset), "validation")) == 0:
        raise SynthpertError(f"the dataset {cfg.dataset} has no validation rows to fit a decision rule on (built with "
                             "data.val_fraction 0?): rebuild it with val_fraction > 0, or use decision 'prior'")
    vcfg = cfg.model_copy(update={"decision": "argmax", "figures": False, "n_bootstrap": 0})
    run_eval(vcfg, out_dir=out_dir, progress=progress, backend=backend)
    examples = examples_of(vcfg)
    preds = read_predictions(Path(out_dir) / PREDICTIONS)
    recs = [preds[i] for i in examples["id"]]
    if any(r.prob_vector() is None for r in recs):
        raise SynthpertError("fitting a decision rule needs class probabilities (answer_logprob or votes); these "
                             "predictions have hard labels only")
    probs = np.array([r.prob_vector() for r in recs], dtype=float)
    val = ValidationRows.from_rows(probs, examples["label"].tolist(), [cfg.split] * len(examples),
                                   source=f"{cfg.dataset} (validation split)")
    stats = training_stats(built_config(Path(cfg.dataset)))
    start = decision_for("prior" if adapter_manifest(adapter).get("class_shares") else "argmax", adapter, stats)
    tuned = fit_tuned(val, objective, start=start)
    tuned = tuned.model_copy(update={"adapter_hash": adapter_version(adapter),
                                     "fitted_on": {**tuned.fitted_on, "dataset": str(Path(cfg.dataset).resolve()),
                                                   "predictions": str(Path(out_dir).resolve())}})
    path = save_decision(tuned, adapter)
    y = np.array([LABELS.index(lab) for lab in examples["label"]])
    scores = {name: round(objective_value(y, d.apply(probs), objective), 4)
              for name, d in (("argmax", Decision()), (start.rule, start), ("tuned", tuned))}
    return {"decision": str(path), "rule": tuned.describe(), "objective": objective, "n_validation": len(y),
            f"validation_{objective}": scores}
