"""The chat engine every OpenAI-compatible call goes through (teacher, judge, the openai eval backend).

requests.py (a logical request, its result, run stats), client.py (``ChatEngine``: plans calls, cache lookups,
results) over request_pool.py (concurrency, retries, the shared 429 cool-down, ``max_cost`` reservations,
Ctrl-C), cache.py (the SQLite response cache), accounting.py (usage and cost), budget.py (prices, dry-run
estimates), ratelimit.py, progress.py, and the Batch API path batch.py over batch_files.py. The modules import
each other, never this package."""

from __future__ import annotations

from .requests import (Call, ChatRequest, ChatResult, EngineRun, RunStats, choice_logprobs, local_response,
                       sequence_confidence, shape_problem)

__all__ = ["Call", "ChatRequest", "ChatResult", "EngineRun", "RunStats", "choice_logprobs", "local_response",
           "sequence_confidence", "shape_problem"]
