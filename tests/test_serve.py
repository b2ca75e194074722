"""`synthpert serve` on the tiny model + trained adapter (transformers backend, CPU), over real HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from _live_server import LiveServer

pytestmark = pytest.mark.slow

MAX_NEW = 8


@pytest.fixture(scope="module")
def predictor(tiny_model_dir, tiny_adapter_dir):
    from synthpert.config.serve import ServeConfig
    from synthpert.inference import load_predictor

    return load_predictor(ServeConfig(inference={"backend": "transformers", "model": str(tiny_model_dir),
                                                 "adapter": str(tiny_adapter_dir), "max_new_tokens": MAX_NEW}))


@pytest.fixture(scope="module")
def server(predictor):
    from synthpert.config.serve import ServeSettings
    from synthpert.serve import create_app

    app = create_app(predictor, ServeSettings(max_batch=4, max_n_samples=3, max_body_bytes=20_000))
    with LiveServer(app) as srv:
        yield srv


def test_predict_returns_label_probabilities_and_reasoning(server, tiny_adapter_dir):
    r = httpx.post(f"{server.url}/v1/predict", json={"cell_line": "K562", "perturbation": "MYC", "gene": "GAPDH",
                                                     "return_reasoning": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cell_line"] == "k562"
    assert body["probability_method"] == "answer_logprob"
    probs = body["probabilities"]
    assert set(probs) == {"up", "down", "not_de"} and abs(sum(probs.values()) - 1) < 1e-6
    assert body["label"] in (None, "upregulated", "downregulated", "not differentially expressed")
    assert isinstance(body["reasoning"], str) and body["reasoning"]
    assert body["adapter"] == str(tiny_adapter_dir) and body["model"] == tiny_adapter_dir.name
    # the same question again gives the same (greedy) answer: batching with other requests changes nothing
    again = httpx.post(f"{server.url}/v1/predict", json={"cell_line": "k562", "perturbation": "MYC",
                                                         "gene": "GAPDH"}, timeout=60).json()
    assert again["probabilities"] == pytest.approx(probs, abs=1e-5)
    assert again["reasoning"] is None  # not asked for


def test_batch_form_matches_single_requests(server):
    items = [{"cell_line": "k562", "perturbation": p, "gene": g} for p, g in
             [("MYC", "GAPDH"), ("TP53", "CDKN1A"), ("ATF4", "DDIT3")]]
    r = httpx.post(f"{server.url}/v1/predict/batch", json={"items": items}, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [(p["perturbation"], p["gene"]) for p in preds] == [(i["perturbation"], i["gene"]) for i in items]
    single = httpx.post(f"{server.url}/v1/predict", json=items[1], timeout=60).json()
    assert preds[1]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


def test_openai_sdk_chat_completions_and_models(server, tiny_adapter_dir):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert ids == [tiny_adapter_dir.name]
    resp = client.chat.completions.create(model=ids[0], max_tokens=MAX_NEW, temperature=0, n=2,
                                          messages=[{"role": "user", "content": "Is GAPDH upregulated?"}])
    assert len(resp.choices) == 2
    assert resp.choices[0].message.content == resp.choices[1].message.content  # greedy
    assert 0 < resp.usage.completion_tokens <= 2 * MAX_NEW and resp.usage.prompt_tokens > 5
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("path,payload,status,param", [
    ("/v1/predict", {"cell_line": "hela", "perturbation": "MYC", "gene": "GAPDH"}, 422, "cell_line"),
    ("/v1/predict", {"cell_line": "k562", "perturbation": "MYC", "gene": "  "}, 422, "gene"),
    ("/v1/predict", {"cell_line": "k562", "perturbation": "MYC"}, 422, "gene"),
    ("/v1/predict", {"cell_line": "k562", "perturbation": "MYC", "gene": "A", "n_samples": 50}, 422, "n_samples"),
    ("/v1/predict", {"cell_line": "k562", "perturbation": "MYC", "gene": "A", "colour": "red"}, 422, "colour"),
    ("/v1/predict/batch", {"items": [{"cell_line": "k562", "perturbation": "MYC", "gene": "A"}] * 5}, 422, "items"),
    ("/v1/predict/batch", {"items": []}, 422, "items"),
    ("/v1/chat/completions", {"model": "x", "messages": []}, 422, "messages"),
])
def test_bad_inputs_are_4xx_naming_the_field(server, path, payload, status, param):
    r = httpx.post(f"{server.url}{path}", json=payload, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    assert "Traceback" not in r.text


def test_oversize_body_and_bad_json(server):
    r = httpx.post(f"{server.url}/v1/predict", content=b"{" + b" " * 30_000 + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(f"{server.url}/v1/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "Traceback" not in r.text
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "x", "stream": True,
                                                              "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code in (400, 404)


def test_concurrent_load_all_succeed(server):
    genes = ["GAPDH", "ACTB", "MYC", "TP53", "XBP1", "ATF4", "HSPA5", "DDIT3"]

    async def run():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            async def one(i):
                async with sem:
                    r = await client.post("/v1/predict", json={"cell_line": "k562", "perturbation": f"RPL{i % 13}",
                                                               "gene": genes[i % len(genes)]})
                    return r.status_code, r.json()
            return await asyncio.gather(*[one(i) for i in range(200)])

    results = asyncio.run(run())
    assert [s for s, _ in results] == [200] * 200
    assert all(abs(sum(b["probabilities"].values()) - 1) < 1e-6 for _, b in results)
    # identical questions got identical answers whatever batch they landed in
    by_q = {}
    for _, b in results:
        by_q.setdefault((b["perturbation"], b["gene"]), []).append(b["probabilities"]["up"])
    assert all(max(v) - min(v) < 1e-5 for v in by_q.values())


def test_auth_enforced_when_configured(predictor, monkeypatch):
    from synthpert.config.serve import ServeSettings
    from synthpert.serve import create_app

    monkeypatch.setenv("SYNTHPERT_TEST_KEY", "s3cret-key-123")
    app = create_app(predictor, ServeSettings(api_key_env="SYNTHPERT_TEST_KEY"))
    with LiveServer(app) as srv:
        body = {"cell_line": "k562", "perturbation": "MYC", "gene": "GAPDH"}
        assert httpx.get(f"{srv.url}/health").status_code == 200
        r = httpx.post(f"{srv.url}/v1/predict", json=body)
        assert r.status_code == 401 and "s3cret" not in r.text
        r = httpx.post(f"{srv.url}/v1/predict", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = httpx.post(f"{srv.url}/v1/predict", json=body, headers={"Authorization": "Bearer s3cret-key-123"},
                       timeout=60)
        assert r.status_code == 200
        from openai import AuthenticationError, OpenAI

        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{srv.url}/v1", api_key="nope").models.list()
        assert OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret-key-123").models.list().data


def test_internal_error_leaks_no_traceback_or_key(predictor, monkeypatch):
    from synthpert.inference import Predictor
    from synthpert.config.serve import ServeSettings
    from synthpert.serve import create_app

    monkeypatch.setenv("SYNTHPERT_TEST_KEY", "s3cret-key-456")

    class Broken(Predictor):
        def predict(self, triples, n_samples=None):
            raise RuntimeError("backend exploded with key s3cret-key-456 at /secret/path.py")

    app = create_app(Broken(predictor.backend), ServeSettings(api_key_env="SYNTHPERT_TEST_KEY"))
    with LiveServer(app) as srv:
        r = httpx.post(f"{srv.url}/v1/predict", json={"cell_line": "k562", "perturbation": "MYC", "gene": "GAPDH"},
                       headers={"Authorization": "Bearer s3cret-key-456"})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error"
        for leak in ("s3cret", "Traceback", "exploded", "/secret/path.py"):
            assert leak not in r.text
        # the server survives it
        assert httpx.get(f"{srv.url}/health").status_code == 200


def test_serve_refuses_an_evidence_mismatch(tmp_path):
    import json

    from synthpert.errors import SynthpertError
    from synthpert.inference import check_evidence_setting

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "manifest.json").write_text(json.dumps({"evidence": True}))
    with pytest.raises(SynthpertError, match="--evidence-from"):
        check_evidence_setting(str(adapter), None)
    check_evidence_setting(str(adapter), "some/dataset")
    (adapter / "manifest.json").write_text(json.dumps({"evidence": False}))
    with pytest.raises(SynthpertError, match="drop --evidence-from"):
        check_evidence_setting(str(adapter), "some/dataset")
    check_evidence_setting(str(adapter), None)
