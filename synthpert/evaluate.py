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
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from .answer import LABELS, LENIENT, SHORT, STRICT
from .config import StrictModel, parse_overrides
from .errors import SynthpertError
from .inference import HARD_LABEL, Backend, InferenceConfig, Prediction, Predictor, Triple, adapter_version
from .runs import library_versions
from .schema import read_jsonl

PREDICTIONS = "predictions.jsonl"
RUN_FILE = "eval_run.json"
METRICS = "metrics.json"
REPORT = "report.md"
HEADLINE_METRICS = ("macro_f1", "balanced_accuracy", "auroc_de_per_gene", "auroc_dir_per_gene")
MIN_AUROC_GENES = 10  # per-gene AUROC enters the verdict only when averaged over at least this many genes


class EvalConfig(StrictModel):
    dataset: str | None = Field(None, description="folder written by `synthpert data build`")
    split: str = Field("test", description="train / validation / test")
    n: int | None = Field(None, ge=1, description="seeded subsample of the split (all when unset)")
    seed: int = Field(0, description="seed of the subsample and the bootstrap")
    evidence: bool | None = Field(None, description="evidence context in the prompt; unset = as the adapter "
                                  "was trained (its manifest), else off")
    n_bootstrap: int = Field(200, ge=0, description="bootstrap resamples of perturbations for CIs")
    chunk_size: int = Field(64, ge=1, description="examples per write to predictions.jsonl")
    figures: bool = True
    name: str | None = Field(None, description="display name of the model in the report")
    inference: InferenceConfig = Field(default_factory=InferenceConfig)


def load_eval_config(path: str | Path | None, overrides: list[str] | None = None, **flags) -> EvalConfig:
    """YAML (its `eval:` section or the whole file) + CLI flags + key=value overrides."""
    from .config import load_section

    return load_section(EvalConfig, "eval", path, overrides, parse_overrides(
        [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]))


# ---------------------------------------------------------------------------------------------------------
# Examples, evidence, manifest


def load_examples(cfg: EvalConfig) -> pd.DataFrame:
    from .config import SubsampleConfig
    from .data import load_built, subsample

    if not cfg.dataset:
        raise SynthpertError("no dataset given: pass --dataset DIR (a folder written by `synthpert data build`)")
    df = load_built(Path(cfg.dataset), cfg.split).to_pandas()
    if cfg.n is not None:
        df = subsample(df, SubsampleConfig(n=cfg.n), cfg.seed)
    if df.empty:
        raise SynthpertError(f"split {cfg.split!r} of {cfg.dataset} has no examples")
    df["pert_seen_in_train_lines"] = df["pert_seen_in_train_lines"].map(list)
    df["pair_seen_in_train_lines"] = df["pair_seen_in_train_lines"].map(list)
    return df.reset_index(drop=True)


def adapter_manifest(adapter: str | Path | None) -> dict:
    """The manifest `synthpert train` writes beside the adapter; {} for adapters trained elsewhere."""
    from .train import MANIFEST

    if not adapter:
        return {}
    path = Path(adapter) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SynthpertError(f"{path} is not valid JSON ({e.msg}); it should be the manifest `synthpert train` "
                             "wrote") from None


def use_evidence(cfg: EvalConfig) -> bool:
    """Ask the question the way the adapter was trained: with the evidence block iff its manifest says so."""
    if cfg.evidence is not None:
        return cfg.evidence
    return bool(adapter_manifest(cfg.inference.adapter).get("evidence", False))


def fingerprint(cfg: EvalConfig, evidence: bool) -> dict:
    """Settings that change predictions: a resumed run must match them exactly."""
    from .prompting import student_prompt_hash

    inf = cfg.inference
    return {"dataset": str(Path(cfg.dataset).resolve()), "split": cfg.split, "n": cfg.n, "seed": cfg.seed,
            "evidence": evidence, "backend": inf.backend, "model": inf.model, "adapter": inf.adapter,
            "adapter_version": adapter_version(inf.adapter) if inf.adapter else None,
            "merge_adapter": inf.merge_adapter, "base_url": inf.base_url,
            "prompt_sha256": student_prompt_hash(),
            "sampling": {"max_new_tokens": inf.max_new_tokens, "temperature": inf.temperature, "top_p": inf.top_p,
                         "n_samples": inf.n_samples, "seed": inf.seed,
                         "probability_method": inf.probability_method}}


