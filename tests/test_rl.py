"""`synthpert rl`: reward values, load-time refusals, the real GRPOTrainer on the tiny model (adapter moves,
manifest, resume) and a learnable toy where the correctness reward rises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synthpert.answer import DOWN, NOT_DE, UP, format_answer
from synthpert.errors import SynthpertError


@pytest.fixture(scope="module")
def answer_adapter(tmp_path_factory, tiny_model_dir, tiny_built_dataset):
    """A label_only SFT adapter: completions of ~7 tokens keep GRPO rollouts cheap on CPU."""
    from synthpert.config.train import TrainConfig
    from synthpert.train import run_train

    cfg = TrainConfig.model_validate({
        "base_model": str(tiny_model_dir), "mode": "label_only", "max_length": 512, "eval_fraction": 0.0,
        "logging_steps": 5, "seed": 0, "lora": {"r": 8, "alpha": 16},
        "optim": {"lr": 1e-2, "epochs": 2, "batch_size": 8, "grad_accum": 1, "warmup": 0.0}})
    out = tmp_path_factory.mktemp("sft") / "run"
    run_train(cfg, tiny_built_dataset, out)
    return out


ROOT = Path(__file__).resolve().parents[1]


def _cfg(adapter, dataset, **kw):
    """configs/rl_tiny.yaml, shrunk to a few CPU seconds."""
    from synthpert.config import load_section
    from synthpert.config.rl import RLConfig

    cfg = load_section(RLConfig, "rl", ROOT / "configs" / "rl_tiny.yaml")
    base = {"adapter": str(adapter), "dataset_dir": str(dataset), "max_completion_length": 12, "max_steps": 2,
            "save_steps": 2, "max_prompts": 16}
    return RLConfig.model_validate({**cfg.model_dump(), **base, **kw})


def _tensorboard_scalars(log_dir) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# Rewards on known completions


def test_correctness_pays_each_class_its_inverse_frequency_weight_and_nothing_when_wrong_or_unparseable():
    from synthpert.config.rl import RewardSettings
    from synthpert.rewards import class_weights, reward_functions

    shares = [0.25, 0.125, 0.625]  # up, down, not DE
    w = class_weights(RewardSettings(), shares)
    assert w == pytest.approx({UP: 4 / 3, DOWN: 8 / 3, NOT_DE: 1 / 1.875})
    correctness, fmt = reward_functions(RewardSettings(), shares, 12)
    completions = [[{"role": "assistant", "content": format_answer(UP)}],
                   [{"role": "assistant", "content": format_answer(DOWN)}],
                   [{"role": "assistant", "content": format_answer(NOT_DE)}],
                   [{"role": "assistant", "content": format_answer(UP)}],        # wrong
                   [{"role": "assistant", "content": "it goes up, I think"}],     # unparseable
                   [{"role": "assistant", "content": "<answer> Downregulated </answer>"}]]  # lenient only
    labels = [UP, DOWN, NOT_DE, DOWN, UP, DOWN]
    assert correctness(completions=completions, label=labels) == pytest.approx(
        [4 / 3, 8 / 3, 1 / 1.875, 0.0, 0.0, 8 / 3])
    assert fmt(completions=completions, label=labels) == [0.5, 0.5, 0.5, 0.5, 0.0, 0.0]
    # a perfect model's mean correctness over prompts with these shares is 1, whatever the mix
    assert sum(s * w[c] for s, c in zip(shares, (UP, DOWN, NOT_DE))) == pytest.approx(1.0)


def test_aroma_preset_overrides_and_length_penalty():
    from synthpert.config.rl import RewardSettings
    from synthpert.rewards import reward_functions

    s = RewardSettings(preset="aroma", correct={"down": 7}, length_penalty=1.0)
    correctness, fmt, length = reward_functions(s, None, 10)
    texts = [format_answer(UP), format_answer(DOWN), format_answer(NOT_DE), "no idea"]
    assert correctness(completions=texts, label=[UP, DOWN, UP, UP]) == [5.0, 7.0, -1.0, -1.0]
    assert length(completions=texts, completion_ids=[[1] * 5, [1] * 10, [], [1]]) == pytest.approx(
        [-0.5, -1.0, 0.0, -0.1])
    assert [f.__name__ for f in (correctness, fmt, length)] == ["correctness", "format", "length"]


# ---------------------------------------------------------------------------------------------------------
# Refusals before any model loads


@pytest.mark.parametrize("overrides, message", [
    ({"num_generations": 3}, "not a multiple of num_generations=3"),
    ({"generation_batch_size": 12, "num_generations": 8}, "not a multiple of num_generations=8"),
    ({"rewards": {"correct": {"up": 1, "sideways": 2}}}, "sideways"),
    ({"split": "test"}, "training split only"),
])
def test_config_rejects_bad_combinations_at_load(overrides, message):
    from pydantic import ValidationError

    from synthpert.config.rl import RLConfig

    with pytest.raises(ValidationError, match=message):
        RLConfig.model_validate({"num_generations": 4, "batch_size": 8, **overrides})


def _fake_sft_run(folder, base):
    """What sft_run reads of a `synthpert train` folder, without training one."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (folder / "manifest.json").write_text(json.dumps({"synthpert_stage": "train", "base_model": str(base),
                                                      "mode": "label_only", "evidence": False}))
    return folder


