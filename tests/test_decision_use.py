"""The decision rule end to end: `synthpert decide` fits it on validation rows beside the adapter, `synthpert
eval` reports the argmax and decided rows side by side, and the endpoint answers the same decided label."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest

from _live_server import LiveServer

pytestmark = pytest.mark.slow

MAX_NEW = 8


def _inference(model, adapter) -> dict:
    return {"backend": "transformers", "model": str(model), "adapter": str(adapter), "max_new_tokens": MAX_NEW,
            "batch_size": 8}


def test_decide_then_eval_and_serve_apply_the_same_rule(tiny_model_dir, tiny_adapter_dir, tiny_built_dataset,
                                                         tmp_path):
    from synthpert.backends import adapter_version
    from synthpert.config.evaluate import EvalConfig
    from synthpert.config.serve import ServeConfig, ServeSettings
    from synthpert.decision import decision_for, load_decision
    from synthpert.errors import SynthpertError
    from synthpert.evaluate import read_predictions, run_eval
    from synthpert.inference import load_predictor
    from synthpert.serve import create_app

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)  # the session's adapter stays without a decision.json
    shares = json.loads((adapter / "manifest.json").read_text())["class_shares"]
    assert len(shares) == 3 and sum(shares) == pytest.approx(1.0)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "decide", "--model", str(tiny_model_dir),
                        "--adapter", str(adapter), "--dataset", str(tiny_built_dataset), "--n", "24",
                        f"inference.max_new_tokens={MAX_NEW}"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation macro_f1 (24 rows)" in r.stdout and "saved" in r.stdout
    d = load_decision(adapter, adapter_hash=adapter_version(adapter))
    assert d.rule == "tuned" and d.fitted_on["split"] == "validation" and d.fitted_on["n"] == 24
    assert d.fitted_on["objective_value"] >= d.fitted_on["start_objective_value"]

    cfg = EvalConfig(dataset=str(tiny_built_dataset), split="test", n=24, n_bootstrap=0, figures=False,
                     inference=_inference(tiny_model_dir, adapter))
    out = tmp_path / "eval"
    run_eval(cfg, out_dir=out, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decision"]["rule"] == "tuned"
    assert {"strict", "lenient", "scored", "decided"} <= set(metrics["model"])
    assert all(v["row"] == "decided" for v in metrics["verdict"].values())
    report = (out / "report.md").read_text()
    assert "(argmax of class probabilities)" in report and "(decided: tuned rule)" in report
    # calibration is reported wherever class probabilities exist: metrics.json and a report column
    for mode in ("scored", "decided"):
        m = metrics["model"][mode]["overall"]
        assert 0 <= m["ece"] <= 1 and set(m["ece_per_class"]) == {"up", "down", "not_de"}
    assert "| ECE |" in report
    preds = read_predictions(out / "predictions.jsonl")
    ids = sorted(preds)
    probs = np.array([preds[i].prob_vector() for i in ids])
    decided = dict(zip(ids, d.labels_for(probs)))
    gold = {i: preds[i].gold for i in ids}
    acc = np.mean([decided[i] == gold[i] for i in ids])
    assert metrics["model"]["decided"]["overall"]["accuracy"] == pytest.approx(acc)

    # The endpoint, given the same adapter and decision file, answers the same label for the same question.
    predictor = load_predictor(ServeConfig(inference=_inference(tiny_model_dir, adapter)))
    app = create_app(predictor, ServeSettings(), None, decision_for("auto", str(adapter), None))
    with LiveServer(app) as srv:
        for i in ids[:6]:
            p = preds[i]
            body = httpx.post(f"{srv.url}/v1/predict", json={"cell_line": p.cell_line, "perturbation": p.perturbation,
                                                             "gene": p.gene}, timeout=60).json()
            assert body["decision"]["rule"] == "tuned" and body["label"] == decided[i], (body, decided[i])
            assert body["label_generated"] == p.label_lenient
    predictor.backend.close()

    # A decision file fitted for another adapter is refused, naming both.
    raw = json.loads((adapter / "decision.json").read_text())
    raw["adapter_hash"] = "f" * 12
    (adapter / "decision.json").write_text(json.dumps(raw))
    with pytest.raises(SynthpertError, match=r"fitted for adapter ffffffffffff…, not for this adapter"):
        run_eval(cfg, out_dir=tmp_path / "eval2", progress=False)


def test_prior_rule_from_the_trained_class_shares(tiny_model_dir, tiny_adapter_dir, tiny_built_dataset, tmp_path):
    from synthpert.config.evaluate import EvalConfig
    from synthpert.dataset import built_config
    from synthpert.decision import prior_shift
    from synthpert.evaluate import read_predictions, run_eval
    from synthpert.evidence import training_stats

    cfg = EvalConfig(dataset=str(tiny_built_dataset), split="test", n=24, n_bootstrap=0, figures=False,
                     decision="prior", inference=_inference(tiny_model_dir, tiny_adapter_dir))
    out = tmp_path / "eval"
    run_eval(cfg, out_dir=out, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    shares = json.loads((tiny_adapter_dir / "manifest.json").read_text())["class_shares"]
    target = training_stats(built_config(tiny_built_dataset)).global_rate
    expect = prior_shift(shares, target)
    assert metrics["decision"]["rule"] == "prior"
    assert np.allclose(metrics["decision"]["log_offsets"], expect.log_offsets)
    preds = read_predictions(out / "predictions.jsonl")
    ids = sorted(preds)
    labels = expect.labels_for(np.array([preds[i].prob_vector() for i in ids]))
    acc = np.mean([lab == preds[i].gold for lab, i in zip(labels, ids)])
    assert metrics["model"]["decided"]["overall"]["accuracy"] == pytest.approx(acc)


def test_decide_without_validation_rows_is_a_clear_error(tiny_model_dir, tiny_adapter_dir, tmp_path, perturbqa_dir):
    from synthpert.config.data import DataConfig
    from synthpert.data import build

    data = tmp_path / "data"
    build(DataConfig(source=str(perturbqa_dir), val_fraction=0.0, train_subsample={"n": 20},
                     test_subsample={"n": 5}), data)
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "decide", "--model", str(tiny_model_dir),
                        "--adapter", str(tiny_adapter_dir), "--dataset", str(data)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 2 and "no validation rows" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tiny_adapter_dir / "decision.json").exists()
