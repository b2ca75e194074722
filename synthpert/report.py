"""The evaluation report: Markdown tables of the model beside the baselines, the verdict, and the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .answer import LABELS, LENIENT, SHORT, SHORT_KEYS, STRICT
from . import metric_table
from .ceiling import ceiling_lines
from .metric_table import PER_CLASS, Metric, class_f1s, headers
from .metrics import ECE_BINS
from .runs import write_text_atomic
from .schema import HARD_LABEL, Prediction

REPORT = "report.md"


def fmt(x, ci=None) -> str:
    """A metric for a table: three decimals, its interval when given, "—" for a missing value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    s = f"{x:.3f}"
    if ci:
        s += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return s


def metric_cells(m: dict, metric: Metric) -> list[str]:
    """A row's cell(s) for one entry of the metric table: its value, its interval where it has one, and the
    number of genes a per-gene mean averages (genes with one class in the sample are skipped)."""
    if metric.key == PER_CLASS:
        return [fmt(f1) for f1 in class_f1s(m)]
    ci = (m.get("ci") or {}).get(metric.key) if metric.interval else None
    genes = m.get(metric.genes) if metric.genes else None
    return [fmt(m.get(metric.key), ci) + (f" ({genes} genes)" if genes else "")]


def _row(name: str, m: dict) -> str:
    cells = [name, str(m["n"])] + [c for metric in metric_table.metrics() for c in metric_cells(m, metric)]
    return "| " + " | ".join(cells) + " |"


def table_head() -> str:
    names = ["predictor", "n"] + [h for metric in metric_table.metrics() for h in headers(metric, "report")]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


MODEL_ROWS = {  # metrics["model"] key -> how the report names the row
    STRICT: "generated answer, strict parse",
    LENIENT: "generated answer, lenient parse",
    "scored": "argmax of class probabilities",
    "decided": "decided",
}


def _row_name(mode: str, metrics: dict) -> str:
    if mode == "decided":
        return f"decided: {(metrics.get('decision') or {}).get('rule', '?')} rule"
    return MODEL_ROWS[mode]


def metrics_table(metrics: dict, model_name: str, stratum: str) -> str | None:
    lines = [table_head()]
    for mode in MODEL_ROWS:
        m = metrics["model"].get(mode, {}).get(stratum)
        if m:
            lines.append(_row(f"**{model_name}** ({_row_name(mode, metrics)})", m))
    for name, b in metrics["baselines"].items():
        if "unavailable" in b:
            lines.append(f"| {name} | — | unavailable: {b['unavailable']} |" + " |" * 9)
        elif stratum in b:
            lines.append(_row(name, b[stratum]))
    return "\n".join(lines) if len(lines) > 1 else None


def _overall_rows(metrics: dict, model_name: str) -> dict[str, dict]:
    rows = {f"{model_name} ({_row_name(mode, metrics)})": metrics["model"][mode]["overall"]
            for mode in MODEL_ROWS if metrics["model"].get(mode, {}).get("overall")}
    return rows | {n: b["overall"] for n, b in metrics["baselines"].items() if "overall" in b}


def _ci(ci) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def outcome_words(outcome: str | None, bold: bool = False) -> str:
    """'beats' only when the 95% intervals separate; an overlap says so instead of a bare "does not beat"."""
    b = (lambda t: f"**{t}**") if bold else (lambda t: t)  # noqa: E731
    if outcome == "beats":
        return b("beats it")
    if outcome == "within":
        return b("does not beat it") + " (within the 95% interval: no difference shown)"
    return b("does not beat it")


