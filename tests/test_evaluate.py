"""`synthpert eval`: resumable predictions, metrics equal to a recomputation, report and figures."""

from __future__ import annotations

import json
import math

import pytest

from fake_openai_server import FakeOpenAIServer


def _eval_cfg(dataset, base_url, **kw):
    from synthpert.config.evaluate import EvalConfig

    inference = {"backend": "openai", "model": "fake-model", "base_url": base_url, "api_key_env": "FAKE_KEY",
                 "max_new_tokens": 64, "concurrency": 4, **kw.pop("inference", {})}
    return EvalConfig(dataset=str(dataset), n=kw.pop("n", 24), seed=3, n_bootstrap=20, chunk_size=8,
                      inference=inference, **kw)


def _label_cycle(body, index):
    """Answers that depend on the question (so the metrics are not trivial): a gene-name hash picks the label."""
    from fake_openai_server import LABELS, _last_user_text

    import re

    q = re.search(r"on the (\S+) gene", _last_user_text(body))
    label = LABELS[sum(map(ord, q.group(1))) % 3] if q else LABELS[2]
    return f"<think>\nreasoning about {q.group(1) if q else '?'}\n</think>\n<answer>{label}</answer>"


def _same(a, b, path=""):
    """Deep equality with float tolerance (a recomputation may differ in the last bits)."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_eval_resumes_after_interruption_without_duplicates(tiny_built_dataset, tmp_path, monkeypatch):
    from synthpert import inference
    from synthpert.evaluate import run_eval

    monkeypatch.setenv("FAKE_KEY", "k")
    out = tmp_path / "ev"
    with FakeOpenAIServer(responder=_label_cycle) as srv:
        cfg = _eval_cfg(tiny_built_dataset, srv.base_url)
        calls = {"n": 0}
        real = inference.Predictor.predict

        def dying(self, triples, n_samples=None):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the third chunk
            return real(self, triples, n_samples)

        monkeypatch.setattr(inference.Predictor, "predict", dying)
        with pytest.raises(KeyboardInterrupt):
            run_eval(cfg, out_dir=out, progress=False)
        lines = (out / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 16  # two finished chunks of 8 were kept
        with open(out / "predictions.jsonl", "a") as f:  # and a torn write of a third
            f.write(lines[0][: len(lines[0]) // 2])
        monkeypatch.setattr(inference.Predictor, "predict", real)
        sent_before = len(srv.received)
        summary = run_eval(cfg, out_dir=out, progress=False)
        assert len(srv.received) - sent_before == 24 - 16  # only the missing examples were asked
    ids = [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 24
    assert summary["complete"] and summary["n"] == 24
    # a rerun has nothing left to do and rewrites identical metrics
    before = (out / "metrics.json").read_text()
    with FakeOpenAIServer(responder=_label_cycle) as srv2:
        run_eval(_eval_cfg(tiny_built_dataset, srv2.base_url).model_copy(
            update={"inference": cfg.inference.model_copy(update={"base_url": srv.base_url})}), out_dir=out,
            progress=False)
        assert srv2.received == []
    after = json.loads((out / "metrics.json").read_text())
    assert _strip_times(json.loads(before)) == _strip_times(after)


def _strip_times(m):
    m = dict(m)
    m.pop("client", None)
    return m


def test_metrics_json_equals_recomputation_from_predictions(tiny_built_dataset, tmp_path, monkeypatch):
    from synthpert.baselines import baseline_report, score_predictions
    from synthpert.config.data import SubsampleConfig
    from synthpert.dataset import load_built
    from synthpert.sampling import subsample
    from synthpert.evaluate import run_eval
    from synthpert.evidence import dataset_training_stats
    from synthpert.schema import jsonable

    monkeypatch.setenv("FAKE_KEY", "k")
    out = tmp_path / "ev"
    with FakeOpenAIServer(responder=_label_cycle) as srv:
        run_eval(_eval_cfg(tiny_built_dataset, srv.base_url, n=30), out_dir=out, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    preds = {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    test = subsample(load_built(tiny_built_dataset, "test").to_pandas(), SubsampleConfig(n=30), 3)
    test["pert_seen_in_train_lines"] = test["pert_seen_in_train_lines"].map(list)
    assert set(preds) == set(test["id"])
    for mode in ("strict", "lenient"):
        labels = [preds[i][f"label_{mode}"] for i in test["id"]]
        # one sample per example: hard labels, and the records say so
        assert {preds[i]["probability_method"] for i in test["id"]} == {"hard_label"}
        expect = jsonable(score_predictions(test, labels, None, n_bootstrap=20, seed=3))
        _same(metrics["model"][mode], expect, mode)
    # the labels really vary, so the metrics are not a trivial constant
    assert 0 < metrics["model"]["strict"]["overall"]["accuracy"] < 1
    stats = dataset_training_stats(tiny_built_dataset)
    _same(metrics["baselines"], jsonable(baseline_report(stats, test, ["k562"], n_bootstrap=20, seed=3)), "baselines")
    report = (out / "report.md").read_text()
    for name in ("majority", "gene_prior", "gene_prior_balanced", "macro-F1", "AUROC DE", "Verdict", "hard labels"):
        assert name in report
    # the verdict section says, metric by metric, what metrics.json's verdict computed
    assert metrics["verdict"], "the verdict compared no headline metric"
    for metric, v in metrics["verdict"].items():
        line = next(x for x in report.splitlines() if x.startswith(f"- {metric}: model "))
        assert f"{v['model']:.3f} vs best baseline {v['best_baseline']} {v['baseline']:.3f}" in line
        assert ("**beats it**" in line) == v["beats"] and ("**does not beat it**" in line) == (not v["beats"])
    for fig in ("confusion_matrix", "per_class_f1", "calibration"):
        png = out / "figures" / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{fig}.png" in report
    run = metrics["run"]
    assert run["prompt_sha256"] and run["sampling"]["seed"] == 0 and run["versions"]["openai"]


def test_votes_over_samples_give_probabilities(tiny_built_dataset, tmp_path, monkeypatch):
    from synthpert.evaluate import run_eval

    monkeypatch.setenv("FAKE_KEY", "k")
    labels = ["upregulated", "upregulated", "not differentially expressed", "bogus"]
    # the fake server answers each choice of an n=4 request in turn
    with FakeOpenAIServer(responder=lambda body, i: f"<answer>{labels[i % 4]}</answer>") as srv:
        cfg = _eval_cfg(tiny_built_dataset, srv.base_url, n=6,
                        inference={"n_samples": 4, "temperature": 0.8})
        run_eval(cfg, out_dir=tmp_path / "v", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "v" / "predictions.jsonl").read_text().splitlines()]
    for r in recs:
        assert r["probability_method"] == "votes" and len(r["samples"]) == 4
        assert r["probabilities"] == pytest.approx({"up": 2 / 3, "down": 0, "not_de": 1 / 3})
        assert r["label_strict"] == "upregulated"
    m = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert m["probability_method"] == "votes" and m["model"]["strict"]["overall"]["probabilities"] == "scores"


def test_rerun_with_other_settings_is_refused(tiny_built_dataset, tmp_path, monkeypatch):
    from synthpert.errors import SynthpertError
    from synthpert.evaluate import run_eval

    monkeypatch.setenv("FAKE_KEY", "k")
    with FakeOpenAIServer(responder=_label_cycle) as srv:
        run_eval(_eval_cfg(tiny_built_dataset, srv.base_url, n=4), out_dir=tmp_path / "e", progress=False)
        with pytest.raises(SynthpertError, match="different settings"):
            run_eval(_eval_cfg(tiny_built_dataset, srv.base_url, n=4, inference={"temperature": 0.5}),
                     out_dir=tmp_path / "e", progress=False)


def test_cli_eval_config_and_overrides(tiny_built_dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from synthpert.cli.main import app

    monkeypatch.setenv("FAKE_KEY", "k")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("eval:\n  n: 5\n  n_bootstrap: 0\n  inference:\n    backend: openai\n    api_key_env: FAKE_KEY\n")
    with FakeOpenAIServer(responder=_label_cycle) as srv:
        res = CliRunner().invoke(app, ["eval", "-c", str(cfg), "--dataset", str(tiny_built_dataset), "--model",
                                       "fake-model", "--base-url", srv.base_url, "--out", str(tmp_path / "o"),
                                       "inference.max_new_tokens=32"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["n_predicted"] == 5
    run = json.loads((tmp_path / "o" / "eval_run.json").read_text())
    assert run["sampling"]["max_new_tokens"] == 32 and "k" not in json.dumps(run).split('"FAKE_KEY"')[0][-3:]
    bad = CliRunner().invoke(app, ["eval", "-c", str(cfg), "--dataset", str(tiny_built_dataset), "--model", "m",
                                   "--out", str(tmp_path / "x"), "inference.max_new_tokenz=3"])
    assert bad.exit_code != 0 and "max_new_tokens" in str(bad.exception)


@pytest.mark.slow
def test_zero_shot_transformers_eval_with_evidence(tiny_built_dataset, tiny_model_dir, tmp_path):
    from synthpert.config.evaluate import EvalConfig
    from synthpert.evaluate import run_eval

    cfg = EvalConfig(dataset=str(tiny_built_dataset), n=8, evidence=True, n_bootstrap=0,
                     inference={"model": str(tiny_model_dir), "max_new_tokens": 6, "batch_size": 4})
    s = run_eval(cfg, out_dir=tmp_path / "zs", progress=False)
    assert s["n"] == 8 and s["probability_method"] == "answer_logprob"
    recs = [json.loads(x) for x in (tmp_path / "zs" / "predictions.jsonl").read_text().splitlines()]
    for r in recs:
        assert sum(r["probabilities"].values()) == pytest.approx(1)
        assert r["prompt_tokens"] > 50 and 0 < r["completion_tokens"] <= 6
        assert r["adapter"] is None
    report = (tmp_path / "zs" / "report.md").read_text()
    assert "zero-shot" in report and "evidence context: True" in report
    m = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert m["run"]["backend_info"]["chat_template_sha256"] and m["run"]["versions"]["transformers"]


def test_the_verdict_summary_names_what_the_model_clears():
    from synthpert.report import verdict_summary

    def v(beats, over):
        return {"beats": beats, "best_baseline": "combined", "beats_majority": over}

    assert verdict_summary({"macro_f1": v(True, True), "auroc": v(True, True)}) == \
        "The model beats the best baseline on every headline metric."
    assert verdict_summary({"macro_f1": v(True, True), "auroc": v(False, True)}) == \
        "The model beats the best baseline on macro_f1 but not on auroc."
    # below every best baseline but above always-"not DE": say so, not "beats nothing"
    assert verdict_summary({"macro_f1": v(False, True), "auroc": v(False, False)}).endswith(
        'beats always-"not DE" (majority) on macro_f1.')
    assert verdict_summary({"macro_f1": v(False, False)}).endswith('nor always-"not DE" (majority).')


def test_predictions_run_shortest_prompt_first_in_a_stable_order():
    import pandas as pd

    from synthpert.evaluate import shortest_first

    rows = pd.DataFrame({"perturbation": ["AARS", "B", "CC", "D"], "gene": ["G1", "G2", "G3", "G4"]})
    evidence = ["x" * 30, "x" * 10, None, "x" * 12]
    # sizes 36, 13, 4, 14: shortest first; equal sizes keep the file order (a resumed run takes the same order)
    assert shortest_first(rows, evidence) == [2, 1, 3, 0]
    assert shortest_first(rows.iloc[[1, 3]], ["x" * 11, "x" * 11]) == [0, 1]


def _metrics(model: float, ci, baseline: float, baseline_ci=None, majority: float = 0.2) -> dict:
    """metrics.json's shape, as far as the verdict reads it."""
    return {"model": {"strict": {"overall": {"macro_f1": model, "accuracy": 0.81, "ci": {"macro_f1": ci,
                                                                                          "accuracy": [0.80, 0.82]}}}},
            "baselines": {"majority": {"overall": {"macro_f1": majority, "accuracy": 0.866,
                                                   "ci": {"accuracy": [0.86, 0.87]}}},
                          "gene_prior": {"overall": {"macro_f1": baseline,
                                                     "ci": {"macro_f1": baseline_ci} if baseline_ci else {}}}}}


