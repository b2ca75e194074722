"""Settings of the chat engine: endpoint, key variable, concurrency, retries, prices, budget, sampling."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field

from ..errors import SynthpertError
from .base import StrictModel


class ModelPrice(StrictModel):
    """USD per million tokens. Reasoning tokens are billed as completion tokens (OpenAI's accounting)."""

    input: float = Field(..., ge=0, description="USD per 1M prompt tokens")
    output: float = Field(..., ge=0, description="USD per 1M completion tokens (reasoning included)")
    cached_input: float | None = Field(None, ge=0, description="USD per 1M cached prompt tokens (default: input)")


class SamplingConfig(StrictModel):
    """Sampling parameters sent with every request (None = not sent, the server's default applies)."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="completion cap (use max_completion_tokens for "
                                   "OpenAI reasoning models, which reject max_tokens)")
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    reasoning_effort: str | None = None
    logprobs: bool = Field(False, description="ask for token log-probabilities (OpenAI chat logprobs=true); the "
                           "consistency judge's rank_by=cocoa reads them. Sent only when true, so turning it on "
                           "changes the request (and its cache key) and leaving it off changes nothing")
    extra: dict[str, Any] = Field(default_factory=dict, description="other request fields, sent as they are "
                                  "(e.g. vLLM's top_k)")

    def to_dict(self) -> dict:
        # logprobs=false is the servers' default: not sent, so the cache keys of existing runs stay valid
        d = {k: v for k, v in self.model_dump().items() if v is not None and k != "extra" and v is not False}
        return {**d, **self.extra}


class ClientConfig(StrictModel):
    """Where and how to send requests. Any OpenAI-compatible server: OpenAI, vLLM, others."""

    model: str = Field("gpt-4o-mini", description="model name as the server knows it")
    base_url: str = Field("https://api.openai.com/v1", description="OpenAI-compatible endpoint, e.g. "
                          "http://localhost:8000/v1 for a vLLM server")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="NAME of the environment variable holding the "
                                    "API key (the key itself never goes in a config); null for servers "
                                    "without auth")
    concurrency: int = Field(16, ge=1, le=4096, description="requests in flight at once")
    rpm: int | None = Field(None, ge=1, description="requests-per-minute limit")
    tpm: int | None = Field(None, ge=1, description="tokens-per-minute limit (prompt estimate + max tokens)")
    timeout: float = Field(120.0, gt=0, description="seconds per request attempt")
    max_retries: int = Field(6, ge=0, description="retries per request on retryable errors")
    backoff_initial: float = Field(1.0, ge=0, description="first retry delay in seconds (doubles, with jitter)")
    backoff_max: float = Field(60.0, ge=0)
    prices: dict[str, ModelPrice] = Field(default_factory=dict, description="per-model prices; a key also "
                                          "matches dated variants (gpt-4o-mini matches gpt-4o-mini-2024-07-18)")
    max_cost: float | None = Field(None, gt=0, description="USD this invocation may spend; stops before exceeding")
    cache_path: str | None = Field(None, description="SQLite response cache (default: <out>/cache.sqlite)",
                                   json_schema_extra={"path": "file"})
    native_n: bool = Field(True, description="send n samples as one request with n=...; false for servers "
                           "that ignore n (then n requests are sent, seeds offset per sample)")
    completion_tokens_estimate: int = Field(800, ge=1, description="expected completion tokens per sample, "
                                            "for the dry-run estimate (and the budget when no max_tokens)")
    progress: bool = Field(True, description="rich progress bar with the running cost")
    batch: bool = Field(False, description="send through the OpenAI Batch API (files + batches) instead of one chat "
                        "request at a time: results within the completion window (up to 24 h) at the batch "
                        "price; job ids are kept in the cache database and <out>/batches.json, so a rerun polls "
                        "the jobs in flight instead of paying again")
    batch_discount: float = Field(0.5, gt=0, le=1, description="batch price as a share of the chat prices in "
                                  "`prices` (OpenAI's Batch API: half price)")
    batch_poll_interval: float = Field(30.0, gt=0, description="seconds between status checks of batches in flight")
    batch_max_requests: int = Field(50_000, ge=1, le=50_000, description="requests per batch input file (the API's "
                                    "limit is 50,000)")
    batch_max_bytes: int = Field(200_000_000, ge=1, le=200_000_000, description="bytes per batch input file (the "
                                 "API's limit is 200 MB)")
    batch_resubmit: bool = Field(True, description="resubmit requests whose batch failed, expired or was cancelled, "
                                 "and per-request errors; false (`--no-resubmit`): report them only")
    batch_max_rounds: int = Field(3, ge=1, description="batch submissions per invocation: the first plus "
                                  "resubmissions of what is still missing")

    def api_key(self) -> str:
        """The key from the environment variable named by ``api_key_env``; a clear error when it is unset."""
        if self.api_key_env is None:
            return "EMPTY"  # vLLM and other local servers without auth still need a non-empty string
        key = os.environ.get(self.api_key_env)
        if not key:
            raise SynthpertError(f"environment variable {self.api_key_env} is not set; export your API key there "
                                 f"(or set api_key_env to the variable that holds it, or null for a server "
                                 f"without authentication)")
        return key

    def batch_price(self, price: ModelPrice | None) -> ModelPrice | None:
        """A chat price scaled by ``batch_discount`` (None stays None: unpriced models cost nothing)."""
        if price is None:
            return None
        d = self.batch_discount
        return ModelPrice(input=price.input * d, output=price.output * d,
                          cached_input=None if price.cached_input is None else price.cached_input * d)
