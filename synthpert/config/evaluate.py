"""Settings of evaluation: how a model is run (inference) and what it is scored on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from . import StrictModel, format_validation_error, validate_config
from .client import ClientConfig


class InferenceConfig(StrictModel):
    """How a model is run. Recorded in full with every evaluation."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str | None = Field(None, description="model folder (local backends) or model name (openai)",
                              json_schema_extra={"path": "model"})
    adapter: str | None = Field(None, description="LoRA adapter folder as `synthpert train` saves it",
                                json_schema_extra={"path": "dir"})
    merge_adapter: bool = Field(False, description="transformers: merge the adapter into the weights first")
    max_new_tokens: int = Field(512, ge=1)
    explain_max_new_tokens: int = Field(
        512, ge=1, description="multitask students: token budget of the explanation written (on request: "
        "return_reasoning / --reasoning) after the answer; the answer itself uses max_new_tokens")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n_samples: int = Field(1, ge=1, le=64, description="samples per example (vote share needs > 1)")
    seed: int = 0
    probability_method: Literal["auto", "answer_logprob", "votes"] = Field(
        "auto", description="auto: answer_logprob on local backends, votes on openai")
    batch_size: int = Field(16, ge=1, description="examples per generate call (transformers) / per chunk")
    dtype: str = Field("auto", description="auto: float32 on CPU, bfloat16 on GPU")
    device: str = Field("auto", description="transformers: auto, cpu, cuda, cuda:1 ...")
    # vLLM engine settings; None = chosen by platform (CPU needs eager mode, float32 and a RAM share)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enforce_eager: bool | None = None
    max_model_len: int | None = Field(None, ge=64)
    # openai backend
    base_url: str | None = None
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var holding the key (never the key)")
    concurrency: int = Field(8, ge=1)
    cache_path: str | None = Field(None, description="openai: response cache (eval default: <out>/cache.sqlite)",
                                   json_schema_extra={"path": "file"})
    client: dict = Field(default_factory=dict, description="openai: more ClientConfig fields (timeout, prices, "
                         "max_cost, max_retries, rpm, ...)")

    @field_validator("client")
    @classmethod
    def _client_fields(cls, v: dict) -> dict:
        """The extra ClientConfig fields are checked when the config loads (a misspelt one is named)."""
        try:
            ClientConfig.model_validate(v)
        except ValidationError as e:
            raise ValueError(format_validation_error(e, ClientConfig, "inference.client")) from None
        return v

    def client_config(self) -> ClientConfig:
        """The chat-engine settings of the openai backend: this config's endpoint fields + ``client``."""
        return validate_config(ClientConfig, {
            "model": self.model, "base_url": self.base_url, "api_key_env": self.api_key_env,
            "concurrency": self.concurrency, "cache_path": self.cache_path, "progress": False, **self.client},
            origin="inference.client")

    @model_validator(mode="after")
    def _logprobs_need_a_local_backend(self):
        if self.probability_method == "answer_logprob" and self.backend == "openai":
            raise ValueError("probability_method answer_logprob needs a local backend; the openai backend returns "
                             "no log-probabilities: use votes with n_samples > 1")
        return self


class EvalConfig(StrictModel):
    dataset: str | None = Field(None, description="folder written by `synthpert data build`",
                                json_schema_extra={"path": "dir"})
    split: str = Field("test", description="train / validation / test")
    n: int | None = Field(None, ge=1, description="seeded subsample of the split (all when unset)")
    seed: int = Field(0, description="seed of the subsample and the bootstrap")
    evidence: bool | None = Field(None, description="evidence context in the prompt; unset = as the adapter "
                                  "was trained (its manifest), else off")
    n_bootstrap: int = Field(200, ge=0, description="bootstrap resamples of perturbations for CIs")
    chunk_size: int = Field(64, ge=1, description="examples per write to predictions.jsonl")
    figures: bool = True
    name: str | None = Field(None, description="display name of the model in the report")
    decision: str = Field("auto", description="how class probabilities become a label: argmax, prior (prior-shift "
                          "correction from the trained class shares to the training data's), tuned (the adapter's "
                          "decision.json, fitted on validation rows by `synthpert decide`), auto (tuned if fitted, "
                          "else prior), or a path to a decision.json")
    decision_fit_n: int = Field(2000, ge=10, description="synthpert run with decision 'tuned': validation rows (seeded "
                                "sample of the run's validation split) the rule is fitted on before evaluation")
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
