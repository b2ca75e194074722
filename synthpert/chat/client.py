"""The chat engine: completes many chat requests against any OpenAI-compatible API, without losing or
re-buying an answer. The teacher, the judge and the OpenAI-backed evaluation all use it.

    engine = ChatEngine(cfg, cache_path)
    run = engine.run([ChatRequest(id="a", messages=[...], sampling={"temperature": 0.7, "n": 4}), ...])
    run.results["a"].texts  # n completions, in choice order

What it guarantees (users lose money where tools do not):

* every response is written to a content-addressed SQLite cache (WAL mode) the moment it arrives, keyed
  by sha256(model, messages, sampling). Killing the process at any point loses at most the requests in
  flight; a rerun reuses everything that had arrived and a rerun with a warm cache sends nothing;
* bounded concurrency, requests/tokens-per-minute limits, retries with exponential backoff and jitter on
  connection errors, timeouts, 408/409/429/5xx and malformed bodies, honouring ``retry-after``; a 429
  makes EVERY worker pause (one shared cool-down) instead of each burning its retries at once;
* 400/401/403/404/422 stop the run at once with a SynthpertError naming the problem (never the key);
* token and cost accounting from the usage object (prompt, completion, reasoning, cached) with per-model
  prices from config; ``max_cost`` reserves each request's worst-case cost before sending, so the run
  stops cleanly BEFORE the budget would be exceeded; a dry-run estimate before spending anything;
* SIGINT stops launching requests and waits for the ones in flight (they are paid for); a second SIGINT
  abandons them. Either way every record already written is whole;
* with ``batch: true`` the same requests go through the OpenAI Batch API instead (synthpert.batch): same
  cache keys, same results, batch prices; ``export_batch`` / ``import_batch`` move them through a file.

The API key is read from the environment variable NAMED in the config and is only ever handed to the
SDK client: it is not stored in the cache, outputs, logs or error messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from .accounting import cost_of, usage_from_raw
from .batch import BatchRunner
from .budget import CostPlan
from .batch_files import chunk_calls, import_batch_file, write_batch_file
from .cache import ResponseCache, cache_key
from .requests import Call, ChatRequest, ChatResult, EngineRun, RunStats
from ..config.client import ClientConfig
from ..errors import SynthpertError
from .progress import CostProgress
from .request_pool import RequestPool
from ..schema import Usage

log = logging.getLogger("synthpert.client")

LOCAL_BASE_URL = "local"  # base_url of offline backends (evidence teacher, rules judge): no HTTP at all


LocalBackend = Callable[[ChatRequest, int], str]


class ChatEngine:
    """Complete many chat requests; see the module docstring. ``local`` replaces HTTP by a Python function
    ``(request, sample_index) -> text`` (offline teacher / judge) behind the same cache and accounting."""

    def __init__(self, cfg: ClientConfig, cache_path: str | Path | None = None, local: LocalBackend | None = None,
                 description: str = "requests", run_dir: str | Path | None = None):
        self.cfg = cfg
        path = cache_path or cfg.cache_path
        if path is None:
            raise SynthpertError("no cache path: set cache_path in the client config")
        self.cache_path = Path(path)
        self.run_dir = Path(run_dir) if run_dir is not None else self.cache_path.parent  # batches.json goes here
        self.local = local
        self.description = description
        self._key: str | None = None
        self.costs = CostPlan(cfg, offline=local is not None)

    # ---- planning -------------------------------------------------------------------------------------

    def _calls(self, req: ChatRequest) -> list[Call]:
        model = req.model or self.cfg.model
        sampling = dict(req.sampling)
        if req.n > 1 and (self.local is not None or not self.cfg.native_n):
            base = {k: v for k, v in sampling.items() if k != "n"}
            calls = []
            for i in range(req.n):
                s = dict(base)
                if "seed" in s:
                    s["seed"] = int(s["seed"]) + i
                extra = {**(req.key_extra or {}), "sample": i}
                calls.append(Call(req, i, cache_key(model, req.messages, s, extra), model, req.messages, s))
            return calls
        return [Call(req, 0, cache_key(model, req.messages, sampling, req.key_extra), model, req.messages, sampling)]

    def estimate(self, requests: list[ChatRequest]) -> dict:
        """What a run would send and cost, without sending anything (dry run)."""
        calls = [c for r in requests for c in self._calls(r)]
        cached = self._cached(calls)
        todo = [c for c in calls if c.key not in cached]
        offline_model = next((r.model for r in requests if r.model), self.cfg.model)
        out = {"model": self.cfg.model if self.local is None else f"{offline_model} (offline, free)",
               "base_url": self.cfg.base_url if self.local is None else LOCAL_BASE_URL,
               "requests": len(requests), "http_requests_needed": len(todo), "already_cached": len(calls) - len(todo),
               **self.costs.tokens(todo), "est_cost_usd": 0.0, "max_cost_usd": 0.0,
               "max_cost_budget": self.cfg.max_cost}
        if self.local is not None:
            return out
        costs = self.costs.estimate(todo)
        if self.cfg.batch and "note" not in costs:
            out["batch"] = {"discount": self.cfg.batch_discount,
                            "files": len(chunk_calls(todo, self.cfg.batch_max_requests, self.cfg.batch_max_bytes))}
        return {**out, **costs}

    def _cached(self, calls: list[Call]) -> dict:
        """The cache's answers to ``calls`` (none when there is no cache yet), without creating one."""
        if not self.cache_path.exists():
            return {}
        cache = ResponseCache(self.cache_path)
        try:
            return cache.get_many([c.key for c in calls])
        finally:
            cache.close()

    # ---- running ----------------------------------------------------------------------------------------

    def run(self, requests: list[ChatRequest], send: bool = True) -> EngineRun:
        """Answer every request (cache first). ``send=False``: answer from the cache only (after
        ``import_batch``); the rest are reported as failed, nothing goes out."""
        if send and self.cfg.batch and self.local is None:
            # Outside any event loop, so a Ctrl-C reaches the batch poll loop as KeyboardInterrupt (under
            # asyncio.run the first one would only cancel the task and the outputs would be lost).
            return self._run_batch(requests)
        return asyncio.run(self.arun(requests, send))

    async def arun(self, requests: list[ChatRequest], send: bool = True) -> EngineRun:
        """``run`` for callers already inside an event loop (the Batch API path blocks it while it waits)."""
        if send and self.cfg.batch and self.local is None:
            return self._run_batch(requests)
        t0, stats, plan, all_calls = self._begin(requests)
        cache = ResponseCache(self.cache_path)
        try:
            responses, hits, todo = self._lookup(cache, all_calls)
            if not send:
                for c in todo:
                    stats.failed.setdefault(c.request.id, "no answer in the imported batch output")
            else:
                if todo and self.local is None:
                    self._key = self.cfg.api_key()
                await self._execute(todo, responses, cache, stats, done_before=len(all_calls) - len(todo),
                                    total=len(all_calls))
            via_batch = cache.batch_answered([c.key for c in all_calls]) if self.local is None else set()
        finally:
            cache.close()
        return self._end(requests, plan, responses, hits, via_batch, stats, t0)

    def _run_batch(self, requests: list[ChatRequest]) -> EngineRun:
        t0, stats, plan, all_calls = self._begin(requests)
        cache = ResponseCache(self.cache_path)
        try:
            responses, hits, todo = self._lookup(cache, all_calls)
            if todo:
                self._key = self.cfg.api_key()
                self._execute_batch(todo, responses, cache, stats, done_before=len(all_calls) - len(todo),
                                    total=len(all_calls))
            via_batch = cache.batch_answered([c.key for c in all_calls])
        finally:
            cache.close()
        return self._end(requests, plan, responses, hits, via_batch, stats, t0)

    @staticmethod
    def _lookup(cache: ResponseCache, calls: list[Call]) -> tuple[dict, set[str], list[Call]]:
        """(cached responses by key, the keys answered from the cache, the calls still to make)."""
        responses = cache.get_many([c.key for c in calls])
        return responses, set(responses), [c for c in calls if c.key not in responses]

    def _begin(self, requests: list[ChatRequest]) -> tuple[float, RunStats, dict[str, list[Call]], list[Call]]:
        seen: set[str] = set()
        for r in requests:
            if r.id in seen:
                raise SynthpertError(f"request id {r.id!r} appears more than once")
            seen.add(r.id)
        t0 = time.monotonic()
        stats = RunStats(requests=len(requests))
        plan = {r.id: self._calls(r) for r in requests}
        all_calls = [c for calls in plan.values() for c in calls]
        self.costs.check_prices(all_calls)
        return t0, stats, plan, all_calls

    def _end(self, requests: list[ChatRequest], plan: dict[str, list[Call]], responses: dict, hits: set[str],
             via_batch: set[str], stats: RunStats, t0: float) -> EngineRun:
        results: dict[str, ChatResult] = {}
        for r in requests:
            calls = plan[r.id]
            if all(c.key in responses for c in calls):
                res = self._result(r, calls, [responses[c.key] for c in calls], all(c.key in hits for c in calls),
                                   via_batch)
                results[r.id] = res
                stats.completed += 1
                stats.from_cache += res.from_cache
                stats.usage_total = stats.usage_total + res.usage
                stats.cost_total += res.cost_usd
        stats.elapsed_s = time.monotonic() - t0
        return EngineRun(results, stats)

    def _result(self, req: ChatRequest, calls: list[Call], raws: list[dict], from_cache: bool,
                via_batch: set[str]) -> ChatResult:
        texts, reasons, usage, cost = [], [], Usage(), 0.0
        model = calls[0].model
        price = self.costs.price(model)
        for call, raw in zip(calls, raws):
            for ch in sorted(raw.get("choices") or [], key=lambda c: c.get("index", 0)):
                content = (ch.get("message") or {}).get("content")
                texts.append(content if isinstance(content, str) else None)
                reasons.append(ch.get("finish_reason"))
            u = usage_from_raw(raw)
            usage = usage + u
            # Each response at the price it was bought at, whatever the config says now.
            cost += cost_of(u, self.cfg.batch_price(price) if call.key in via_batch else price)
        return ChatResult(req.id, model, [c.key for c in calls], texts, reasons, usage,
                          cost if self.local is None else 0.0, raws, from_cache)

    # ---- the Batch API and batch files ------------------------------------------------------------------

    def _execute_batch(self, todo: list[Call], responses: dict, cache: ResponseCache, stats: RunStats,
                       done_before: int, total: int) -> None:
        unique = list({c.key: c for c in todo}.values())  # identical calls share one custom_id
        progress = CostProgress(self.cfg.progress, self.description, total, done_before)
        try:
            BatchRunner(self.cfg, self._key, cache, self.run_dir, progress, stats, done_before).run(unique, responses)
        finally:
            progress.close()
        if stats.stopped == "max_cost":
            log.warning("stopped before exceeding max_cost=$%.4f (spent $%.4f this run); rerun with a larger "
                        "--max-cost to continue — everything received so far is cached", self.cfg.max_cost,
                        stats.cost_new)

    def _needs_requests(self, flag: str) -> None:
        if self.local is not None:
            raise SynthpertError(f"{flag}: this {self.description} is an offline heuristic that sends no requests; "
                                 "batch files are for API models")

    def export_batch(self, requests: list[ChatRequest], path: str | Path) -> dict:
        """Write the requests the cache cannot answer as one Batch JSONL file (``custom_id`` = cache key), e.g.
        for ``vllm run-batch -i FILE -o OUT --model ...``; ``import_batch(OUT)`` brings the answers back."""
        self._needs_requests("--export-batch")
        calls = [c for r in requests for c in self._calls(r)]
        cached = self._cached(calls)
        todo = list({c.key: c for c in calls if c.key not in cached}.values())
        n = write_batch_file(todo, Path(path))
        return {"exported": n, "already_cached": len(calls) - len(todo), "path": str(path),
                "models": sorted({c.model for c in todo})}

    def import_batch(self, requests: list[ChatRequest], path: str | Path) -> dict:
        """Join a Batch output file (OpenAI's or ``vllm run-batch``'s format) into the cache by ``custom_id``.
        Damaged lines and ids that are not requests of this run are reported and skipped; good lines are kept."""
        self._needs_requests("--import-batch")
        path = Path(path)
        if not path.is_file():
            raise SynthpertError(f"--import-batch {path}: no such file")
        calls = {c.key: c for r in requests for c in self._calls(r)}
        cache = ResponseCache(self.cache_path)
        try:
            return import_batch_file(path, calls, cache)
        finally:
            cache.close()

    async def _execute(self, todo: list[Call], responses: dict, cache: ResponseCache, stats: RunStats,
                       done_before: int, total: int) -> None:
        if todo:
            await RequestPool(self.cfg, self._key, self.local, self.costs, self.description).run(
                todo, responses, cache, stats, done_before, total)


def engine_for(cfg: ClientConfig, out_dir: Path, local: LocalBackend | None = None,
               description: str = "requests") -> ChatEngine:
    """The engine of a stage writing to ``out_dir``: its cache is ``cfg.cache_path`` or ``<out_dir>/cache.sqlite``."""
    cache = Path(cfg.cache_path) if cfg.cache_path else Path(out_dir) / "cache.sqlite"
    return ChatEngine(cfg, cache, local=local, description=description, run_dir=out_dir)
