"""Requests to the chat engine and what it returns: one logical request (n samples), its result, run stats."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..schema import Usage


@dataclass
class ChatRequest:
    id: str
    messages: list[dict]
    sampling: dict = field(default_factory=dict)
    model: str | None = None  # default: the engine's cfg.model
    key_extra: dict | None = None  # mixed into the cache key (e.g. an offline backend's template hash)
    context: Any = None  # handed to a local backend; never part of the key or the cache

    @property
    def n(self) -> int:
        return int(self.sampling.get("n") or 1)


@dataclass
class ChatResult:
    id: str
    model: str
    keys: list[str]
    texts: list[str | None]  # one per sample; None for a choice whose content was not text
    finish_reasons: list[str | None]
    usage: Usage
    cost_usd: float
    raw: list[dict]  # the full response bodies, as received
    from_cache: bool


@dataclass
class RunStats:
    requests: int = 0
    from_cache: int = 0  # logical requests fully answered from the cache
    completed: int = 0  # logical requests with every response present
    http_requests: int = 0  # attempts that reached the network (or a local backend)
    retries: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # request id -> reason, after all retries
    usage_new: Usage = field(default_factory=Usage)
    cost_new: float = 0.0  # spent by THIS invocation
    usage_total: Usage = field(default_factory=Usage)
    cost_total: float = 0.0  # of every result returned, cached ones included (at current prices)
    stopped: str | None = None  # None | "max_cost" | "interrupted"
    elapsed_s: float = 0.0
    cooldowns: int = 0
    batch: dict | None = None  # Batch API runs: jobs created / resumed, requests (re)submitted, problems

    def to_dict(self) -> dict:
        return {"requests": self.requests, "completed": self.completed, "from_cache": self.from_cache,
                "http_requests": self.http_requests, "retries": self.retries, "rate_limit_cooldowns": self.cooldowns,
                "failed": len(self.failed), "failed_examples": dict(list(self.failed.items())[:10]),
                "usage_this_run": self.usage_new.model_dump(), "cost_usd_this_run": round(self.cost_new, 6),
                "usage_total": self.usage_total.model_dump(), "cost_usd_total": round(self.cost_total, 6),
                "stopped": self.stopped, "elapsed_s": round(self.elapsed_s, 3),
                **({"batch": self.batch} if self.batch is not None else {})}


@dataclass
class EngineRun:
    results: dict[str, ChatResult]
    stats: RunStats


@dataclass
class Call:
    """One HTTP request (a logical request with n samples may be split into n calls)."""

    request: ChatRequest
    index: int
    key: str
    model: str
    messages: list[dict]
    sampling: dict


def shape_problem(raw: dict, n: int) -> str | None:
    """Why a parsed body is not a usable completion of n choices (None when it is). The chat path retries
    such a body; the batch path resubmits its request."""
    choices = raw.get("choices")
    if not choices:
        return "no choices"
    if len(choices) < n:
        return f"{len(choices)} choices for n={n}"
    for ch in choices:
        content = (ch.get("message") or {}).get("content")
        if not isinstance(content, str):
            return "a choice has no text content"
    return None


def choice_logprobs(raws: list[dict]) -> list[list[float] | None]:
    """Token log-probabilities of each choice, in ChatResult.texts order; None where the server sent none."""
    out: list[list[float] | None] = []
    for raw in raws:
        for ch in sorted(raw.get("choices") or [], key=lambda c: c.get("index", 0)):
            content = (ch.get("logprobs") or {}).get("content")
            lps = [float(t["logprob"]) for t in content or [] if isinstance(t, dict) and t.get("logprob") is not None]
            out.append(lps or None)
    return out


def sequence_confidence(logprobs: list[float] | None) -> float | None:
    """exp(mean token log-probability) of a whole completion: the geometric-mean token probability, i.e. 1 /
    perplexity — CoCoA's sequence confidence (Vashurin et al. 2025).

    The whole completion, not the answer block: in a reason-then-answer completion the answer tokens follow from
    the reasoning already written and come out near-certain whatever the teacher's doubt, so the doubt shows in
    the reasoning's tokens; and locating the answer block's tokens in a server's token stream depends on its
    tokenizer. The mean (not the sum) keeps long traces from looking unsure by length alone."""
    if not logprobs:
        return None
    return float(math.exp(sum(logprobs) / len(logprobs)))


def local_response(call: Call, text: str) -> dict:
    """A chat completion body for ``text`` from a local (offline) backend: free, no usage counted."""
    return {"id": f"local-{call.key[:16]}", "object": "chat.completion", "created": int(time.time()),
            "model": call.model, "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