def test_missing_or_foreign_sft_adapter_and_held_out_prompts_are_refused(tiny_model_dir, tiny_built_dataset,
                                                                          tmp_path):
    from synthpert.dataset import load_built
    from synthpert.rl import check_vllm, prompt_rows, sft_run

    with pytest.raises(SynthpertError, match="not found"):
        sft_run(_cfg(tmp_path / "nowhere", tiny_built_dataset))
    adapter = _fake_sft_run(tmp_path / "sft", tiny_model_dir)
    assert sft_run(_cfg(adapter, tiny_built_dataset))[2] == str(tiny_model_dir)
    other = tmp_path / "other_model"
    other.mkdir()
    with pytest.raises(SynthpertError) as e:
        sft_run(_cfg(adapter, tiny_built_dataset, base_model=str(other)))
    assert str(tiny_model_dir) in str(e.value) and str(other) in str(e.value)

    assert prompt_rows(_cfg(adapter, tiny_built_dataset, max_prompts=None)) == [
        {k: r[k] for k in ("cell_line", "perturbation", "gene", "label")}
        for r in load_built(tiny_built_dataset, "train")]
    test_row = load_built(tiny_built_dataset, "test")[0]
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text(json.dumps(test_row) + "\n")
    with pytest.raises(SynthpertError, match="held-out splits.*test"):
        prompt_rows(_cfg(adapter, tiny_built_dataset, prompts_path=str(leaky)))

    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SynthpertError, match="use_vllm"):
            check_vllm(_cfg(adapter, tiny_built_dataset, use_vllm=True))


def test_8b_vllm_config_loads_and_needs_a_gpu(tiny_model_dir, tiny_built_dataset, tmp_path):
    from synthpert.config import load_section
    from synthpert.config.rl import RLConfig
    from synthpert.rl import check_vllm

    cfg = load_section(RLConfig, "rl", ROOT / "configs" / "rl_8b_vllm.yaml")
    assert cfg.use_vllm and cfg.vllm_mode == "colocate" and cfg.scale_rewards == "none"
    assert (cfg.batch_size * cfg.grad_accum) % cfg.num_generations == 0
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SynthpertError, match="use_vllm"):
            check_vllm(cfg)


