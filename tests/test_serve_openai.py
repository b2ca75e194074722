"""The chat endpoint through the official `openai` SDK: streaming (server-sent events in OpenAI's chunk
format), logprobs, and the 400s where a backend cannot honour a field. Real model: the tiny model + adapter
on the transformers backend; stand-in backend: tests/_fake_predictor.py (no torch)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from _fake_predictor import FakePredictor
from _live_server import LiveServer

MAX_NEW = 12
USER = [{"role": "user", "content": "Does MYC knockdown change GAPDH in K562?"}]


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

    with LiveServer(create_app(predictor, ServeSettings(max_tokens=4096))) as srv:
        yield srv


@pytest.fixture(scope="module")
def name(tiny_adapter_dir):
    return tiny_adapter_dir.name


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.slow
def test_sdk_stream_concatenates_to_the_non_streamed_answer_with_openai_chunk_shape(server, name):
    client = _client(server)
    whole = client.chat.completions.create(model=name, messages=USER, max_tokens=MAX_NEW, temperature=0)
    chunks = list(client.chat.completions.create(model=name, messages=USER, max_tokens=MAX_NEW, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1  # token by token, not one block
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    *body, last = chunks
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in body)
    # without include_usage no chunk carries usage
    plain = list(client.chat.completions.create(model=name, messages=USER, max_tokens=4, temperature=0, stream=True))
    assert plain[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in plain)


@pytest.mark.slow
def test_async_sdk_stream_and_plain_agree(server, name):
    from openai import AsyncOpenAI

    async def run():
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        plain = await client.chat.completions.create(model=name, messages=USER, max_tokens=MAX_NEW, temperature=0)
        stream = await client.chat.completions.create(model=name, messages=USER, max_tokens=MAX_NEW,
                                                      temperature=0, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return plain.choices[0].message.content, "".join(parts)

    plain, streamed = asyncio.run(run())
    assert streamed == plain and plain


@pytest.mark.slow
def test_logprobs_are_the_models_own_and_match_between_stream_and_plain(server, name):
    client = _client(server)
    resp = client.chat.completions.create(model=name, messages=USER, max_tokens=MAX_NEW, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        # greedy: the chosen token is the most likely one under the model's raw distribution
        assert e.token == e.top_logprobs[0].token and e.logprob == pytest.approx(tops[0], abs=1e-6)
    stream = client.chat.completions.create(model=name, messages=USER, max_tokens=MAX_NEW, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    # logprobs=True alone: the chosen tokens, no alternatives
    bare = client.chat.completions.create(model=name, messages=USER, max_tokens=4, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[]] * 4


@pytest.mark.slow
def test_client_disconnect_stops_generation(server, name, predictor, monkeypatch):
    backend = predictor.backend
    done: list = []
    real = backend.stream

    def recording(*a, **kw):
        gen = real(*a, **kw)
        done.append(gen)
        return gen

    monkeypatch.setattr(backend, "stream", recording)
    # the tiny model may end its answer at once (its weights differ run to run); it must not end on its own
    monkeypatch.setattr(backend, "min_new_tokens", 4000)
    started = time.monotonic()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30,
                      json={"model": name, "messages": USER, "max_tokens": 4000, "temperature": 0,
                            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-request-id"]
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    while not done and time.monotonic() - started < 20:
        time.sleep(0.02)
    # cut short by the disconnect: neither 4000 tokens nor a natural end of sequence
    assert done and done[0].finish_reason == "cancelled" and done[0].completion_tokens < 4000
    assert not backend._lock.locked()


def test_stream_deltas_keep_tags_and_characters_whole(tiny_model_dir):
    from synthpert.serve.stream import _Deltas
    from synthpert.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    text = "<think>\nMYC drives é growth; p < 0.05 here.\n</think>\n<answer>not differentially expressed</answer>"
    ids = tok.encode(text, add_special_tokens=False)
    d = _Deltas(tok)
    chunks = [c for c in (d.push(i) for i in ids) if c]
    chunks.append(d.rest())
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert any(tag in c for c in chunks), (tag, chunks)
    assert all("\ufffd" not in c for c in chunks)


@pytest.fixture(scope="module")
def fake_server():
    from synthpert.config.serve import ServeSettings
    from synthpert.serve import create_app

    with LiveServer(create_app(FakePredictor(), ServeSettings())) as srv:
        yield srv


def test_backend_without_streaming_still_streams_one_chunk(fake_server):
    client = _client(fake_server)
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, stream=True,
                                                 stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model="fake-model", messages=USER)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True}, "logprobs"),  # the stand-in backend has no per-token log-probabilities
    ({"logprobs": True, "stream": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "n": 2}, "n"),
])
def test_fields_a_backend_cannot_honour_are_400_naming_the_field(fake_server, extra, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        _client(fake_server).chat.completions.create(model="fake-model", messages=USER, **extra)
    err = e.value.body
    assert err["param"] == param and param in err["message"]


def test_stream_error_after_headers_is_an_error_event_then_done(monkeypatch):
    """Once the 200 and the first chunk are out, a failure can only travel in the stream."""
    from synthpert.config.serve import ServeSettings
    from synthpert.serve import create_app

    pred = FakePredictor()
    boom = threading.Event()

    def failing(queries, n=1, **kw):
        boom.set()
        raise RuntimeError("secret internals")

    monkeypatch.setattr(pred.backend, "generate", failing)
    with LiveServer(create_app(pred, ServeSettings())) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                       json={"model": "fake-model", "messages": USER, "stream": True})
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert boom.is_set() and r.status_code == 200
    assert '"server_error"' in events[-2] and events[-1] == "data: [DONE]"
    assert "secret internals" not in r.text and "Traceback" not in r.text
