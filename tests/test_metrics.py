import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from synthpert.answer import DOWN, LABELS, NOT_DE, UP
from synthpert.metrics import compute_metrics, per_gene_auroc


def _sklearn_per_gene(genes, y, s):
    vals = []
    for g in sorted(set(genes)):
        m = np.asarray(genes) == g
        if len(set(np.asarray(y)[m])) == 2:
            vals.append(roc_auc_score(np.asarray(y)[m], np.asarray(s)[m]))
    return float(np.mean(vals)), len(vals)


def test_per_gene_auroc_small_hand_case():
    genes = ["A"] * 4 + ["B"] * 3 + ["C"] * 2
    y = [1, 0, 1, 0, 1, 0, 0, 0, 0]  # gene C has one class only: skipped
    s = [0.9, 0.1, 0.4, 0.5, 0.3, 0.3, 0.2, 0.7, 0.1]
    mean, n = per_gene_auroc(genes, y, s)
    assert n == 2
    assert mean == pytest.approx(_sklearn_per_gene(genes, y, s)[0])
    assert mean == pytest.approx((0.75 + 0.75) / 2)  # A: 3 of 4 pairs ordered; B: one tie -> half credit


@given(st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_per_gene_auroc_matches_sklearn_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    genes = rng.choice(list("ABCDE"), n)
    y = rng.integers(0, 2, n)
    s = rng.choice([0.1, 0.2, 0.5, 0.9], n) if seed % 2 else rng.random(n)
    ours, k = per_gene_auroc(genes, y, s)
    if k == 0:
        assert np.isnan(ours)
    else:
        ref, kr = _sklearn_per_gene(genes, y, s)
        assert k == kr and ours == pytest.approx(ref)


def test_hard_label_metrics_match_sklearn_and_unparseable_counts_as_wrong():
    rng = np.random.default_rng(0)
    y = list(rng.choice(LABELS, 200, p=[0.2, 0.1, 0.7]))
    pred = list(rng.choice([*LABELS, None], 200, p=[0.2, 0.2, 0.5, 0.1]))
    m = compute_metrics(y, pred)
    filled = ["unparseable" if p is None else p for p in pred]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, filled))
    assert m["macro_f1"] == pytest.approx(f1_score(y, filled, labels=list(LABELS), average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(
        np.mean([np.mean([f == t for t, f in zip(y, filled) if t == lab]) for lab in LABELS]))
    assert m["unparseable_rate"] == pytest.approx(sum(p is None for p in pred) / 200)
    assert np.array(m["confusion_matrix"]["counts"]).sum() == 200
    assert m["probabilities"] == "hard_labels"


def test_direction_auroc_uses_only_de_pairs_and_scores():
    y = [UP, DOWN, NOT_DE, UP, DOWN, NOT_DE]
    genes = ["G"] * 6
    probs = np.array([[0.6, 0.1, 0.3], [0.2, 0.5, 0.3], [0.9, 0.0, 0.1],
                      [0.3, 0.2, 0.5], [0.1, 0.4, 0.5], [0.0, 0.0, 1.0]])
    m = compute_metrics(y, [LABELS[i] for i in probs.argmax(1)], probs, genes=genes)
    de_ref = roc_auc_score([1, 1, 0, 1, 1, 0], probs[:, 0] + probs[:, 1])
    assert m["auroc_de_per_gene"] == pytest.approx(de_ref)
    assert m["auroc_dir_per_gene"] == pytest.approx(1.0)  # NOT_DE row 2 has P(up)=0.9 but is excluded
    assert m["probabilities"] == "scores"


def test_bootstrap_resamples_perturbations():
    rng = np.random.default_rng(1)
    perts = np.repeat([f"p{i}" for i in range(30)], 20)
    y = list(rng.choice(LABELS, len(perts)))
    pred = [t if rng.random() < 0.6 else NOT_DE for t in y]
    m = compute_metrics(y, pred, perturbations=perts, n_bootstrap=200, seed=0)
    lo, hi = m["ci"]["accuracy"]
    assert lo < m["accuracy"] < hi and m["ci"]["unit"] == "perturbation"
    m2 = compute_metrics(y, pred, perturbations=perts, n_bootstrap=200, seed=0)
    assert m2["ci"] == m["ci"]


def test_missing_predictions_from_a_dataframe_count_as_unparseable():
    import pandas as pd

    from synthpert.baselines import score_predictions

    test = pd.DataFrame({"label": [UP, DOWN, NOT_DE, NOT_DE], "gene": list("ABAB"), "perturbation": list("ppqq"),
                         "pert_seen_in_train_lines": [[], ["rpe1"], [], ["rpe1"]]})
    res = score_predictions(test, [UP, None, NOT_DE, float("nan")], None)
    assert res["overall"]["unparseable_rate"] == 0.5 and res["overall"]["accuracy"] == 0.5
    assert res["seen"]["n"] + res["unseen"]["n"] == 4


@given(st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_weighted_per_gene_auroc_equals_auroc_of_the_repeated_rows(seed):
    """A bootstrap weight of k must count exactly like k copies of the row."""
    from synthpert.metrics import PerGeneAUROC

    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    genes = rng.choice(list("ABCD"), n)
    y = rng.integers(0, 2, n)
    s = rng.choice([0.1, 0.4, 0.4, 0.8], n)
    w = rng.integers(0, 3, n)
    ours, k = PerGeneAUROC(genes, y, s)(w)
    rep = np.repeat(np.arange(n), w)
    ref, kr = per_gene_auroc(genes[rep], y[rep], s[rep]) if len(rep) else (float("nan"), 0)
    assert k == kr
    if k:
        assert ours == pytest.approx(ref)


def test_bootstrap_gives_auroc_intervals_around_the_estimate():
    rng = np.random.default_rng(2)
    perts = np.repeat([f"p{i}" for i in range(40)], 25)
    genes = np.tile([f"g{i}" for i in range(25)], 40)
    y = list(rng.choice(LABELS, len(perts), p=[0.2, 0.2, 0.6]))
    probs = rng.dirichlet([1, 1, 1], len(perts))
    probs[:, 0] += np.array([lab == UP for lab in y]) * 0.5  # some signal
    probs /= probs.sum(1, keepdims=True)
    m = compute_metrics(y, [LABELS[i] for i in probs.argmax(1)], probs, genes=genes, perturbations=perts,
                        n_bootstrap=100, seed=0)
    for task in ("de", "dir"):
        lo, hi = m["ci"][f"auroc_{task}_per_gene"]
        # 1,000 rows over 40 perturbations: a real interval around the estimate, well under 0.2 wide
        assert lo < m[f"auroc_{task}_per_gene"] < hi and 0 < hi - lo < 0.2


def _probs_with_top(conf, top):
    """Rows whose class `top` has probability `conf` and the other two share the rest."""
    p = np.repeat(((1 - np.asarray(conf)) / 2)[:, None], 3, axis=1)
    p[np.arange(len(top)), top] = conf
    return p


def test_ece_of_calibrated_overconfident_and_hand_computed_probabilities():
    rng = np.random.default_rng(0)
    n = 20000
    conf = rng.uniform(0.4, 1.0, n)
    top = rng.integers(0, 3, n)
    hit = rng.random(n) < conf  # the top class is right exactly as often as it claims
    gold = np.where(hit, top, (top + rng.integers(1, 3, n)) % 3)
    labels = [LABELS[i] for i in gold]
    m = compute_metrics(labels, [LABELS[i] for i in top], _probs_with_top(conf, top))
    assert m["ece"] < 0.02 and m["ece_bins"] == 10

    # Always 98% sure of "up", always wrong: the gap is the whole confidence.
    wrong = compute_metrics([NOT_DE] * 50, [UP] * 50, _probs_with_top(np.full(50, 0.98), np.zeros(50, int)))
    assert wrong["ece"] == pytest.approx(0.98)
    assert wrong["ece_per_class"]["up"] == pytest.approx(0.98)      # P(up) = 0.98, never up
    assert wrong["ece_per_class"]["not_de"] == pytest.approx(0.99)  # P(not DE) = 0.01, always not DE

    # Hand case: bin 0.9-1.0 holds two rows at 0.9, one right (gap 0.4); bin 0.5-0.6 two at 0.55, both right
    # (gap 0.45). ECE = 2/4 * 0.4 + 2/4 * 0.45.
    hand = compute_metrics([UP, DOWN, UP, UP], [UP] * 4, _probs_with_top(np.array([0.9, 0.9, 0.55, 0.55]),
                                                                        np.zeros(4, int)))
    assert hand["ece"] == pytest.approx(0.425)


def test_ece_is_left_out_for_hard_labels():
    m = compute_metrics([UP, DOWN], [UP, UP], genes=["g", "g"])
    assert "ece" not in m and m["probabilities"] == "hard_labels"