def test_prompts_are_the_students_with_the_adapters_evidence_and_task(tiny_built_dataset):
    from synthpert.dataset import load_built
    from synthpert.evidence import dataset_training_stats, evidence_text
    from synthpert.prompting import student_messages
    from synthpert.rl import build_prompts

    r = load_built(tiny_built_dataset, "train")[0]
    triple = (r["cell_line"], r["perturbation"], r["gene"])
    plain = build_prompts([r], {"mode": "reasoning"}, str(tiny_built_dataset))[0]
    assert plain["prompt"] == student_messages(*triple) and plain["label"] == r["label"]
    ev = build_prompts([r], {"mode": "multitask", "evidence": True}, str(tiny_built_dataset))[0]
    text = evidence_text(dataset_training_stats(tiny_built_dataset), *triple)
    assert ev["prompt"] == student_messages(*triple, text, "answer")
    # an adapter trained with the lookup line is asked with it (a training row: its cross-fitted line)
    looked = build_prompts([r], {"mode": "multitask", "evidence": True, "evidence_lookup": True},
                           str(tiny_built_dataset))[0]["prompt"][1]["content"]
    assert text in looked and "Model-free estimate from these counts" in looked


# ---------------------------------------------------------------------------------------------------------
# The real GRPOTrainer


@pytest.mark.slow
def test_grpo_moves_the_adapter_writes_the_manifest_and_resumes(answer_adapter, tiny_built_dataset, tmp_path):
    from synthpert.rl import run_rl

    out = tmp_path / "rl"
    summary = run_rl(_cfg(answer_adapter, tiny_built_dataset, report_to=["tensorboard"]), out)
    assert summary["global_step"] == 2
    before, after = _weights(answer_adapter), _weights(out)
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before), "GRPO left the SFT adapter unchanged"

    man = json.loads((out / "manifest.json").read_text())
    sft = json.loads((answer_adapter / "manifest.json").read_text())
    assert man["synthpert_stage"] == "rl"
    assert {k: man[k] for k in ("base_model", "mode", "evidence", "class_shares")} == {
        k: sft[k] for k in ("base_model", "mode", "evidence", "class_shares")}
    assert len(man["reward_curves"]) == 2
    for row in man["reward_curves"]:
        assert {"reward", "frac_reward_zero_std", "rewards/correctness/mean", "rewards/format/mean"} <= set(row)
    assert man["config"]["scale_rewards"] == "none"
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    # rl.report_to: the reward curves reach TensorBoard in <run>/tensorboard, findable from the manifest
    assert man["tracking"]["report_to"] == ["tensorboard"] and man["tracking"]["run_name"] == "rl"
    assert man["tracking"]["tensorboard_log_dir"] == str((out / "tensorboard").resolve())
    tb = _tensorboard_scalars(out / "tensorboard")
    for key in ("reward", "rewards/correctness/mean", "rewards/format/mean"):
        assert [s.step for s in tb[f"train/{key}"]] == [c["step"] for c in man["reward_curves"]], key
        assert [s.value for s in tb[f"train/{key}"]] == pytest.approx([c[key] for c in man["reward_curves"]]), key

    with pytest.raises(SynthpertError, match="already holds a run"):
        run_rl(_cfg(answer_adapter, tiny_built_dataset), out)
    resumed = run_rl(_cfg(answer_adapter, tiny_built_dataset, max_steps=3, resume=True), out)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["global_step"] == 3
    curves = json.loads((out / "manifest.json").read_text())["reward_curves"]
    assert [c["step"] for c in curves] == [1, 2, 3]  # the checkpoint's history, then the new step

    # the RL adapter loads like an SFT one: evaluation's evidence rule and the predictor's task read its manifest
    from synthpert.runs import adapter_manifest

    assert adapter_manifest(out)["mode"] == "label_only"


@pytest.mark.slow
def test_grpo_runs_in_bf16_on_cpu(answer_adapter, tiny_built_dataset, tmp_path):
    """precision=bf16 on CPU (once an error): the bf16 base generates and the LoRA weights still move."""
    import torch

    from synthpert.rl import run_rl

    summary = run_rl(_cfg(answer_adapter, tiny_built_dataset, precision="bf16"), tmp_path / "rl")
    assert summary["precision"] == "bf16" and summary["global_step"] == 2
    before, after = _weights(answer_adapter), _weights(tmp_path / "rl")
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)


