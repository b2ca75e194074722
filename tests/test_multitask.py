"""The multitask student (distilling step-by-step): each kept trace trains an answer-at-once task and an
explain-then-answer task; evaluation asks the answer task, so class probabilities come before any reasoning."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_multitask_trains_both_tasks_and_predicts_with_the_answer_task(tiny_model_dir, tiny_traces_path,
                                                                       tiny_built_dataset, tmp_path):
    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig
    from synthpert.config.train import TrainConfig
    from synthpert.inference import Predictor, Triple
    from synthpert.train import run_train
    from synthpert.train_data import training_examples

    cfg = TrainConfig.model_validate({
        "base_model": str(tiny_model_dir), "mode": "multitask", "max_length": 512, "seed": 0, "eval_fraction": 0.1,
        "max_examples": 40, "logging_steps": 2, "lora": {"r": 8, "alpha": 16},
        "optim": {"lr": 1e-2, "epochs": 1, "batch_size": 8, "grad_accum": 1, "warmup": 0.0}})
    ex = training_examples(cfg, tiny_traces_path)
    tasks = [r["task"] for r in ex["train"]]
    assert tasks.count("answer") == tasks.count("explain") == len(tasks) // 2
    for r in ex["train"]:
        user = r["prompt"][-1]["content"]
        if r["task"] == "answer":
            assert "Answer at once" in user and "<think>" not in r["assistant"] and "<answer>" in r["assistant"]
        else:
            assert "Answer at once" not in user and "<think>" in r["assistant"]
    # both tasks of a triple sit on the same side of the eval hold-out
    groups = lambda rows: {(r["cell_line"], r["perturbation"]) for r in rows}  # noqa: E731
    assert not groups(ex["train"]) & groups(ex["eval"])

    out = tmp_path / "mt"
    summary = run_train(cfg, tiny_traces_path, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "multitask" and summary["n_train"] == len(ex["train"])

    backend = make_backend(InferenceConfig(backend="transformers", model=str(tiny_model_dir), adapter=str(out),
                                           max_new_tokens=8))
    try:
        predictor = Predictor(backend)
        assert predictor.task == "answer"
        t = Triple("k562:MYC:GAPDH", "k562", "MYC", "GAPDH", None, None)
        [p] = predictor.predict([t])
        assert p.probability_method == "answer_logprob" and abs(sum(p.probabilities.values()) - 1) < 1e-6
        assert p.reasoning in (None, "") and p.explanation_label is None  # no explanation unless asked
        # asked: the explain task writes one after the answer; the probabilities are the answer task's
        backend.cfg.explain_max_new_tokens = 48
        [e] = predictor.predict([t], explain=True)
        assert e.probabilities == pytest.approx(p.probabilities) and e.raw_text == p.raw_text
        assert e.reasoning and e.completion_tokens > p.completion_tokens
        from synthpert.inference import answer_record

        rec = answer_record(e, None, None, return_reasoning=True)
        assert rec["reasoning"] == e.reasoning
        if e.explanation_label not in (None, rec["label"]):
            assert any("the explanation concludes" in w for w in rec["warnings"])
    finally:
        backend.close()
    # a reasoning adapter keeps asking for reasoning
    from synthpert.runs import adapter_manifest

    assert adapter_manifest(out)["mode"] == "multitask"


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_explain_fraction_keeps_every_answer_task_and_a_seeded_share_of_explanations(tiny_traces_path, fraction):
    from synthpert.config.train import TrainConfig
    from synthpert.train_data import training_examples

    cfg = TrainConfig.model_validate({"base_model": "unused", "mode": "multitask", "explain_fraction": fraction,
                                      "eval_fraction": 0.0, "seed": 3})
    rows = training_examples(cfg, tiny_traces_path)["train"]
    answers = [(r["cell_line"], r["perturbation"], r["gene"]) for r in rows if r["task"] == "answer"]
    explains = [(r["cell_line"], r["perturbation"], r["gene"]) for r in rows if r["task"] == "explain"]
    assert len(set(answers)) == len(answers) > 0
    assert len(explains) == round(fraction * len(answers)) and set(explains) <= set(answers)
    again = training_examples(cfg, tiny_traces_path)["train"]
    assert explains == [(r["cell_line"], r["perturbation"], r["gene"]) for r in again if r["task"] == "explain"]


def test_explain_fraction_is_ignored_outside_multitask(tiny_traces_path):
    """The quickstart sets explain_fraction; switching it to another mode with one override must still run."""
    from synthpert.config.train import TrainConfig
    from synthpert.train_data import training_examples

    cfg = TrainConfig.model_validate({"base_model": "unused", "mode": "reasoning", "explain_fraction": 0.25,
                                      "eval_fraction": 0.0, "seed": 3})
    rows = training_examples(cfg, tiny_traces_path)["train"]
    assert rows and all(r.get("task") is None for r in rows)
    full = training_examples(cfg.model_copy(update={"explain_fraction": 1.0}), tiny_traces_path)["train"]
    assert [r["assistant"] for r in rows] == [r["assistant"] for r in full]


def test_an_explanation_that_argues_for_another_label_is_flagged():
    from synthpert.inference import answer_record
    from synthpert.schema import Prediction

    p = Prediction(id="x", cell_line="k562", perturbation="A", gene="B", raw_text="<answer>up</answer>",
                   reasoning="because", explanation_label="downregulated", label_strict="upregulated",
                   label_lenient="upregulated", probabilities={"up": 0.6, "down": 0.3, "not_de": 0.1})
    rec = answer_record(p, None, None, return_reasoning=True)
    assert rec["label"] == "upregulated" and rec["reasoning"] == "because"
    assert any("explanation concludes 'downregulated'" in w for w in rec["warnings"])
    assert answer_record(p.model_copy(update={"explanation_label": "upregulated"}), None, None, True)["warnings"] == []
    assert answer_record(p, None, None, return_reasoning=False)["warnings"] == []
