"""The response engine through the real openai SDK against a real local HTTP server."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

from synthpert.chat import ChatRequest  # noqa: E402
from synthpert.chat.client import ChatEngine  # noqa: E402
from synthpert.config.client import ClientConfig  # noqa: E402
from synthpert.chat.ratelimit import RateLimiter  # noqa: E402
from synthpert.errors import SynthpertError  # noqa: E402

KEY_ENV = "SYNTHPERT_TEST_API_KEY"
KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def server():
    with FakeOpenAIServer(prompt_tokens=100, completion_tokens=50, reasoning_tokens=20, cached_tokens=40) as srv:
        yield srv


def cfg_for(srv: FakeOpenAIServer, **kw) -> ClientConfig:
    base = dict(model="fake-model", base_url=srv.base_url, api_key_env=KEY_ENV, concurrency=4, timeout=5,
                backoff_initial=0.01, backoff_max=0.05, progress=False,
                prices={"fake-model": {"input": 1.0, "output": 2.0, "cached_input": 0.5}})
    base.update(kw)
    return ClientConfig(**base)


def requests(count: int, tag: str = "q", **sampling) -> list[ChatRequest]:
    return [ChatRequest(id=f"{tag}{i}", messages=[{"role": "user", "content": f"{tag} question {i}: up or down?"}],
                        sampling={"max_tokens": 64, **sampling}) for i in range(count)]


# Scripted usage: prompt 100 (40 cached), completion 50 (20 of them reasoning); prices per 1M tokens:
# input 1.0, cached 0.5, output 2.0  ->  (60 * 1.0 + 40 * 0.5 + 50 * 2.0) / 1e6 per request.
COST_PER_REQUEST = (60 * 1.0 + 40 * 0.5 + 50 * 2.0) / 1e6


def test_faults_are_retried_until_every_request_succeeds(server, tmp_path):
    server.inject("status", count=2, status=429, retry_after=0.05)
    server.inject("status", status=500)
    server.inject("status", status=503)
    server.inject("truncated")
    server.inject("wrong_shape")
    server.inject("slow", delay=1.5)  # past the 0.5 s timeout
    engine = ChatEngine(cfg_for(server, timeout=0.5), tmp_path / "c.sqlite")
    run = engine.run(requests(6))
    assert run.stats.completed == 6 and not run.stats.failed
    assert run.stats.retries == 7
    assert len(server.received) == 6 + 7
    assert run.stats.cooldowns >= 1
    for res in run.results.values():
        assert res.texts[0].startswith("<think>") and "<answer>" in res.texts[0]


def test_429_pauses_every_worker_for_retry_after(tmp_path):
    with FakeOpenAIServer(latency_ms=100) as srv:
        srv.inject("status", status=429, retry_after=0.6)
        engine = ChatEngine(cfg_for(srv, concurrency=4), tmp_path / "c.sqlite")
        run = engine.run(requests(8))
        assert run.stats.completed == 8
        # One 429, one retry, one shared cool-down: 8 requests + 1 retry reached the server.
        assert (run.stats.cooldowns, run.stats.retries, run.stats.http_requests) == (1, 1, 9)
        t = sorted(srv.state.received_at)
        assert len(t) == 9
        # The first request got the 429 back 0.1 s after it arrived; from then until the 0.6 s cool-down
        # ends NO worker sends, although 3 of them got answers at the same moment: beyond the first four
        # (sent before the 429 came back), not one request arrives inside that window.
        assert sum(1 for x in t[4:] if x < t[0] + 0.1 + 0.55) == 0


def test_unretryable_errors_fail_fast_with_a_clear_message_and_no_key(server, tmp_path):
    for status, needle in ((401, KEY_ENV), (404, "model name"), (400, "sampling parameters")):
        server.inject("status", count=10, status=status, message=f"Incorrect API key provided: {KEY}")
        engine = ChatEngine(cfg_for(server, concurrency=1), tmp_path / f"c{status}.sqlite")
        before = len(server.received)
        with pytest.raises(SynthpertError) as err:
            engine.run(requests(5))
        msg = str(err.value)
        assert f"HTTP {status}" in msg and needle in msg
        assert KEY not in msg and "SECRET" not in msg
        assert len(server.received) - before == 1  # no retries, no further requests
        server.state.faults.clear()


def test_missing_api_key_variable_is_named(server, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(SynthpertError, match=KEY_ENV):
        ChatEngine(cfg_for(server), tmp_path / "c.sqlite").run(requests(1))
    assert not server.received


def test_cache_makes_a_rerun_send_nothing_and_costs_add_up(server, tmp_path):
    engine = ChatEngine(cfg_for(server), tmp_path / "c.sqlite")
    first = engine.run(requests(10))
    assert len(server.received) == 10
    assert first.stats.usage_new.prompt_tokens == 1000 and first.stats.usage_new.completion_tokens == 500
    assert first.stats.usage_new.reasoning_tokens == 200 and first.stats.usage_new.cached_tokens == 400
    assert first.stats.cost_new == pytest.approx(10 * COST_PER_REQUEST)
    second = engine.run(requests(10))
    assert len(server.received) == 10  # zero new requests
    assert second.stats.from_cache == 10 and second.stats.cost_new == 0
    assert second.stats.cost_total == pytest.approx(10 * COST_PER_REQUEST)
    assert {k: v.texts for k, v in second.results.items()} == {k: v.texts for k, v in first.results.items()}
    # raw bodies are stored whole, the key nowhere
    db = sqlite3.connect(tmp_path / "c.sqlite")
    rows = db.execute("SELECT request, response FROM responses").fetchall()
    assert len(rows) == 10 and all('"usage"' in r[1] for r in rows)
    for f in tmp_path.iterdir():
        assert KEY.encode() not in f.read_bytes()
    assert all(h == f"Bearer {KEY}" for h in server.state.auth_headers)  # it was sent, only to the server


def test_n_samples_native_and_split(server, tmp_path):
    native = ChatEngine(cfg_for(server), tmp_path / "a.sqlite").run(requests(2, n=3, seed=7))
    assert len(server.received) == 2 and all(len(r.texts) == 3 for r in native.results.values())
    assert all(len(set(r.texts)) == 3 for r in native.results.values())
    split = ChatEngine(cfg_for(server, native_n=False), tmp_path / "b.sqlite").run(requests(2, n=3, seed=7))
    bodies = server.received[2:]
    assert len(bodies) == 6 and all("n" not in b for b in bodies)
    assert sorted(b["seed"] for b in bodies) == [7, 7, 8, 8, 9, 9]
    assert all(len(r.texts) == 3 and len(r.keys) == 3 for r in split.results.values())


def test_max_cost_stops_before_the_budget_and_a_rerun_continues(server, tmp_path):
    cfg = cfg_for(server, concurrency=2, max_cost=0.0012)
    engine = ChatEngine(cfg, tmp_path / "c.sqlite")
    run = engine.run(requests(20))
    assert run.stats.stopped == "max_cost"
    assert 0 < run.stats.completed < 20
    assert run.stats.cost_new <= 0.0012
    n_first = len(server.received)
    assert n_first == run.stats.completed
    rest = ChatEngine(cfg.model_copy(update={"max_cost": None}), tmp_path / "c.sqlite").run(requests(20))
    assert rest.stats.completed == 20 and rest.stats.from_cache == n_first
    assert len(server.received) == 20  # nothing bought twice


def test_max_cost_without_a_price_is_refused(server, tmp_path):
    with pytest.raises(SynthpertError, match="no price"):
        ChatEngine(cfg_for(server, prices={}, max_cost=1.0), tmp_path / "c.sqlite").run(requests(1))
    assert not server.received


def test_dry_run_estimates_without_sending(server, tmp_path):
    engine = ChatEngine(cfg_for(server, completion_tokens_estimate=30), tmp_path / "c.sqlite")
    engine.run(requests(3))
    est = engine.estimate(requests(5))
    assert len(server.received) == 3
    assert est["already_cached"] == 3 and est["http_requests_needed"] == 2
    assert est["est_completion_tokens"] == 60 and est["max_completion_tokens"] == 128
    assert 0 < est["est_cost_usd"] <= est["max_cost_usd"]


def test_rate_limiter_holds_requests_beyond_rpm():
    async def go():
        lim = RateLimiter(rpm=2, tpm=None)
        await lim.acquire(1)
        await lim.acquire(1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lim.acquire(1), 0.2)
        tok = RateLimiter(rpm=None, tpm=100)
        await tok.acquire(80)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(tok.acquire(30), 0.2)
    asyncio.run(go())


def test_duplicate_request_ids_are_refused(server, tmp_path):
    reqs = requests(2)
    reqs[1].id = reqs[0].id
    with pytest.raises(SynthpertError, match="more than once"):
        ChatEngine(cfg_for(server), tmp_path / "c.sqlite").run(reqs)
