"""Model-free baselines: the bar every model must clear. Nothing here reads a test label.

* ``majority``: always the training set's most frequent class; probabilities = training class rates.
* ``gene_prior``: class frequencies of the readout gene over training perturbations (pooled over the
  training lines), smoothed towards the global rate with ``GENE_PRIOR_PSEUDOCOUNT`` pseudo-examples;
  hard label = argmax.
* ``gene_prior_balanced``: the same probabilities, hard label = argmax of P(class | gene) / P(class), the
  Bayes decision under equal class costs (trades accuracy for macro-F1).
* ``crosscell``: what the OTHER training lines' training rows say about the test
  perturbation (see ``crosscell_probabilities``). Needs at least one training line other than the test
  line; otherwise it is reported as unavailable rather than as a number.

* ``combined``: a multinomial logistic regression on the evidence the student sees (gene prior, the gene's
  counts in its own line, cross-cell probabilities and counts), fit on TRAINING rows whose features follow
  the evidence block's leakage rule (a row's own perturbation is absent from its own line's counts), so
  training rows look like test rows. The strongest model-free bar; see ``combined_probabilities``.

Per-gene AUROC of the gene priors is 0.5 by construction (one score per gene): they set the accuracy and
macro-F1 bar; ``crosscell`` is the per-gene AUROC bar.
"""

from __future__ import annotations

import weakref

import numpy as np
import pandas as pd

from .answer import LABELS
from .evidence import TrainingStats

GENE_PRIOR_PSEUDOCOUNT = 5.0
CROSS_DE_PSEUDOCOUNT = 20.0  # pseudo-genes pulling a perturbation's DE share towards the global DE rate
CROSS_UP_PSEUDOCOUNT = 5.0  # pseudo-DE-genes pulling its up share towards the global up share
COMBINED_MAX_FIT_ROWS = 60_000  # seeded sample of training rows the combined baseline is fitted on