def test_a_verdict_does_not_say_beats_when_the_intervals_overlap():
    """The 24-pair case of issue 27: 0.302 [0.18, 0.50] against 0.267 is no difference."""
    from synthpert.report import outcome_words
    from synthpert.verdict import verdict

    v = verdict(_metrics(0.302, [0.18, 0.50], 0.267))["macro_f1"]
    assert v["outcome"] == "within" and v["beats"] is False
    words = outcome_words(v["outcome"], bold=True)
    assert "beats" not in words and "within the 95% interval" in words
    assert verdict(_metrics(0.302, [0.28, 0.33], 0.267))["macro_f1"]["beats"] is True
    # the baseline's own interval counts too
    assert verdict(_metrics(0.302, [0.28, 0.33], 0.267, [0.25, 0.29]))["macro_f1"]["outcome"] == "within"
    assert verdict(_metrics(0.20, [0.18, 0.22], 0.267))["macro_f1"]["outcome"] == "trails"
    # beating always-"not DE" follows the same rule
    assert verdict(_metrics(0.302, [0.18, 0.50], 0.4, majority=0.25))["macro_f1"]["beats_majority"] is False


def test_the_report_states_accuracy_against_always_not_de():
    """Above majority on macro-F1, below it on accuracy (K562 0.812 vs 0.866): the report says both."""
    from synthpert.verdict import accuracy_vs_majority

    acc = accuracy_vs_majority(_metrics(0.47, [0.46, 0.49], 0.7))
    assert acc["outcome"] == "trails" and acc["model"] == 0.81 and acc["majority"] == 0.866
