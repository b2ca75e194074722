"""Decision rules from class probabilities: prior shift is the Bayes decision under a changed prior, tuned
offsets are fitted on validation rows only, and decision.json is validated and bound to its adapter."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from synthpert.answer import LABELS
from synthpert.decision import (
    Decision,
    ValidationRows,
    class_shares,
    em_target_prior,
    fit_tuned,
    load_decision,
    objective_value,
    prior_shift,
    save_decision,
)
from synthpert.errors import SynthpertError

MEANS = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 0.0]])  # up, down, not DE: overlapping Gaussians


def _posteriors(x: np.ndarray, prior: np.ndarray) -> np.ndarray:
    loglik = -0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(axis=2)
    w = np.exp(loglik) * prior
    return w / w.sum(axis=1, keepdims=True)


def _sample(n: int, prior: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=prior)
    return MEANS[y] + rng.normal(size=(n, 2)), y


UNIFORM = np.full(3, 1 / 3)
TARGET = np.array([0.11, 0.03, 0.86])  # PerturbQA-like: mostly not DE


def test_prior_shift_is_the_bayes_decision_under_the_target_prior():
    x, y = _sample(20000, TARGET, seed=0)
    p_model = _posteriors(x, UNIFORM)  # what a model trained on balanced rows estimates
    bayes = _posteriors(x, TARGET).argmax(axis=1)
    d = prior_shift(UNIFORM, TARGET)
    assert (d.apply(p_model) == bayes).all()
    assert np.allclose(d.adjusted(p_model), _posteriors(x, TARGET), atol=1e-9)
    # and it pays: more accurate than the balanced model's argmax on target-distributed inputs
    assert (d.apply(p_model) == y).mean() > (p_model.argmax(axis=1) == y).mean() + 0.05


def test_em_estimates_the_target_prior_from_unlabelled_inputs():
    x, _ = _sample(20000, TARGET, seed=1)
    est = em_target_prior(_posteriors(x, UNIFORM), UNIFORM)
    assert np.allclose(est, TARGET, atol=0.02)


def test_tuned_offsets_improve_validation_macro_f1_and_never_lose_to_their_start():
    x, y = _sample(6000, TARGET, seed=2)
    p = _posteriors(x, UNIFORM)
    val = ValidationRows.from_rows(p, [LABELS[i] for i in y], ["validation"] * len(y), source="synthetic")
    start = prior_shift(UNIFORM, TARGET)
    tuned = fit_tuned(val, "macro_f1", start=start)
    f1 = lambda d: objective_value(y, d.apply(p), "macro_f1")  # noqa: E731
    assert tuned.rule == "tuned" and tuned.fitted_on["split"] == "validation" and tuned.fitted_on["n"] == 6000
    assert f1(tuned) >= f1(start) and f1(tuned) > objective_value(y, p.argmax(axis=1), "macro_f1")
    assert tuned.fitted_on["objective_value"] == pytest.approx(f1(tuned), abs=1e-6)
    # generalises: on fresh rows from the same distribution it still beats the model's own argmax
    x2, y2 = _sample(6000, TARGET, seed=3)
    p2 = _posteriors(x2, UNIFORM)
    assert objective_value(y2, tuned.apply(p2), "macro_f1") > objective_value(y2, p2.argmax(axis=1), "macro_f1")


def test_tuned_cannot_be_fitted_on_test_rows():
    p = np.full((4, 3), 1 / 3)
    labels = [LABELS[0], LABELS[1], LABELS[2], LABELS[2]]
    with pytest.raises(SynthpertError, match="validation rows only.*test"):
        ValidationRows.from_rows(p, labels, ["validation", "validation", "test", "validation"])
    with pytest.raises(SynthpertError, match="takes ValidationRows"):
        fit_tuned((p, labels))  # raw arrays are refused
    # the signature admits no labels except through ValidationRows
    params = inspect.signature(fit_tuned).parameters
    assert list(params)[0] == "validation" and not {"labels", "y", "y_true"} & set(params)
    with pytest.raises(SynthpertError, match="no validation rows.*val_fraction"):
        ValidationRows.from_rows(np.zeros((0, 3)), [], [])
    with pytest.raises(SynthpertError, match="did you mean 'macro_f1'"):
        fit_tuned(ValidationRows.from_rows(p, labels, ["validation"] * 4), objective="macro-f1")


def test_class_shares_and_bad_priors_are_named():
    assert class_shares([LABELS[2]] * 3 + [LABELS[0]]) == [0.25, 0.0, 0.75]
    with pytest.raises(SynthpertError, match="unknown class label"):
        class_shares(["up"])
    with pytest.raises(SynthpertError, match="pi_target must be"):
        prior_shift(UNIFORM, [0.5, 0.5, 0.5])


def test_decision_file_round_trip_and_bad_files(tmp_path):
    d = prior_shift(UNIFORM, TARGET).model_copy(update={"adapter_hash": "a" * 64})
    save_decision(d, tmp_path)
    back = load_decision(tmp_path, adapter_hash="a" * 64)
    assert back == d
    with pytest.raises(SynthpertError, match=r"fitted for adapter aaaaaaaaaaaa…, not for this adapter bbbbbbbbbbbb…"):
        load_decision(tmp_path, adapter_hash="b" * 64)
    with pytest.raises(SynthpertError, match=r"no decision file .*decision.json; refit"):
        load_decision(tmp_path / "elsewhere")
    (tmp_path / "decision.json").write_text("{not json")
    with pytest.raises(SynthpertError, match="decision.json is not valid JSON.*refit"):
        load_decision(tmp_path)
    (tmp_path / "decision.json").write_text(json.dumps({"rule": "prio", "log_offsets": [0, 0, 0]}))
    with pytest.raises(SynthpertError, match="did you mean 'prior'"):
        load_decision(tmp_path)
    (tmp_path / "decision.json").write_text(json.dumps({"rule": "tuned", "log_offsets": [0, 1]}))
    with pytest.raises(SynthpertError, match="log_offsets.*3 finite numbers"):
        load_decision(tmp_path)


def test_argmax_rule_is_the_models_own_answer():
    p = np.array([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])
    assert Decision().labels_for(p) == [LABELS[0], LABELS[2], LABELS[1]]
    with pytest.raises(SynthpertError, match=r"shape \(n, 3\)"):
        Decision().apply(np.ones((2, 2)))
