"""The verdict of an evaluation: does the model beat the best baseline, metric by metric, beyond the 95%
intervals, and how does its accuracy compare with always answering "not DE"."""

from __future__ import annotations

import math

from .answer import STRICT
from .metric_table import headline_keys

MIN_AUROC_GENES = 10  # per-gene AUROC enters the verdict only when averaged over at least this many genes
DECIDED = "decided"  # the model row scored with the decision rule
LOOKUP_BASELINE = "combined"  # the baseline whose probabilities the evidence lookup line states (lookup.py)


def verdict_row(m: dict) -> str:
    """The model's answer the verdict judges: the decision rule's when one applies, else the strict parse."""
    return DECIDED if DECIDED in (m.get("model") or {}) else STRICT


def compare(value: float, ci, other: float, other_ci) -> str:
    """'beats' / 'trails' only when the 95% intervals separate (a value without one counts as its point);
    'within' when they overlap: a 0.302 [0.18, 0.50] against 0.267 shows no difference. Without the model's
    interval (no bootstrap) the points decide, as nothing better is known."""
    if not ci:
        return "beats" if value > other else "trails"
    lo, hi = ci
    o_lo, o_hi = other_ci if other_ci else (other, other)
    if lo > o_hi:
        return "beats"
    if hi < o_lo:
        return "trails"
    return "within"


def _baseline_ci(m: dict, name: str, metric: str):
    return ((m["baselines"].get(name, {}).get("overall") or {}).get("ci") or {}).get(metric)


def _value(b: dict, metric: str):
    v = b.get("overall", {}).get(metric) if "overall" in b else None
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def verdict(m: dict) -> dict:
    """Does the model (its decided label, else its strict parse) beat the best baseline, metric by metric,
    beyond the 95% intervals? A model whose prompt stated ``combined``'s probabilities (``evidence_lookup``)
    is judged against ``combined`` itself: the question is whether it adds anything to its own lookup line,
    which it could copy (``reference`` says which: "lookup" or "best")."""
    res = {}
    model = (m.get("model") or {}).get(verdict_row(m), {}).get("overall")
    if not model:
        return res
    model_ci = model.get("ci") or {}
    lookup = bool(m.get("evidence_lookup"))
    for metric in headline_keys():  # the metric table's headline entries
        best_name, best = None, None
        for name, b in m["baselines"].items():
            v = _value(b, metric)
            if v is not None and (best is None or v > best):
                best_name, best = name, v
        reference = "best"
        if lookup and _value(m["baselines"].get(LOOKUP_BASELINE, {}), metric) is not None:
            best_name, best = LOOKUP_BASELINE, _value(m["baselines"][LOOKUP_BASELINE], metric)
            reference = "lookup"
        mv = model.get(metric)
        if mv is None or best is None or (isinstance(mv, float) and math.isnan(mv)):
            continue
        if metric.endswith("_per_gene") and model.get(metric.replace("_per_gene", "_genes"), 0) < MIN_AUROC_GENES:
            continue  # an average over a handful of genes says nothing; the table still shows it with its count
        outcome = compare(mv, model_ci.get(metric), best, _baseline_ci(m, best_name, metric))
        majority = m["baselines"].get("majority", {}).get("overall", {}).get(metric)
        vs_majority = None if majority is None else compare(mv, model_ci.get(metric), majority,
                                                        _baseline_ci(m, "majority", metric))
        res[metric] = {"model": mv, "ci": model_ci.get(metric), "row": verdict_row(m), "best_baseline": best_name,
                       "baseline": best, "reference": reference, "outcome": outcome, "beats": outcome == "beats",
                       "majority": majority, "majority_outcome": vs_majority,
                       "beats_majority": None if majority is None else vs_majority == "beats"}
    return res


def accuracy_vs_majority(m: dict) -> dict | None:
    """Accuracy beside always-"not DE": a model can clear it on macro-F1 and still be right less often, which
    the verdict's headline metrics would not say."""
    model = (m.get("model") or {}).get(verdict_row(m), {}).get("overall") or {}
    majority = (m.get("baselines") or {}).get("majority", {}).get("overall") or {}
    if model.get("accuracy") is None or majority.get("accuracy") is None:
        return None
    ci = (model.get("ci") or {}).get("accuracy")
    return {"model": model["accuracy"], "ci": ci, "majority": majority["accuracy"],
            "outcome": compare(model["accuracy"], ci, majority["accuracy"], (majority.get("ci") or {}).get("accuracy"))}