@pytest.mark.slow
def test_toy_where_one_class_is_always_right_raises_mean_correctness(answer_adapter, tiny_built_dataset,
                                                                     tmp_path):
    """Every prompt's answer is "downregulated": the policy must learn to say it (the SFT adapter, trained
    on balanced classes, says it about a third of the time)."""
    from synthpert.dataset import load_built
    from synthpert.rl import run_rl

    rows = [r for r in load_built(tiny_built_dataset, "train").to_list() if r["label"] == DOWN]
    prompts = tmp_path / "down.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(answer_adapter, tiny_built_dataset, prompts_path=str(prompts), max_prompts=None, batch_size=16,
               max_steps=10, save_steps=100, rewards={"correct": {"down": 1.0}})
    run_rl(cfg, tmp_path / "rl")
    curve = [c["rewards/correctness/mean"] for c in
             json.loads((tmp_path / "rl" / "manifest.json").read_text())["reward_curves"]]
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last > first + 0.2, curve


@pytest.mark.slow
def test_run_with_an_rl_section_evaluates_the_rl_adapter_beside_the_sft_one(tmp_path, perturbqa_dir):
    import os
    import subprocess
    import sys

    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["name"] = "withrl"
    cfg["data"]["train_subsample"] = {**cfg["data"]["train_subsample"], "n": 60}
    cfg["train"]["mode"] = "label_only"
    cfg["train"]["optim"]["epochs"] = 1
    cfg["rl"] = {"num_generations": 4, "batch_size": 8, "max_completion_length": 12, "max_steps": 2,
                 "lr": 1e-3, "max_prompts": 16}
    cfg["eval_sets"] = {"k562_test": {"test_cells": ["k562"], "n": 12}}
    cfg["eval"].update({"n_bootstrap": 0, "figures": False, "decision_fit_n": 30})
    cfg["eval"]["inference"]["max_new_tokens"] = 12
    path = tmp_path / "withrl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "SYNTHPERT_DATA": str(perturbqa_dir), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "run", str(path), "--runs-dir", str(tmp_path / "runs")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "withrl"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["data", "base_model", "train", "rl", "eval"]
    rl = json.loads((run_dir / "rl" / "manifest.json").read_text())
    assert rl["synthpert_stage"] == "rl" and rl["sft_adapter"] == str((run_dir / "train").resolve())
    assert rl["global_step"] == 2
    for name, adapter in (("k562_test", run_dir / "rl"), ("k562_test_sft", run_dir / "train")):
        metrics = (run_dir / "eval" / name / "result" / "metrics.json").read_text()
        assert f'"adapter": "{adapter}"' in metrics
    if cfg["eval"].get("decision") == "tuned":  # each adapter gets its own rule, bound to its own hash
        assert (run_dir / "eval" / "decision_fit").is_dir() and (run_dir / "eval" / "decision_fit_train").is_dir()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resume_continues(answer_adapter, tiny_built_dataset, tmp_path, monkeypatch):
    """SIGINT in the middle of step 2 (from inside a reward call): the step finishes, a checkpoint is saved,
    the run stops with an error saying --resume, and --resume finishes the planned steps."""
    import os
    import signal

    import synthpert.rl as rl

    real = rl.reward_functions
    calls = {"n": 0}

    def interrupting(*a, **kw):
        funcs = real(*a, **kw)
        first = funcs[0]

        def correctness(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return first(*args, **kwargs)

        return [correctness, *funcs[1:]]

    monkeypatch.setattr(rl, "reward_functions", interrupting)
    out = tmp_path / "rl"
    with pytest.raises(SynthpertError, match="--resume"):
        rl.run_rl(_cfg(answer_adapter, tiny_built_dataset, max_steps=4, save_steps=100), out)
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "manifest.json").exists()
    monkeypatch.setattr(rl, "reward_functions", real)
    summary = rl.run_rl(_cfg(answer_adapter, tiny_built_dataset, max_steps=4, save_steps=100, resume=True), out)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