# ---------------------------------------------------------------------------------------------------------
# Resumable predictions


def repair_tail(path: Path) -> None:
    """Drop a torn last line (process killed mid-write) so appended records start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        f.truncate(data.rfind(b"\n") + 1)


def read_predictions(path: Path) -> dict[str, Prediction]:
    """Finished predictions by id (the first record of an id wins; duplicates are never written)."""
    out: dict[str, Prediction] = {}
    if not path.exists():
        return out
    for rec in read_jsonl(path, Prediction):
        out.setdefault(rec.id, rec)
    return out


def append_predictions(path: Path, records: list[Prediction]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(r.model_dump_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def _progress(total: int, done: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   transient=False)
    task = bar.add_task(label, total=total, completed=done)
    return bar, task


def predict_missing(predictor: Predictor, examples: pd.DataFrame, out: Path, evidence_stats, chunk_size: int,
                    progress: bool = True) -> int:
    """Predict the examples without a record yet, appending each chunk as it finishes. Returns how many."""
    from .evidence import evidence_text

    path = out / PREDICTIONS
    repair_tail(path)
    done = set(read_predictions(path))
    todo = examples[~examples["id"].isin(done)]
    if todo.empty:
        return 0
    bar, task = _progress(len(examples), len(examples) - len(todo), "eval") if progress else (None, None)
    written = 0
    try:
        if bar is not None:
            bar.start()
        for start in range(0, len(todo), chunk_size):
            part = todo.iloc[start:start + chunk_size]
            triples = [Triple(r.id, r.cell_line, r.perturbation, r.gene, r.label,
                              evidence_text(evidence_stats, r.cell_line, r.perturbation, r.gene)
                              if evidence_stats is not None else None)
                       for r in part.itertuples()]
            records = predictor.predict(triples)
            append_predictions(path, records)
            written += len(records)
            if bar is not None:
                bar.update(task, advance=len(part))
    finally:
        if bar is not None:
            bar.stop()
    return written


# ---------------------------------------------------------------------------------------------------------
# Metrics


def jsonable(obj):
    """Plain JSON: numpy scalars to Python, NaN/inf to null (metrics.json must load anywhere)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def model_metrics(examples: pd.DataFrame, preds: dict[str, Prediction], n_bootstrap: int, seed: int) -> dict:
    """Strict and lenient metrics of the model on ``examples`` (which must all have predictions)."""
    from .baselines import score_predictions

    recs = [preds[i] for i in examples["id"]]
    method = _method(recs)
    out = {}
    for mode in (STRICT, LENIENT):
        labels = [r.label(mode) for r in recs]
        probs = None
        if method != HARD_LABEL:
            probs = np.array([r.prob_vector() or [1 / 3] * 3 for r in recs], dtype=float)
        out[mode] = score_predictions(examples, labels, probs, n_bootstrap=n_bootstrap, seed=seed)
    return out


def _method(recs: list[Prediction]) -> str:
    methods = {r.probability_method for r in recs if r.probability_method}
    if not methods:
        return HARD_LABEL
    return sorted(methods)[0] if len(methods) == 1 else "+".join(sorted(methods))


def compute_all_metrics(examples: pd.DataFrame, preds: dict[str, Prediction], stats, train_cells: list[str],
                        n_bootstrap: int, seed: int) -> dict:
    from .baselines import baseline_report

    scored = examples[examples["id"].isin(preds)].reset_index(drop=True)
    recs = [preds[i] for i in scored["id"]]
    out = {
        "n_examples": len(examples), "n_predicted": len(scored), "complete": len(scored) == len(examples),
        "probability_method": _method(recs) if recs else None,
        "n_pert_seen_in_train_lines": int((scored["pert_seen_in_train_lines"].map(len) > 0).sum()),
        "class_counts": {SHORT[lab]: int((scored["label"] == lab).sum()) for lab in LABELS},
        "model": model_metrics(scored, preds, n_bootstrap, seed) if len(scored) else {},
        "baselines": baseline_report(stats, scored, train_cells, n_bootstrap=n_bootstrap, seed=seed) if len(scored) else {},
        "tokens": {"prompt_mean": float(np.mean([r.prompt_tokens for r in recs])) if recs else None,
                   "completion_mean": float(np.mean([r.completion_tokens for r in recs])) if recs else None,
                   "finished_by_length": int(sum(any(s.finish_reason == "length" for s in r.samples) for r in recs))},
    }
    out["verdict"] = verdict(out)
    return jsonable(out)


