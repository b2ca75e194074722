"""Rate limits and retry classification for the chat engine: windows, retryable errors, server hints."""

from __future__ import annotations

import asyncio
import time
from collections import deque

RETRYABLE_STATUS = {408, 409, 429}  # plus every 5xx


class RateLimiter:
    """Sliding 60-second windows over requests and (estimated) tokens."""

    def __init__(self, rpm: int | None, tpm: int | None):
        self.rpm, self.tpm = rpm, tpm
        self.events: deque[tuple[float, int]] = deque()
        self.tokens = 0

    async def acquire(self, tokens: int) -> None:
        if self.rpm is None and self.tpm is None:
            return
        while True:
            now = time.monotonic()
            while self.events and now - self.events[0][0] >= 60:
                self.tokens -= self.events.popleft()[1]
            ok_r = self.rpm is None or len(self.events) < self.rpm
            ok_t = self.tpm is None or self.tokens + tokens <= self.tpm or not self.events
            if ok_r and ok_t:
                self.events.append((now, tokens))
                self.tokens += tokens
                return
            await asyncio.sleep(max(0.01, self.events[0][0] + 60 - now))


class Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, rate_limited: bool = False):
        super().__init__(reason)
        self.reason, self.retry_after, self.rate_limited = reason, retry_after, rate_limited


def retry_after(headers) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def server_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        msg = inner.get("message") if isinstance(inner, dict) else None
        if msg:
            return str(msg)
    return str(getattr(err, "message", err))


HINTS = {
    400: "the server rejected the request; check the sampling parameters (e.g. OpenAI reasoning models need "
         "max_completion_tokens instead of max_tokens and reject temperature) and the prompt length",
    401: "authentication failed; check the key in ${env}",
    403: "the key is not allowed to use this model or endpoint",
    404: "model or endpoint not found; check the model name and base_url (it usually ends in /v1)",
    422: "the server could not process the request body; check the sampling parameters",
}
