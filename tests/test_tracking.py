"""Experiment tracking: `train.report_to` reaches TRL's trainer, the run is findable from its manifest, and
`synthpert eval` adds its metrics to the same TensorBoard log dir."""

from __future__ import annotations

import json

import pytest


def test_report_to_defaults_to_none_and_accepts_a_single_name():
    from synthpert.config.train import TrainConfig

    assert TrainConfig().report_to == ["none"]
    assert TrainConfig(report_to="TensorBoard").report_to == ["tensorboard"]
    assert TrainConfig(report_to=["tensorboard", "trackio"]).report_to == ["tensorboard", "trackio"]


@pytest.mark.parametrize("value, expected", [
    (["tensorbord"], "did you mean 'tensorboard'"),
    (["wandbb"], "did you mean 'wandb'"),
    (["none", "tensorboard"], "'none' cannot be combined"),
])
def test_bad_tracker_names_are_config_errors(value, expected):
    from synthpert.config import validate_config
    from synthpert.config.train import TrainConfig
    from synthpert.errors import SynthpertError

    with pytest.raises(SynthpertError, match=expected) as e:
        validate_config(TrainConfig, {"report_to": value}, "train config")
    assert "report_to" in str(e.value)


def test_missing_tracker_package_names_the_extra(monkeypatch):
    import importlib.util

    from synthpert import tracking
    from synthpert.errors import SynthpertError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(SynthpertError, match=r"pip install 'synthpert\[wandb\]'"):
        tracking.require(["tensorboard", "wandb"])
    tracking.require(["none"])  # no tracker: nothing to import


@pytest.mark.slow  # imports trl
def test_sft_config_gets_trackers_and_the_run_name(tmp_path):
    from synthpert.config.train import TrainConfig
    from synthpert.train import sft_config

    args = sft_config(TrainConfig(report_to=["tensorboard"]), tmp_path / "my-run", "fp32", False)
    assert args.report_to == ["tensorboard"] and args.run_name == "my-run"
    assert sft_config(TrainConfig(), tmp_path / "r", "fp32", False).report_to == []


def test_rl_report_to_is_checked_like_train_and_names_its_section(monkeypatch):
    import importlib.util

    from synthpert import tracking
    from synthpert.config import validate_config
    from synthpert.config.rl import RLConfig
    from synthpert.errors import SynthpertError

    assert RLConfig().report_to == ["none"] and RLConfig(report_to="TensorBoard").report_to == ["tensorboard"]
    with pytest.raises(SynthpertError, match="did you mean 'mlflow'") as e:
        validate_config(RLConfig, {"report_to": ["mlfow"]}, "rl config")
    assert "report_to" in str(e.value)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "trackio" else real(n, *a))
    with pytest.raises(SynthpertError, match=r"pip install 'synthpert\[trackio\]' \(or set rl.report_to=none\)"):
        tracking.require(["trackio"], "rl")


@pytest.mark.slow  # imports trl
def test_grpo_config_gets_trackers_and_the_run_name(tmp_path):
    from synthpert.config.rl import RLConfig
    from synthpert.rl import grpo_config

    args = grpo_config(RLConfig(report_to=["tensorboard"], num_generations=4), tmp_path / "my-rl", "fp32")
    assert args.report_to == ["tensorboard"] and args.run_name == "my-rl"
    assert grpo_config(RLConfig(num_generations=4), tmp_path / "r", "fp32").report_to == []