def verdict(m: dict) -> dict:
    """Does the model (strict parse) beat the best available baseline, metric by metric?"""
    res = {}
    model = (m.get("model") or {}).get(STRICT, {}).get("overall")
    if not model:
        return res
    for metric in HEADLINE_METRICS:
        best_name, best = None, None
        for name, b in m["baselines"].items():
            v = b.get("overall", {}).get(metric) if "overall" in b else None
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if best is None or v > best:
                best_name, best = name, v
        mv = model.get(metric)
        if mv is None or best is None or (isinstance(mv, float) and math.isnan(mv)):
            continue
        if metric.endswith("_per_gene") and model.get(metric.replace("_per_gene", "_genes"), 0) < MIN_AUROC_GENES:
            continue  # an average over a handful of genes says nothing; the table still shows it with its count
        majority = m["baselines"].get("majority", {}).get("overall", {}).get(metric)
        res[metric] = {"model": mv, "best_baseline": best_name, "baseline": best, "beats": bool(mv > best),
                       "majority": majority, "beats_majority": None if majority is None else bool(mv > majority)}
    return res


# ---------------------------------------------------------------------------------------------------------
# Report and figures


def _fmt(x, ci=None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    s = f"{x:.3f}"
    if ci:
        s += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return s


def _fmt_auc(m: dict, task: str) -> str:
    """Per-gene AUROC with the number of genes it averages (genes with one class in the sample are skipped)."""
    value = m.get(f"auroc_{task}_per_gene")
    genes = m.get(f"auroc_{task}_genes")
    return _fmt(value, (m.get("ci") or {}).get(f"auroc_{task}_per_gene")) + (f" ({genes} genes)" if genes else "")


def _row(name: str, m: dict) -> str:
    ci = m.get("ci") or {}
    pc = m["per_class"]
    cells = [name, str(m["n"]), _fmt(m["accuracy"], ci.get("accuracy")), _fmt(m["macro_f1"], ci.get("macro_f1")),
             _fmt(m["balanced_accuracy"], ci.get("balanced_accuracy")), _fmt(pc["up"]["f1"]), _fmt(pc["down"]["f1"]),
             _fmt(pc["not_de"]["f1"]), _fmt_auc(m, "de"), _fmt_auc(m, "dir"), _fmt(m["unparseable_rate"])]
    return "| " + " | ".join(cells) + " |"


TABLE_HEAD = ("| predictor | n | accuracy | macro-F1 | balanced acc. | F1 up | F1 down | F1 not DE | AUROC DE "
              "(per gene) | AUROC dir (per gene) | unparseable |\n|" + "---|" * 11)


def metrics_table(metrics: dict, model_name: str, stratum: str) -> str | None:
    lines = [TABLE_HEAD]
    for mode in (STRICT, LENIENT):
        m = metrics["model"].get(mode, {}).get(stratum)
        if m:
            lines.append(_row(f"**{model_name}** ({mode} parse)", m))
    for name, b in metrics["baselines"].items():
        if "unavailable" in b:
            lines.append(f"| {name} | — | unavailable: {b['unavailable']} |" + " |" * 8)
        elif stratum in b:
            lines.append(_row(name, b[stratum]))
    return "\n".join(lines) if len(lines) > 1 else None


def write_report(out: Path, metrics: dict, run: dict, figures: list[str]) -> Path:
    name = run["model_name"]
    v = metrics.get("verdict", {})
    lines = [f"# Evaluation: {name}", ""]
    lines.append(f"- dataset: `{run['dataset']}` split `{run['split']}`; {metrics['n_predicted']} of "
                 f"{metrics['n_examples']} examples predicted" + ("" if metrics["complete"] else
                                                                  " — **incomplete: rerun to finish**"))
    lines.append(f"- class counts: {metrics['class_counts']}; test perturbation seen in another training line: "
                 f"{metrics['n_pert_seen_in_train_lines']}")
    lines.append(f"- backend `{run['backend_info']['backend']}`, model `{run['backend_info']['model']}`, adapter "
                 f"`{run['backend_info']['adapter'] or 'none (zero-shot)'}`; evidence context: {run['evidence']}")
    lines.append(f"- class probabilities: {metrics['probability_method']}"
                 + (" (hard labels: AUROC from one-hot scores is a weak statistic)"
                    if metrics["probability_method"] == HARD_LABEL else ""))
    lines.append(f"- sampling: `{json.dumps(run['sampling'])}`")
    lines.append(f"- prompt template sha256 `{run['prompt_sha256'][:16]}…`, chat template sha256 "
                 f"`{(run['backend_info'].get('chat_template_sha256') or 'n/a')[:16]}…`")
    lines += ["", "## Verdict", ""]
    if not v:
        lines.append("No headline metric could be compared (too few examples or genes in this sample).")
    if v:
        beats = [k for k, x in v.items() if x["beats"]]
        loses = [k for k, x in v.items() if not x["beats"]]
        for k, x in v.items():
            vs_majority = ""
            if x.get("majority") is not None and x["best_baseline"] != "majority":
                vs_majority = (f"; vs majority {x['majority']:.3f} → "
                               f"{'beats it' if x['beats_majority'] else 'does not beat it'}")
            lines.append(f"- {k}: model {x['model']:.3f} vs best baseline {x['best_baseline']} {x['baseline']:.3f} "
                         f"→ {'**beats it**' if x['beats'] else '**does not beat it**'}{vs_majority}")
        lines.append("")
        if not loses:
            lines.append("The model beats every trivial baseline on every headline metric.")
        elif not beats:
            lines.append("The model does **not** beat the trivial baselines on any headline metric.")
        else:
            lines.append(f"The model beats the best baseline on {', '.join(beats)} but not on {', '.join(loses)}.")
    present = [s for s in ("seen", "unseen") if any(s in m for m in metrics["model"].values())]
    # Strata tables only when they differ from the overall one (some, not all, perturbations seen).
    strata = ["overall"] + (present if len(present) == 2 else [])
    if len(present) == 1:
        lines += ["", f"All {metrics['n_predicted']} examples are in one stratum: test perturbation "
                  f"{'seen' if present[0] == 'seen' else 'not seen'} in another training cell line."]
    for stratum in strata:
        table = metrics_table(metrics, name, stratum)
        if table is None:
            continue
        title = {"overall": "All examples", "seen": "Perturbation seen in another training cell line",
                 "unseen": "Perturbation not seen in any other training cell line"}[stratum]
        lines += ["", f"## {title}", "", table]
    lines += ["", "Brackets: 95% bootstrap intervals over perturbations. Per-gene AUROC is PerturbQA's metric "
              "(within each readout gene, averaged); the gene priors score 0.5 on it by construction."]
    for fig in figures:
        lines += ["", f"![{Path(fig).stem}]({fig})"]
    tok = metrics["tokens"]
    lines += ["", f"Tokens: prompt {tok['prompt_mean']:.0f} on average, completion {tok['completion_mean']:.0f}; "
              f"{tok['finished_by_length']} outputs stopped at max_new_tokens." if tok["prompt_mean"] is not None else ""]
    path = out / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path


def write_figures(out: Path, metrics: dict, examples: pd.DataFrame, preds: dict[str, Prediction],
                  model_name: str) -> list[str]:
    """PNG figures; returns their paths relative to ``out`` (empty when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    figdir = out / "figures"
    figdir.mkdir(exist_ok=True)
    paths = []
    overall = metrics["model"][STRICT]["overall"]

    # Confusion matrix (rows gold, columns predicted incl. unparseable), row-normalised colour.
    cm = np.array(overall["confusion_matrix"]["counts"], dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color="black" if norm[i, j] < 0.6 else "white")
    ax.set_xticks(range(cm.shape[1]), overall["confusion_matrix"]["cols_pred"])
    ax.set_yticks(range(cm.shape[0]), overall["confusion_matrix"]["rows_gold"])
    ax.set_xlabel("predicted (strict parse)")
    ax.set_ylabel("gold")
    ax.set_title(f"{model_name}: confusion matrix")
    fig.tight_layout()
    fig.savefig(figdir / "confusion_matrix.png", dpi=110)
    plt.close(fig)
    paths.append("figures/confusion_matrix.png")

    # Per-class F1: model vs every available baseline.
    rows = {f"{model_name}": overall}
    rows.update({k: b["overall"] for k, b in metrics["baselines"].items() if "overall" in b})
    classes = ["up", "down", "not_de"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(rows)
    for k, (name, m) in enumerate(rows.items()):
        ax.bar(np.arange(3) + k * width, [m["per_class"][c]["f1"] for c in classes], width, label=name,
               edgecolor="black" if k == 0 else None, linewidth=1.2 if k == 0 else 0)
    ax.set_xticks(np.arange(3) + width * (len(rows) - 1) / 2, classes)
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1)
    ax.set_title("per-class F1: model vs baselines (same examples)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(figdir / "per_class_f1.png", dpi=110)
    plt.close(fig)
    paths.append("figures/per_class_f1.png")

    # Calibration: one-vs-rest reliability curves of the class probabilities.
    recs = [preds[i] for i in examples["id"] if i in preds]
    gold = [r.gold for r in recs]
    probs = np.array([r.prob_vector() or [1 / 3] * 3 for r in recs], dtype=float)
    fig, ax = plt.subplots(figsize=(4.8, 4.3))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    bins = np.linspace(0, 1, 11)
    for j, lab in enumerate(LABELS):
        y = np.array([g == lab for g in gold], dtype=float)
        idx = np.clip(np.digitize(probs[:, j], bins) - 1, 0, 9)
        xs, ys, ns = [], [], []
        for b in range(10):
            sel = idx == b
            if sel.any():
                xs.append(probs[sel, j].mean())
                ys.append(y[sel].mean())
                ns.append(sel.sum())
        ax.plot(xs, ys, marker="o", label=f"{SHORT[lab]}")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"calibration ({metrics['probability_method']})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figdir / "calibration.png", dpi=110)
    plt.close(fig)
    paths.append("figures/calibration.png")
    return paths


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
    if inf.backend == "openai" and not inf.cache_path:
        inf = inf.model_copy(update={"cache_path": str(out / "cache.sqlite")})
    cfg = cfg.model_copy(update={"inference": inf})
    if not inf.model:
        raise SynthpertError("no model given: pass --model DIR (or a model name with --backend openai)")

    examples = load_examples(cfg)
    from .data import built_config

    data_cfg = built_config(Path(cfg.dataset))
    evidence = use_evidence(cfg)
    fp = fingerprint(cfg, evidence)
    _check_resume(out, fp, overwrite)

    from .report import training_stats

    stats = training_stats(data_cfg)
    owned = backend is None
    if backend is None:
        from .inference import make_backend

        backend = make_backend(inf)
    try:
        predictor = Predictor(backend)
        run = {**fp, "backend_info": backend.describe(), "model_name": cfg.name or _default_name(inf),
               "versions": library_versions(), "data_config": data_cfg.model_dump(mode="json"),
               "n_bootstrap": cfg.n_bootstrap}
        (out / RUN_FILE).write_text(json.dumps(jsonable(run), indent=2))
        predict_missing(predictor, examples, out, stats if evidence else None, cfg.chunk_size, progress)
        engine_stats = getattr(backend, "last_stats", None)
    finally:
        if owned:
            backend.close()

    preds = read_predictions(out / PREDICTIONS)
    metrics = compute_all_metrics(examples, preds, stats, list(data_cfg.train_cells), cfg.n_bootstrap, cfg.seed)
    metrics["run"] = jsonable(run)
    if engine_stats:
        metrics["client"] = engine_stats
    (out / METRICS).write_text(json.dumps(metrics, indent=2))
    figures = write_figures(out, metrics, examples, preds, run["model_name"]) if cfg.figures and preds else []
    write_report(out, metrics, run, figures)
    return summary(metrics, out)


def _default_name(inf: InferenceConfig) -> str:
    model = Path(inf.model).name if inf.model else "model"
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
    return {"out": str(out), "n": metrics["n_predicted"], "complete": metrics["complete"],
            "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"),
            "balanced_accuracy": m.get("balanced_accuracy"), "auroc_de_per_gene": m.get("auroc_de_per_gene"),
            "auroc_dir_per_gene": m.get("auroc_dir_per_gene"), "unparseable_rate": m.get("unparseable_rate"),
            "macro_f1_lenient": lm.get("macro_f1"), "unparseable_rate_lenient": lm.get("unparseable_rate"),
            "probability_method": metrics.get("probability_method"),
            "beats_baselines": {k: v["beats"] for k, v in metrics.get("verdict", {}).items()}}
