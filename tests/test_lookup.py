"""The evidence lookup line (train.evidence_lookup): combined's probabilities in the evidence block, cross-fitted
by perturbation fold for training rows, never reading a test label; in prompts at train, eval and serve time."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from synthpert.answer import LABELS
from synthpert.config.data import DataConfig
from synthpert.dataset import load_lines
from synthpert.data import build_frames
from synthpert.evidence import TrainingStats
from synthpert.lookup import evidence_blocks, lookup_line, lookup_probabilities
from synthpert.schema import perturbation_fold

LINES = ["k562", "hepg2"]
LOOKUP = "Model-free estimate from these counts"


@pytest.fixture(scope="module")
def frames(perturbqa_dir):
    cfg = DataConfig(source=str(perturbqa_dir), train_cells=LINES, test_cells=["k562"], val_fraction=0.0)
    fr = build_frames(cfg, load_lines(cfg))
    # a third of the readout genes keeps each fit to a few seconds; every rule below holds per gene
    genes = set(sorted(fr["train"].gene.unique())[::3])
    train = fr["train"][fr["train"].gene.isin(genes)].reset_index(drop=True)
    test = fr["test"][fr["test"].gene.isin(genes)].reset_index(drop=True)
    return train, test, TrainingStats(train)


def _lines(blocks):
    return [b.splitlines()[-1] for b in blocks]


def test_the_lookup_line_of_a_test_prompt_is_combined_and_reads_no_test_label(frames):
    from synthpert.baselines import baseline_predictions, combined_probabilities
    from synthpert.lookup import LOOKUP_SEED

    train, test, stats = frames
    sub = test.sample(2000, random_state=0).reset_index(drop=True)
    blocks = evidence_blocks(stats, sub, lookup=True)
    assert all(LOOKUP in line for line in _lines(blocks))
    shuffled = sub.copy()
    shuffled["label"] = np.random.default_rng(0).permutation(shuffled["label"].to_numpy())
    assert evidence_blocks(stats, shuffled, lookup=True) == blocks
    # a test row's line states exactly the combined baseline's probabilities (the verdict's reference)
    probs = lookup_probabilities(stats, sub)
    assert np.array_equal(probs, combined_probabilities(stats, sub))
    assert _lines(blocks) == [lookup_line(p) for p in probs]
    # an evaluation of a lookup student, whatever its seed, scores that same fit as its combined row
    report = baseline_predictions(stats, sub, LINES, seed=5, combined_seed=LOOKUP_SEED)["combined"]["probs"]
    assert np.array_equal(report, probs)
    assert not np.array_equal(baseline_predictions(stats, sub, LINES, seed=5)["combined"]["probs"], probs)
    assert len(set(_lines(blocks))) > 20  # the line says something different per triple
    off = evidence_blocks(stats, sub.head(50), lookup=False)
    assert not any(LOOKUP in b for b in off) and [f"{b}\n{x}" for b, x in zip(off, _lines(blocks))] == blocks[:50]


def _swap_pair(train: pd.DataFrame):
    """Two training knockdowns of one gene in K562 from the same perturbation fold, one changed, one not."""
    k = train[train.cell_line == "k562"].assign(fold=lambda d: d.perturbation.map(perturbation_fold))
    for (_, _), grp in k.groupby(["gene", "fold"], sort=True):
        changed, unchanged = grp[grp.label != LABELS[2]], grp[grp.label == LABELS[2]]
        if len(changed) and len(unchanged):
            return changed.index[0], unchanged.index[0]
    raise AssertionError("no contrast pair in the fixture")


def test_a_training_examples_lookup_never_comes_from_a_fit_on_its_own_label(frames):
    from synthpert.baselines import combined_probabilities

    train, _, stats = frames
    i, j = _swap_pair(train)
    rows = train.loc[[i, j], ["cell_line", "perturbation", "gene"]].reset_index(drop=True)
    before = lookup_probabilities(stats, rows)
    # Swap their labels: each example's own label flips, while every count that any row's features show stays
    # the same (one gene, one line, one fold). A fit that held either row would move; the cross-fit cannot.
    swapped = train.copy()
    swapped.loc[i, "label"], swapped.loc[j, "label"] = train.loc[j, "label"], train.loc[i, "label"]
    flipped = TrainingStats(swapped)
    assert np.array_equal(lookup_probabilities(flipped, rows), before)
    assert evidence_blocks(flipped, rows, lookup=True) == evidence_blocks(stats, rows, lookup=True)
    # ...and the check can fail: the in-sample combined fit (both rows among its targets) does move
    assert not np.array_equal(combined_probabilities(flipped, rows), combined_probabilities(stats, rows))


def test_training_rows_are_scored_by_the_model_of_the_other_folds(frames):
    from synthpert.baselines import (combined_fit_keys, combined_probabilities, evidence_features, fit_combined,
                                     model_probabilities)

    train, _, stats = frames
    rows = train.sample(300, random_state=2).reset_index(drop=True)
    folds = rows.perturbation.map(perturbation_fold).to_numpy()
    probs = lookup_probabilities(stats, rows)
    f = int(folds[0])
    keys = [k for k in combined_fit_keys(stats) if perturbation_fold(k[1]) != f]
    at = folds == f
    expect = model_probabilities(fit_combined(stats, keys), evidence_features(stats, rows[at]))
    assert np.allclose(probs[at], expect)
    # not combined's in-sample fit: the rows' own fold is out of the model that scores them
    assert not np.allclose(probs[at], combined_probabilities(stats, rows[at]))
    assert np.allclose(probs.sum(axis=1), 1.0)


def test_the_line_is_whole_percents_and_never_states_certainty():
    line = lookup_line([0.042, 0.004, 0.954])
    assert line == ("- Model-free estimate from these counts (logistic regression on the training screens): "
                    "up 4%, down <1%, not DE 95%.")
    assert lookup_line([0.0, 0.001, 0.999]).endswith("up <1%, down <1%, not DE >99%.")


def test_lookup_needs_the_evidence_block():
    from pydantic import ValidationError

    from synthpert.config.train import TrainConfig

    with pytest.raises(ValidationError, match="evidence_lookup .*needs evidence=true"):
        TrainConfig(evidence_lookup=True)
    assert TrainConfig(evidence=True, evidence_lookup=True).evidence_lookup


def test_verdict_compares_a_lookup_student_with_combined_first():
    from synthpert.report import verdict_summary
    from synthpert.verdict import verdict

    m = {"model": {"strict": {"overall": {"macro_f1": 0.50}}},
         "baselines": {"majority": {"overall": {"macro_f1": 0.30}}, "combined": {"overall": {"macro_f1": 0.45}},
                       "gene_prior": {"overall": {"macro_f1": 0.55}}}}
    plain = verdict(m)["macro_f1"]
    assert plain["best_baseline"] == "gene_prior" and plain["outcome"] == "trails" and plain["reference"] == "best"
    looked = verdict({**m, "evidence_lookup": True})["macro_f1"]
    assert looked["best_baseline"] == "combined" and looked["outcome"] == "beats" and looked["reference"] == "lookup"
    assert "combined (the lookup in its prompt)" in verdict_summary({"macro_f1": looked})


@pytest.mark.slow
def test_train_and_eval_with_the_lookup(tiny_model_dir, tiny_built_dataset, tmp_path, monkeypatch):
    from synthpert.config.evaluate import EvalConfig
    from synthpert.config.train import TrainConfig
    from synthpert.evaluate import run_eval
    from synthpert.inference import Predictor
    from synthpert.train import run_train
    from synthpert.train_data import training_examples

    def cfg(lookup: bool) -> TrainConfig:
        return TrainConfig.model_validate({
            "base_model": str(tiny_model_dir), "mode": "label_only", "data_path": str(tiny_built_dataset),
            "evidence": True, "evidence_lookup": lookup, "max_length": 768, "eval_fraction": 0.0,
            "max_examples": 16, "logging_steps": 1, "lora": {"r": 4, "alpha": 8},
            "optim": {"lr": 1e-2, "epochs": 1, "batch_size": 8, "grad_accum": 1, "warmup": 0.0}})

    on = training_examples(cfg(True), tiny_built_dataset)
    off = training_examples(cfg(False), tiny_built_dataset)
    assert all(LOOKUP in r["prompt"][1]["content"] for r in on["train"] + on["eval"])
    assert not any(LOOKUP in r["prompt"][1]["content"] for r in off["train"])
    run_train(cfg(True), tiny_built_dataset, tmp_path / "adapter")
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert manifest["evidence"] is True and manifest["evidence_lookup"] is True

    seen: list[str | None] = []
    original = Predictor.predict

    def recording(self, triples, *a, **kw):
        seen.extend(t.evidence for t in triples)
        return original(self, triples, *a, **kw)

    monkeypatch.setattr(Predictor, "predict", recording)
    ecfg = EvalConfig(dataset=str(tiny_built_dataset), n=8, n_bootstrap=0, figures=False, seed=3,
                      inference={"model": str(tiny_model_dir), "adapter": str(tmp_path / "adapter"),
                                 "max_new_tokens": 6, "batch_size": 8})
    run_eval(ecfg, out_dir=tmp_path / "eval", progress=False)
    assert len(seen) == 8 and all(e and LOOKUP in e for e in seen)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["evidence_lookup"] is True and metrics["run"]["evidence_lookup"] is True
    assert metrics["verdict"] and all(v["reference"] == "lookup" for v in metrics["verdict"].values())
    assert "combined, whose probabilities its prompt states" in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.parametrize("lookup", [True, False])
def test_serve_shows_the_line_iff_the_adapter_was_trained_with_it(frames, tmp_path, lookup):
    import httpx
    from _fake_predictor import FakePredictor
    from _live_server import LiveServer

    from synthpert.config.serve import ServeSettings
    from synthpert.serve import create_app

    _, test, stats = frames
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "manifest.json").write_text(json.dumps({"evidence": True, "evidence_lookup": lookup}))
    predictor = FakePredictor()
    predictor.cfg = predictor.cfg.model_copy(update={"adapter": str(adapter)})
    asked = []
    answer = predictor.predict
    predictor.predict = lambda triples, *a, **kw: asked.extend(triples) or answer(triples, *a, **kw)
    row = test.iloc[0]
    with LiveServer(create_app(predictor, ServeSettings(), evidence_stats=stats)) as srv:
        r = httpx.post(f"{srv.url}/v1/predict", timeout=60,
                       json={"cell_line": row.cell_line, "perturbation": row.perturbation, "gene": row.gene})
    assert r.status_code == 200, r.text
    [block] = evidence_blocks(stats, test.iloc[:1], lookup)
    assert [t.evidence for t in asked] == [block] and (LOOKUP in block) == lookup
