"""Honest metrics for three-class perturbation predictions.

Every score set reports accuracy, macro-F1, balanced accuracy, per-class precision/recall/F1, the
confusion matrix and the unparseable rate, plus PerturbQA's own metric: AUROC computed within each readout
gene (genes whose labels are all one class are skipped) and averaged over genes, for the DE task
(score = P(up) + P(down)) and the direction task (score = P(up) / (P(up) + P(down)), truly DE pairs only).
Where class probabilities exist, the expected calibration error (ECE) of the top class, and of each class
one-vs-rest, says whether they can be read as probabilities (GRPO is known to make them overconfident).

Unparseable predictions count as wrong (they are a fourth predicted class that matches no gold label).
When only hard labels exist, probabilities are one-hot and the output says so: AUROC from hard labels is
a much weaker statistic than AUROC from scores.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .answer import LABELS, SHORT, UNPARSEABLE

PRED_CLASSES = (*LABELS, UNPARSEABLE)
_IDX = {lab: i for i, lab in enumerate(PRED_CLASSES)}


def _codes(labels) -> np.ndarray:
    """Class codes; anything that is not one of the labels (None, NaN from a pandas column, an error string)
    is unparseable, never silently mapped to a class."""
    out = np.empty(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels):
        out[i] = _IDX[lab] if isinstance(lab, str) and lab in _IDX else _IDX[UNPARSEABLE]
    return out


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """3 x 4 matrix: rows gold label, columns predicted label (last column: unparseable)."""
    k = len(PRED_CLASSES)
    flat = np.bincount(y_true * k + y_pred, weights=weights, minlength=3 * k)[: 3 * k]
    return flat.reshape(3, k)


def _from_confusion(cm: np.ndarray) -> dict:
    total = cm.sum()
    tp = np.diag(cm[:, :3])
    support = cm.sum(axis=1)
    predicted = cm[:, :3].sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "precision": precision, "recall": recall, "f1": f1, "support": support,
        "unparseable_rate": float(cm[:, 3].sum() / total) if total else float("nan"),
    }


def scores_of_codes(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """accuracy / macro_f1 / balanced_accuracy (and per-class figures) of class codes in LABELS order: the
    same definitions every report uses, for callers that score many candidate labelings (decision fitting)."""
    return _from_confusion(_confusion(np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)))


class PerGeneAUROC:
    """PerturbQA's metric under row weights: the AUROC within each readout gene (ties count half), averaged
    over genes that have both classes. Weights are bootstrap multiplicities (all ones for the plain metric);
    the sort is done once, so each weighting costs a few vectorised passes over the rows."""

    def __init__(self, genes, y_true, scores):
        g = pd.factorize(np.asarray(genes))[0]
        s = np.asarray(scores, dtype=float)
        self.order = np.lexsort((s, g))
        self.y = np.asarray(y_true, dtype=bool)[self.order]
        g, s = g[self.order], s[self.order]
        self.n_genes = int(g.max()) + 1 if len(g) else 0
        first = np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])] if len(g) else np.zeros(0, bool)
        self.block = np.cumsum(first) - 1  # runs of equal (gene, score): ties
        self.n_blocks = int(self.block[-1]) + 1 if len(g) else 0
        self.block_gene = g[first]
        gene_first_block = np.r_[True, self.block_gene[1:] != self.block_gene[:-1]] if self.n_blocks else first[:0]
        self.gene_first_block = np.flatnonzero(gene_first_block)

    def __call__(self, weights=None) -> tuple[float, int]:
        if not self.n_blocks:
            return float("nan"), 0
        w = np.ones(len(self.y)) if weights is None else np.asarray(weights, dtype=float)[self.order]
        pos = np.bincount(self.block, w * self.y, self.n_blocks)
        neg = np.bincount(self.block, w * ~self.y, self.n_blocks)
        below = np.cumsum(neg) - neg  # negative weight in lower-scoring blocks, over all genes so far
        below -= np.repeat(below[self.gene_first_block], np.diff(np.r_[self.gene_first_block, self.n_blocks]))
        num = np.bincount(self.block_gene, pos * (below + 0.5 * neg), self.n_genes)
        wp = np.bincount(self.block_gene, pos, self.n_genes)
        wn = np.bincount(self.block_gene, neg, self.n_genes)
        ok = (wp > 0) & (wn > 0)
        if not ok.any():
            return float("nan"), 0
        return float(np.mean(num[ok] / (wp[ok] * wn[ok]))), int(ok.sum())


def per_gene_auroc(genes, y_true, scores) -> tuple[float, int]:
    """Mean over genes of the within-gene AUROC (ties get half credit). Returns (mean, n_genes_used)."""
    return PerGeneAUROC(genes, y_true, scores)()


def _auroc_tasks(genes, y_true_labels, probs: np.ndarray) -> dict[str, tuple[PerGeneAUROC, np.ndarray]]:
    """The DE task over all rows and the direction task over truly DE rows, each with its row selection."""
    y = np.asarray(y_true_labels)
    genes = np.asarray(genes)
    p_up, p_down = probs[:, 0], probs[:, 1]
    is_de = y != LABELS[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        direction = np.where(p_up + p_down > 0, p_up / (p_up + p_down), 0.5)
    return {"de": (PerGeneAUROC(genes, is_de, p_up + p_down), np.ones(len(y), bool)),
            "dir": (PerGeneAUROC(genes[is_de], y[is_de] == LABELS[0], direction[is_de]), is_de)}


ECE_BINS = 10


def expected_calibration_error(confidence, correct, n_bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of (share of rows in the bin) x |accuracy - mean confidence|.

    Equal-width rather than equal-mass bins: the standard definition (Guo et al. 2017), so numbers compare
    with published ones; confidence 1.0 falls in the top bin."""
    conf = np.asarray(confidence, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if not len(conf):
        return float("nan")
    bins = np.minimum((np.clip(conf, 0.0, 1.0) * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, hit, n_bins) - np.bincount(bins, conf, n_bins))  # per bin: n x |acc - conf|
    return float(gap.sum() / count.sum())


def calibration(y_true_codes: np.ndarray, probs: np.ndarray) -> dict:
    """Top-class ECE (confidence = the largest class probability, correct = its class is the gold one) and
    one-vs-rest ECE per class (P(c) against "the gold label is c"). Probabilities are renormalised per row, so
    scores that do not sum to 1 (a decision rule's adjusted ones) are read as the distribution they imply."""
    p = np.asarray(probs, dtype=float)
    total = p.sum(axis=1, keepdims=True)
    p = np.where(total > 0, p / np.where(total > 0, total, 1), 1 / 3)
    top = p.argmax(axis=1)
    return {"ece": expected_calibration_error(p.max(axis=1), top == y_true_codes),
            "ece_per_class": {SHORT[lab]: expected_calibration_error(p[:, i], y_true_codes == i)
                              for i, lab in enumerate(LABELS)},
            "ece_bins": ECE_BINS}


def probabilities_from_labels(pred_labels) -> np.ndarray:
    """One-hot rows for hard labels; an unparseable prediction gets a uniform row (it carries no signal)."""
    probs = np.full((len(pred_labels), 3), 1 / 3)
    for i, lab in enumerate(pred_labels):
        if lab in LABELS:
            probs[i] = 0.0
            probs[i, LABELS.index(lab)] = 1.0
    return probs


def compute_metrics(y_true, y_pred, probs: np.ndarray | None = None, genes=None, perturbations=None,
                    n_bootstrap: int = 0, seed: int = 0, ci: float = 0.95) -> dict:
    """All metrics for one set of predictions.

    ``y_pred`` holds labels or None/"unparseable". ``probs`` is an (n, 3) array in LABELS order; without it
    probabilities come from the hard labels and ``probabilities`` says "hard_labels". ``genes`` enables
    the per-gene AUROC; ``perturbations`` enables bootstrap intervals that resample perturbations.
    """
    y_true = list(y_true)
    y_pred = [UNPARSEABLE if p is None else p for p in y_pred]
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    t, p = _codes(y_true), _codes(y_pred)
    if (t == _IDX[UNPARSEABLE]).any():
        raise ValueError("gold labels must be one of the three classes")
    cm = _confusion(t, p)
    base = _from_confusion(cm)
    out: dict = {
        "n": len(y_true),
        "accuracy": base["accuracy"],
        "macro_f1": base["macro_f1"],
        "balanced_accuracy": base["balanced_accuracy"],
        "unparseable_rate": base["unparseable_rate"],
        "per_class": {SHORT[lab]: {"precision": float(base["precision"][i]), "recall": float(base["recall"][i]),
                                   "f1": float(base["f1"][i]), "support": int(base["support"][i])}
                      for i, lab in enumerate(LABELS)},
        "confusion_matrix": {"rows_gold": [SHORT[x] for x in LABELS],
                             "cols_pred": [SHORT.get(x, x) for x in PRED_CLASSES],
                             "counts": cm.astype(int).tolist()},
        "probabilities": "scores" if probs is not None else "hard_labels",
    }
    if probs is not None and len(y_true):  # one-hot scores from hard labels have no calibration to speak of
        out |= calibration(t, np.asarray(probs, dtype=float))
    tasks = None
    if genes is not None:
        pr = np.asarray(probs, dtype=float) if probs is not None else probabilities_from_labels(y_pred)
        tasks = _auroc_tasks(genes, y_true, pr)
        for task, (auroc, _) in tasks.items():
            out[f"auroc_{task}_per_gene"], out[f"auroc_{task}_genes"] = auroc()
    if n_bootstrap and perturbations is not None and len(y_true):
        out["ci"] = bootstrap_ci(t, p, np.asarray(perturbations), n_bootstrap, seed, ci, tasks)
    return out


def bootstrap_ci(t: np.ndarray, p: np.ndarray, perturbations: np.ndarray, n_bootstrap: int, seed: int,
                 ci: float, auroc_tasks: dict | None = None) -> dict:
    """Percentile intervals from resampling PERTURBATIONS with replacement (pairs of one perturbation are
    correlated, so resampling pairs would give intervals that are too narrow). Per-gene AUROC gets
    intervals too when its tasks are given (each resample re-weights the rows of every gene)."""
    codes, pert_idx = np.unique(perturbations, return_inverse=True)
    rng = np.random.default_rng(seed)
    stats = {"accuracy": [], "macro_f1": [], "balanced_accuracy": []}
    for task in auroc_tasks or {}:
        stats[f"auroc_{task}_per_gene"] = []
    for _ in range(n_bootstrap):
        mult = np.bincount(rng.integers(0, len(codes), len(codes)), minlength=len(codes))
        w = mult[pert_idx].astype(float)
        m = _from_confusion(_confusion(t, p, weights=w))
        for k in ("accuracy", "macro_f1", "balanced_accuracy"):
            stats[k].append(m[k])
        for task, (auroc, rows) in (auroc_tasks or {}).items():
            stats[f"auroc_{task}_per_gene"].append(auroc(w[rows])[0])
    lo, hi = (1 - ci) / 2, 1 - (1 - ci) / 2
    out = {}
    for k, v in stats.items():
        v = np.asarray(v, dtype=float)
        out[k] = [float(np.nanquantile(v, lo)), float(np.nanquantile(v, hi))] if np.isfinite(v).any() else None
    return out | {"level": ci, "n_bootstrap": n_bootstrap, "unit": "perturbation"}


def stratified_metrics(frame: pd.DataFrame, pred_col: str = "pred", prob_cols=None, strata_col: str | None = None,
                       **kw) -> dict:
    """Metrics overall and for each value of ``strata_col`` (e.g. "seen"/"unseen")."""
    def one(df):
        probs = df[list(prob_cols)].to_numpy(float) if prob_cols else None
        return compute_metrics(df["label"].tolist(), df[pred_col].tolist(), probs, genes=df["gene"].to_numpy(),
                               perturbations=df["perturbation"].to_numpy(), **kw)
    out = {"overall": one(frame)}
    if strata_col is not None:
        for value, part in frame.groupby(strata_col, sort=True):
            out[str(value)] = one(part)
    return out