def _scalars(log_dir) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_holds_train_loss_then_eval_metrics(tiny_model_dir, tiny_traces_path, tiny_built_dataset,
                                                       tmp_path):
    pytest.importorskip("tensorboard")
    from synthpert.config.evaluate import EvalConfig
    from synthpert.config.train import TrainConfig
    from synthpert.evaluate import run_eval
    from synthpert.train import run_train

    cfg = TrainConfig.model_validate({
        "base_model": str(tiny_model_dir), "max_length": 512, "seed": 0, "eval_fraction": 0.0,
        "max_examples": 16, "logging_steps": 1, "report_to": ["tensorboard"], "lora": {"r": 4, "alpha": 8},
        "optim": {"lr": 1e-2, "max_steps": 3, "batch_size": 4, "grad_accum": 1, "warmup": 0.0},
    })
    run = tmp_path / "tb-run"
    run_train(cfg, tiny_traces_path, run)
    manifest = json.loads((run / "manifest.json").read_text())
    rec = manifest["tracking"]
    assert rec["report_to"] == ["tensorboard"] and rec["run_name"] == "tb-run"
    assert rec["tensorboard_log_dir"] == str((run / "tensorboard").resolve())
    loss = _scalars(run / "tensorboard")["train/loss"]
    assert [s.step for s in loss] == [1, 2, 3] and all(s.value > 0 for s in loss)

    ev = EvalConfig(dataset=str(tiny_built_dataset), n=6, n_bootstrap=0,
                    inference={"model": str(tiny_model_dir), "adapter": str(run), "max_new_tokens": 4,
                               "batch_size": 6})
    summary = run_eval(ev, out_dir=tmp_path / "ev", progress=False)
    assert summary["tracked"] == ["tensorboard"]
    scalars = _scalars(run / "tensorboard")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    prefix = f"eval/{tiny_built_dataset.name}-test"
    strict = scalars[f"{prefix}/model_strict/macro_f1"]
    assert [s.step for s in strict] == [3]
    assert strict[0].value == pytest.approx(metrics["model"]["strict"]["overall"]["macro_f1"])
    for tag in ("model_strict/accuracy", "model_strict/f1_up", "model_strict/f1_not_de",
                "baseline_majority/macro_f1"):
        assert f"{prefix}/{tag}" in scalars, sorted(scalars)
    assert "train/loss" in scalars  # the same log dir: curves and test metrics side by side
    # every figure of metrics.json that has a value is there, with its value
    from synthpert.tracking import flat_eval_metrics

    flat = flat_eval_metrics(metrics)
    assert {t for t in scalars if t.startswith(prefix)} == {f"{prefix}/{k}" for k in flat}
    assert all(scalars[f"{prefix}/{k}"][0].value == pytest.approx(v) for k, v in flat.items())


def test_flat_eval_metrics_keeps_aurocs_and_per_class_f1_and_drops_nan():
    from synthpert.tracking import flat_eval_metrics

    overall = {"accuracy": 0.5, "macro_f1": 0.4, "balanced_accuracy": float("nan"), "auroc_de_per_gene": 0.7,
               "auroc_dir_per_gene": 0.6, "per_class": {"up": {"f1": 0.3}, "down": {"f1": float("nan")}}}
    flat = flat_eval_metrics({"model": {"strict": {"overall": overall}},
                              "baselines": {"majority": {"overall": {"macro_f1": 0.2}},
                                            "knn": {"unavailable": "no training lines"}}})
    assert flat == {"model_strict/accuracy": 0.5, "model_strict/macro_f1": 0.4,
                    "model_strict/auroc_de_per_gene": 0.7, "model_strict/auroc_dir_per_gene": 0.6,
                    "model_strict/f1_up": 0.3, "baseline_majority/macro_f1": 0.2}


@pytest.mark.slow
def test_an_adapter_trained_without_trackers_logs_nothing(tiny_adapter_dir):
    from synthpert.evaluate import log_to_training_trackers

    assert json.loads((tiny_adapter_dir / "manifest.json").read_text())["tracking"] is None
    assert log_to_training_trackers(str(tiny_adapter_dir), None, {}) == []
    assert not (tiny_adapter_dir / "tensorboard").exists()


@pytest.mark.parametrize("setting", ["none", "full"])
def test_gradient_checkpointing_reaches_the_trainer_as_configured(tmp_path, setting):
    """TRL's SFTConfig and GRPOConfig turn activation checkpointing on by default; `none` must switch it off
    (it had recomputed every forward pass of the quickstart's training) and `full` on."""
    from synthpert.config.rl import RLConfig
    from synthpert.config.train import TrainConfig
    from synthpert.rl import grpo_config
    from synthpert.train import sft_config

    def flag(args):
        return getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing

    assert flag(sft_config(TrainConfig(gradient_checkpointing=setting), tmp_path, "fp32", False)) == (setting == "full")
    rl = grpo_config(RLConfig(gradient_checkpointing=setting == "full"), tmp_path, "fp32")
    assert flag(rl) == (setting == "full")