def _balanced_argmax(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    return np.argmax(probs / np.clip(prior, 1e-12, None), axis=1)


def majority_probabilities(stats: TrainingStats, n: int) -> np.ndarray:
    return np.tile(stats.global_rate, (n, 1))


def gene_prior_probabilities(stats: TrainingStats, test: pd.DataFrame) -> np.ndarray:
    prior = stats.global_rate
    k = GENE_PRIOR_PSEUDOCOUNT
    out = np.empty((len(test), 3))
    for i, (c, p, g) in enumerate(zip(test.cell_line.tolist(), test.perturbation.tolist(), test.gene.tolist())):
        counts = stats.gene_counts_pooled_loo(c, p, g)  # LOO is a no-op for test rows
        out[i] = (counts + k * prior) / (counts.sum() + k)
    return out


def crosscell_probabilities(stats: TrainingStats, test: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities from the other training lines only. Fixed formula, nothing fitted:

    With r_de the DE rate and r_up the share of up among DE pairs over the other lines' training rows,
    for perturbation p over the other lines' training rows (n genes measured, de DE, up up-regulated):
        q_de(p) = (de + 20 r_de) / (n + 20)        u(p) = (up + 5 r_up) / (de + 5)
    if the same (p, g) pair was measured in m other lines, with d of them DE and v of those up:
        P(DE) = (d + q_de(p)) / (m + 1)           P(up | DE) = (v + u(p)) / (d + 1)
    else P(DE) = q_de(p), P(up | DE) = u(p). P(up) = P(DE) P(up|DE), P(down) = P(DE) (1 - P(up|DE)).
    A perturbation measured in no other line gets the global rates (no information).
    Returns (probs, has_info) where has_info marks rows with any cross-cell evidence.
    """
    rates = {}
    for c in set(test.cell_line):
        g = stats.counts_excluding(c)
        rates[c] = ((g[0] + g[1]) / max(g.sum(), 1), g[0] / max(g[0] + g[1], 1))
    out = np.empty((len(test), 3))
    has_info = np.zeros(len(test), dtype=bool)
    for i, (c, p, gene) in enumerate(zip(test.cell_line.tolist(), test.perturbation.tolist(), test.gene.tolist())):
        r_de, r_up = rates[c]
        pert = np.zeros(3)
        for line in stats.pert_lines.get(p, ()):
            if line != c:
                pert = pert + stats.pert_counts[(line, p)]
        n, de, up = pert.sum(), pert[0] + pert[1], pert[0]
        q_de = (de + CROSS_DE_PSEUDOCOUNT * r_de) / (n + CROSS_DE_PSEUDOCOUNT)
        u = (up + CROSS_UP_PSEUDOCOUNT * r_up) / (de + CROSS_UP_PSEUDOCOUNT)
        pair = [stats.pair_label[(line, p, gene)] for line in stats.lines
                if line != c and (line, p, gene) in stats.pair_label]
        if pair:
            m = len(pair)
            d = sum(lab != LABELS[2] for lab in pair)
            v = sum(lab == LABELS[0] for lab in pair)
            p_de = (d + q_de) / (m + 1)
            p_up_de = (v + u) / (d + 1)
        else:
            p_de, p_up_de = q_de, u
        has_info[i] = n > 0
        out[i] = (p_de * p_up_de, p_de * (1 - p_up_de), 1 - p_de)
    return out, has_info


def evidence_features(stats: TrainingStats, rows: pd.DataFrame) -> np.ndarray:
    """Per row (cell_line, perturbation, gene): the numbers the student's evidence block shows, as features.

    Each count is taken with the row's own pair left out of its own line (a no-op for test rows), so
    features of training rows are distributed as those of test rows."""
    gp = gene_prior_probabilities(stats, rows)
    cc, has_info = crosscell_probabilities(stats, rows)
    here = np.array([stats.gene_counts_loo(c, p, g) for c, p, g in
                     zip(rows.cell_line.tolist(), rows.perturbation.tolist(), rows.gene.tolist())], dtype=float)
    if not len(here):
        here = np.zeros((0, 3))
    n_here = here.sum(axis=1)
    de_here = (here[:, 0] + here[:, 1] + 1) / (n_here + 10)
    up_here = (here[:, 0] + 1) / (here[:, 0] + here[:, 1] + 2)
    pert_n = np.array([sum(stats.pert_counts[(line, p)].sum() for line in stats.pert_lines.get(p, ()) if line != c)
                       for c, p in zip(rows.cell_line.tolist(), rows.perturbation.tolist())], dtype=float)
    logit = lambda q: np.log(np.clip(q, 1e-6, None)) - np.log(np.clip(1 - q, 1e-6, None))  # noqa: E731
    return np.column_stack([np.log(np.clip(gp, 1e-6, None)), np.log(np.clip(cc, 1e-6, None)), logit(de_here),
                            logit(up_here), np.log1p(n_here), has_info.astype(float), np.log1p(pert_n)])


def combined_fit_keys(stats: TrainingStats, seed: int = 0, max_fit_rows: int = COMBINED_MAX_FIT_ROWS) -> list:
    """The (cell line, perturbation, gene) training rows ``combined`` is fitted on: a seeded sample of them."""
    keys = sorted(stats.pair_label)
    if len(keys) > max_fit_rows:
        rng = np.random.default_rng(seed)
        keys = [keys[i] for i in np.sort(rng.choice(len(keys), size=max_fit_rows, replace=False))]
    return keys


def fit_combined(stats: TrainingStats, keys: list):
    """The combined regression fitted on training rows ``keys`` (their labels from ``stats``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = pd.DataFrame(keys, columns=["cell_line", "perturbation", "gene"])
    y = np.array([LABELS.index(stats.pair_label[k]) for k in keys])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    model.fit(evidence_features(stats, train), y)
    return model


def model_probabilities(model, features: np.ndarray) -> np.ndarray:
    """(n, 3) class probabilities; a class the fit never saw gets 0."""
    probs = np.zeros((len(features), 3))
    if len(features):
        probs[:, model.classes_] = model.predict_proba(features)
    return probs


# Fitted once per (stats, seed, rows) per process: evaluation scores several sets over the same stats, and
# the evidence lookup (lookup.py) states this model's probabilities in every test prompt.
_COMBINED_FITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def combined_model(stats: TrainingStats, seed: int = 0, max_fit_rows: int = COMBINED_MAX_FIT_ROWS):
    fits = _COMBINED_FITS.setdefault(stats, {})
    if (seed, max_fit_rows) not in fits:
        fits[(seed, max_fit_rows)] = fit_combined(stats, combined_fit_keys(stats, seed, max_fit_rows))
    return fits[(seed, max_fit_rows)]


def combined_probabilities(stats: TrainingStats, test: pd.DataFrame, seed: int = 0,
                           max_fit_rows: int = COMBINED_MAX_FIT_ROWS) -> np.ndarray:
    """Multinomial logistic regression on ``evidence_features``, fitted on a seeded sample of the training
    rows ``stats`` was built from (never on ``test``, whose labels it does not read)."""
    return model_probabilities(combined_model(stats, seed, max_fit_rows), evidence_features(stats, test))


def baseline_predictions(stats: TrainingStats, test: pd.DataFrame, train_cells: list[str],
                         seed: int = 0, only: str | None = None, combined_seed: int | None = None) -> dict[str, dict]:
    """{name: {"probs": (n,3) array, "pred": list[label]}} or {name: {"unavailable": reason}}; ``only``: just
    that baseline (`synthpert predict --baseline`: the combined fit is the slow one); ``combined_seed``: the
    combined fit's sample (default ``seed``), the lookup line's when the prompts stated it (lookup.py)."""
    want = lambda name: only is None or only == name  # noqa: E731
    prior = stats.global_rate
    out: dict[str, dict] = {}
    if want("majority"):
        maj = majority_probabilities(stats, len(test))
        out["majority"] = {"probs": maj, "pred": [LABELS[int(np.argmax(prior))]] * len(test)}
    if want("gene_prior") or want("gene_prior_balanced"):
        gp = gene_prior_probabilities(stats, test)
        out["gene_prior"] = {"probs": gp, "pred": [LABELS[i] for i in gp.argmax(axis=1)]}
        out["gene_prior_balanced"] = {"probs": gp, "pred": [LABELS[i] for i in _balanced_argmax(gp, prior)]}
    if not want("crosscell"):
        pass
    elif not any(set(train_cells) - {line} for line in set(test.cell_line)):
        reason = ("no cross-cell information: the only training line is the test line "
                  "(train on other lines too to get this baseline)")
        out["crosscell"] = {"unavailable": reason}
    else:
        cc, _ = crosscell_probabilities(stats, test)
        out["crosscell"] = {"probs": cc, "pred": [LABELS[i] for i in cc.argmax(axis=1)]}
    if want("combined"):
        comb = combined_probabilities(stats, test, seed=seed if combined_seed is None else combined_seed)
        out["combined"] = {"probs": comb, "pred": [LABELS[i] for i in comb.argmax(axis=1)]}
    return out


SEEN_COL = "pert_seen"


def seen_strata(test: pd.DataFrame) -> pd.Series:
    """'seen' when the test perturbation was measured in another training line, else 'unseen'."""
    return test["pert_seen_in_train_lines"].map(lambda v: "seen" if len(v) else "unseen")


def score_predictions(test: pd.DataFrame, pred, probs, n_bootstrap: int = 0, seed: int = 0) -> dict:
    """Metrics overall and per seen/unseen stratum, for one predictor on ``test`` rows."""
    from .metrics import stratified_metrics

    frame = test[["label", "gene", "perturbation"]].copy()
    frame["pred"] = list(pred)
    prob_cols = None
    if probs is not None:
        prob_cols = ["p_up", "p_down", "p_not_de"]
        frame[prob_cols] = np.asarray(probs, dtype=float)
    frame[SEEN_COL] = seen_strata(test).to_numpy()
    return stratified_metrics(frame, "pred", prob_cols, SEEN_COL, n_bootstrap=n_bootstrap, seed=seed)


def baseline_report(stats: TrainingStats, test: pd.DataFrame, train_cells: list[str],
                    n_bootstrap: int = 0, seed: int = 0, combined_seed: int | None = None) -> dict[str, dict]:
    """{baseline: {"overall": metrics, "seen": ..., "unseen": ...}} or {baseline: {"unavailable": why}}."""
    out = {}
    for name, res in baseline_predictions(stats, test, train_cells, seed=seed, combined_seed=combined_seed).items():
        if "unavailable" in res:
            out[name] = {"unavailable": res["unavailable"]}
        else:
            out[name] = score_predictions(test, res["pred"], res["probs"], n_bootstrap, seed)
    return out