def verdict_summary(verdict: dict) -> str:
    """One sentence under the verdict: the best baseline per metric, and always-"not DE" where that is all the
    model clears (a student that learned something should not read as one that learned nothing)."""
    beats = [k for k, x in verdict.items() if x["beats"]]
    loses = [k for k, x in verdict.items() if not x["beats"]]
    bar = ("combined (the lookup in its prompt)" if all(x.get("reference") == "lookup" for x in verdict.values())
           else "the best baseline")
    if not loses:
        return f"The model beats {bar} on every headline metric."
    if beats:
        return f"The model beats {bar} on {', '.join(beats)} but not on {', '.join(loses)}."
    over = [k for k, x in verdict.items() if x.get("beats_majority")]
    close = [k for k, x in verdict.items() if x.get("outcome") == "within"]
    within = (f" (on {', '.join(close)} it is within the 95% interval of {bar}: more pairs would "
              "tell them apart)") if close else ""
    return (f"The model does **not** beat {bar} on any headline metric" + within
            + (f'; it beats always-"not DE" (majority) on {", ".join(over)}.' if over
               else ', nor always-"not DE" (majority).'))


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
                 f"`{run['backend_info']['adapter'] or 'none (zero-shot)'}`; evidence context: {run['evidence']}"
                 + (", with the combined baseline's lookup line" if run.get("evidence_lookup") else ""))
    lines.append(f"- class probabilities: {metrics['probability_method']}"
                 + (" (hard labels: AUROC from one-hot scores is a weak statistic)"
                    if metrics["probability_method"] == HARD_LABEL else ""))
    lines.append(f"- sampling: `{json.dumps(run['sampling'])}`")
    if metrics.get("decision"):
        lines.append(f"- decision rule: {metrics['decision']['description']}; the verdict judges the "
                     f"{'decided' if 'decided' in metrics['model'] else 'generated (strict)'} answer")
    lines.append(f"- prompt template sha256 `{run['prompt_sha256'][:16]}…`, chat template sha256 "
                 f"`{(run['backend_info'].get('chat_template_sha256') or 'n/a')[:16]}…`")
    lines += ["", "## Verdict", ""]
    if not v:
        lines.append("No headline metric could be compared (too few examples or genes in this sample).")
    if v:
        for k, x in v.items():
            vs_majority = ""
            if x.get("majority") is not None and x["best_baseline"] != "majority":
                vs_majority = f"; vs majority {x['majority']:.3f} → {outcome_words(x.get('majority_outcome'))}"
            interval = f" (model's 95% interval{_ci(x['ci'])})" if x.get("ci") else ""
            against = ("combined, whose probabilities its prompt states" if x.get("reference") == "lookup"
                       else f"best baseline {x['best_baseline']}")
            lines.append(f"- {k}: model {x['model']:.3f} vs {against} {x['baseline']:.3f} "
                         f"→ {outcome_words(x.get('outcome'), bold=True)}{vs_majority}{interval}")
        acc = metrics.get("accuracy_vs_majority")
        if acc:
            lines.append(f'- accuracy: model {acc["model"]:.3f}{_ci(acc.get("ci"))} vs always-"not DE" (majority) '
                         f'{acc["majority"]:.3f} → ' + {
                             "beats": "right more often than always answering \"not DE\"",
                             "trails": "right **less** often than always answering \"not DE\" (the metrics above "
                                       "reward the rarer classes, which always-\"not DE\" never answers)",
                         }.get(acc["outcome"], "no difference within the 95% interval"))
        lines += ["", verdict_summary(v)]
    if metrics.get("noise_ceiling"):
        lines += ["", "## Noise ceiling", "", *ceiling_lines(metrics["noise_ceiling"], _overall_rows(metrics, name))]
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
              "(within each readout gene, averaged); the gene priors score 0.5 on it by construction. ECE: expected "
              f"calibration error of the top class's probability ({ECE_BINS} equal-width bins; 0 = calibrated, "
              "— for hard labels); per-class one-vs-rest ECE is in metrics.json."]
    for fig in figures:
        lines += ["", f"![{Path(fig).stem}]({fig})"]
    tok = metrics["tokens"]
    lines += ["", f"Tokens: prompt {tok['prompt_mean']:.0f} on average, completion {tok['completion_mean']:.0f}; "
              f"{tok['finished_by_length']} outputs stopped at max_new_tokens."
              if tok["prompt_mean"] is not None else ""]
    path = out / REPORT
    write_text_atomic(path, "\n".join(lines) + "\n")
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
    classes = list(SHORT_KEYS)
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
