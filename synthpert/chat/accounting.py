"""Token and cost accounting: usage from response bodies, per-model prices, generous prompt estimates."""

from __future__ import annotations

import json
import math

from ..config.client import ModelPrice
from ..schema import Usage


def price_for(prices: dict[str, ModelPrice], model: str) -> ModelPrice | None:
    if model in prices:
        return prices[model]
    prefixes = [k for k in prices if model.startswith(k)]
    return prices[max(prefixes, key=len)] if prefixes else None


def cost_of(usage: Usage, price: ModelPrice | None) -> float:
    if price is None:
        return 0.0
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_rate = price.cached_input if price.cached_input is not None else price.input
    return ((usage.prompt_tokens - cached) * price.input + cached * cached_rate
            + usage.completion_tokens * price.output) / 1e6


def usage_from_raw(raw: dict) -> Usage:
    u = raw.get("usage") or {}
    details_c = u.get("completion_tokens_details") or {}
    details_p = u.get("prompt_tokens_details") or {}
    return Usage(prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=int(u.get("completion_tokens") or 0),
                 reasoning_tokens=int(details_c.get("reasoning_tokens") or 0),
                 cached_tokens=int(details_p.get("cached_tokens") or 0))


def estimate_prompt_tokens(messages: list[dict]) -> int:
    """Deliberately generous (3 characters per token + per-message overhead): it sizes budget reservations."""
    chars = sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else len(json.dumps(m.get("content")))
                for m in messages)
    return math.ceil(chars / 3) + 8 * len(messages)


def completion_cap(sampling: dict) -> int | None:
    cap = sampling.get("max_completion_tokens") or sampling.get("max_tokens")
    return int(cap) if cap else None
