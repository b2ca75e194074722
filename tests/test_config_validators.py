"""Cross-field checks live on the config models: a bad combination fails when the config loads, before any work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from synthpert.config import load_section
from synthpert.config.evaluate import InferenceConfig
from synthpert.config.generate import JudgeConfig
from synthpert.config.run import RunConfig
from synthpert.config.serve import ServeConfig
from synthpert.errors import SynthpertError


def test_rules_judge_cannot_keep_above_good():
    with pytest.raises(ValidationError, match="rates at most 'good'"):
        JudgeConfig(kind="rules", threshold="excellent")
    assert JudgeConfig(kind="rules", threshold="good").threshold == "good"
    assert JudgeConfig(kind="llm", threshold="excellent").threshold == "excellent"


def test_answer_logprob_needs_a_local_backend():
    with pytest.raises(ValidationError, match="answer_logprob needs a local backend"):
        InferenceConfig(backend="openai", probability_method="answer_logprob")
    assert InferenceConfig(backend="openai", probability_method="votes").backend == "openai"


def test_inference_client_fields_are_checked_at_load():
    with pytest.raises(ValidationError, match="did you mean 'timeout'"):
        InferenceConfig(backend="openai", client={"timout": 5})
    cfg = InferenceConfig(backend="openai", model="m", base_url="http://x/v1", cache_path="c.sqlite",
                          client={"timeout": 5, "max_retries": 1})
    engine = cfg.client_config()
    assert (engine.model, engine.timeout, engine.max_retries, engine.progress) == ("m", 5, 1, False)


def test_serve_runs_a_local_model_only():
    with pytest.raises(ValidationError, match="serve runs a local model"):
        ServeConfig(inference={"backend": "openai", "model": "m"})
    cfg = load_section(ServeConfig, "serve", None, ["max_batch=32", "inference.temperature=0.7"],
                       {"inference.model": "m", "inference.max_new_tokens": 64, "port": 9000})
    assert (cfg.max_batch, cfg.port, cfg.inference.model, cfg.inference.max_new_tokens,
            cfg.inference.temperature) == (32, 9000, "m", 64, 0.7)


def test_a_run_config_fails_at_load_on_a_bad_stage_combination(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ntrain: {base_model: tiny}\njudge: {kind: rules, threshold: excellent}\n")
    with pytest.raises(SynthpertError, match="rates at most 'good'"):
        load_section(RunConfig, None, path)


def test_flags_lose_to_overrides_and_dotted_flags_nest(tmp_path):
    from synthpert.config.evaluate import EvalConfig

    path = tmp_path / "eval.yaml"
    path.write_text("eval:\n  n: 5\n  inference: {backend: openai}\n")
    cfg = load_section(EvalConfig, "eval", path, ["inference.max_new_tokens=32", "eval.n=7"],
                       {"inference.model": "m", "n": 6, "seed": None})
    assert (cfg.n, cfg.seed, cfg.inference.backend, cfg.inference.model, cfg.inference.max_new_tokens) == (
        7, 0, "openai", "m", 32)
