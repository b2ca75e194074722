"""The endpoint's four holes, closed: a chunked body past the cap (413, read no further), control characters
in a symbol (422 naming the field), unknown routes (the JSON error shape), and well-formed symbols the
training data never measured (answered, with a warning)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from _live_server import LiveServer

MAX_BODY = 20_000


def test_body_limit_stops_reading_a_chunked_body_at_the_cap():
    """Unit level: the middleware raises after ~cap bytes, so a 30 MB stream is never read whole."""
    from synthpert.serve import BodyLimit, BodyTooLarge

    chunk = b"x" * 65536
    calls = {"n": 0}

    async def receive():
        calls["n"] += 1
        return {"type": "http.request", "body": chunk, "more_body": calls["n"] < 480}  # 480 x 64 KiB ≈ 30 MB

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    with pytest.raises(BodyTooLarge):
        asyncio.run(BodyLimit(app, max_bytes=1_000_000)({"type": "http"}, receive, None))
    assert calls["n"] == 1_000_000 // 65536 + 1  # stopped right after the cap, not at 480


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapter_dir, tiny_built_dataset):
    from synthpert.config.serve import ServeConfig, ServeSettings
    from synthpert.evidence import dataset_training_stats
    from synthpert.inference import load_predictor
    from synthpert.serve import create_app

    predictor = load_predictor(ServeConfig(inference={"backend": "transformers", "model": str(tiny_model_dir),
                                                      "adapter": str(tiny_adapter_dir), "max_new_tokens": 4}))
    app = create_app(predictor, ServeSettings(max_body_bytes=MAX_BODY), dataset_training_stats(tiny_built_dataset))
    with LiveServer(app) as srv:
        yield srv
    predictor.backend.close()


@pytest.mark.slow
def test_chunked_body_over_the_cap_is_413_and_the_server_lives(server):
    def body():
        for _ in range(480):  # ~30 MB, no Content-Length: Transfer-Encoding chunked
            yield b" " * 65536

    try:
        r = httpx.post(f"{server.url}/v1/predict", content=body(), headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    except httpx.WriteError:
        pass  # the server answered 413 and closed the connection while the client was still sending
    ok = httpx.post(f"{server.url}/v1/predict", json={"cell_line": "k562", "perturbation": "MYC", "gene": "GAPDH"},
                    timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [("gene", "AT\u0000P"), ("gene", "GAP DH"), ("perturbation", "MY\nC"),
                                         ("gene", "\U0001F9EC"), ("perturbation", "-MYC"), ("gene", "A" * 65)])
def test_malformed_symbols_are_422_naming_the_field(server, field, value):
    payload = {"cell_line": "k562", "perturbation": "MYC", "gene": "GAPDH", field: value}
    r = httpx.post(f"{server.url}/v1/predict", json=payload, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]


@pytest.mark.slow
def test_unmeasured_symbols_are_answered_with_a_warning(server):
    known = httpx.post(f"{server.url}/v1/predict", json={"cell_line": "k562", "perturbation": "MYC",
                                                         "gene": "GAPDH"}, timeout=60).json()
    odd = httpx.post(f"{server.url}/v1/predict", json={"cell_line": "k562", "perturbation": "NOTAGENE1",
                                                       "gene": "RP11-34P13.7"}, timeout=60)
    assert odd.status_code == 200
    warnings = odd.json()["warnings"]
    assert "gene RP11-34P13.7 was not measured in the training data" in warnings
    assert any("perturbation NOTAGENE1" in w for w in warnings)
    assert "warnings" in known


@pytest.mark.slow
@pytest.mark.parametrize("method,path,status", [("GET", "/nope", 404), ("POST", "/v1/nothing", 404),
                                                ("GET", "/v1/predict", 405), ("DELETE", "/health", 405)])
def test_unknown_routes_and_methods_answer_the_json_error_shape(server, method, path, status):
    r = httpx.request(method, f"{server.url}{path}", timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and path in err["message"]
