"""Settings of the local endpoint: binding, auth, request caps and bounds, CORS, batching, and the model it serves."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from .base import StrictModel
from .evaluate import InferenceConfig


class ServeSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str = Field("SYNTHPERT_API_KEY", description="NAME of the env var holding the key; unset = no auth")
    max_batch: int = Field(64, ge=1, description="items per /v1/predict/batch request")
    max_n_samples: int = Field(8, ge=1)
    max_tokens: int = Field(1024, ge=1, description="cap on max_tokens of chat completions")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_messages: int = Field(64, ge=1)
    max_in_flight: int = Field(64, ge=1, description="requests handled at once, those waiting for the model "
                               "included; one more is answered 503 with Retry-After at once (never queued)")
    request_timeout_s: float = Field(120.0, gt=0, description="seconds a request may take, reading its body "
                                     "included; past it the answer is 504")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed to call the "
                                    "endpoint (scheme://host[:port], or '*'); empty = CORS off")
    batch_window_ms: float = Field(5.0, ge=0, description="how long the batcher waits to fill a batch")
    served_name: str | None = Field(None, description="model id for /v1/models (default: adapter or model folder name)")
    evidence_dataset: str | None = Field(None, description="built dataset folder whose training rows provide the "
                                         "evidence context (for models trained with it)",
                                         json_schema_extra={"path": "dir"})
    decision: str = Field("auto", description="how class probabilities become /v1/predict's label: argmax, prior, "
                          "tuned (the adapter's decision.json) or auto (tuned if fitted, else prior when the training "
                          "data is at hand via evidence_dataset, else argmax); see synthpert eval")

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        # An origin is what a browser sends in its Origin header: anything else would never match.
        bad = [o for o in v if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o)]
        if bad:
            raise ValueError(f"not an origin (scheme://host[:port] or '*'): {bad}")
        return v


class ServeConfig(ServeSettings):
    """What `synthpert serve` runs: the endpoint's settings and the local model behind it (``inference``)."""

    inference: InferenceConfig = Field(default_factory=InferenceConfig)

    @model_validator(mode="after")
    def _local_model(self):
        if self.inference.backend == "openai":
            raise ValueError("serve runs a local model: use --backend transformers or vllm")
        return self
