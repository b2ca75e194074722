"""Settings of evaluation: how a model is run (inference) and what it is scored on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from .base import StrictModel, format_validation_error, validate_config
from .client import ClientConfig


class InferenceConfig(StrictModel):
    """How a model is run. Recorded in full with every evaluation."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str | None = Field(None, description="model folder (local backends) or model name (openai)",
                              json_schema_extra={"path": "model"})
    adapter: str | None = Field(None, description="LoRA adapter folder as `synthpert train` saves it",
                                json_schema_extra={"path": "dir"})
    merge_adapter: bool = Field(False, description="merge the adapter into the weights first (transformers: in "
                                "memory; vllm: a merged copy in the model cache, then an engine without LoRA, ~4x "
                                "faster on CPU)")
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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on GPU. bfloat16 runs on CPU too (transformers "
        "backend: half the weights' memory; fast only on CPUs with avx512_bf16 / amx_bf16)")
    device: str = Field("auto", description="transformers: auto, cpu, cuda, cuda:1 ...")
    # vLLM engine settings; None = chosen by platform (CPU needs eager mode, float32 and a RAM share)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enforce_eager: bool | None = None
    max_model_len: int | None = Field(None, ge=64)
    data_parallel_size: int = Field(
        1, ge=1, description="vllm: engines run side by side, one per GPU of the node, each scoring its share "
        "of the examples. vLLM's offline engine refuses data_parallel_size > 1 inside one process, so synthpert "
        "runs them as Ray actors: needs eval.engine ray (eval.ray.num_workers defaults to this)")
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

    @model_validator(mode="after")
    def _data_parallel_needs_vllm(self):
        if self.data_parallel_size > 1 and self.backend != "vllm":
            raise ValueError(f"data_parallel_size {self.data_parallel_size} is a vllm setting; backend is "
                             f"{self.backend!r} (set backend: vllm, or leave data_parallel_size at 1)")
        return self


class RayConfig(StrictModel):
    """Where and how wide `eval.engine: ray` runs (an actor pool, each actor holding one backend)."""

    address: str | None = Field(None, description="an existing Ray cluster (ray://HEAD:10001, or 'auto' on a "
                                "cluster node); unset = start a local Ray instance with num_workers x "
                                "cpus_per_worker CPUs and stop it afterwards")
    num_workers: int | None = Field(None, ge=1, description="actors, each loading the model once; unset = "
                                    "inference.data_parallel_size (1 unless set)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per actor (also its torch threads)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per actor: 1 for a vLLM or transformers engine "
                                   "per GPU; 0 on CPU")
    batch_size: int | None = Field(None, ge=1, description="examples per actor call; unset = eval.chunk_size")


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
    engine: Literal["local", "ray"] = Field(
        "local", description="local: this process drives one backend; ray: the examples become a Ray Dataset "
        "scored by a pool of actors (eval.ray), each running the same backend (needs `pip install "
        "'synthpert[ray]'`)")
    ray: RayConfig = Field(default_factory=RayConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)

    @model_validator(mode="after")
    def _ray_engine_fits_the_backend(self):
        inf, dp = self.inference, self.inference.data_parallel_size
        if self.engine == "ray" and inf.backend == "openai":
            raise ValueError("eval.engine ray runs local backends (transformers, vllm) in actors; the openai "
                             "backend already sends requests concurrently (inference.concurrency): use engine local")
        if dp > 1 and self.engine != "ray":
            raise ValueError(f"inference.data_parallel_size {dp} needs eval.engine ray: vLLM's offline engine "
                             "refuses data_parallel_size > 1 in one process, so synthpert runs one engine per "
                             "GPU as Ray actors")
        if dp > 1 and self.ray.num_workers not in (None, dp):
            raise ValueError(f"eval.ray.num_workers {self.ray.num_workers} and inference.data_parallel_size {dp} "
                             "disagree: set one of them")
        return self

    def ray_workers(self) -> int:
        """Actors of the Ray engine: eval.ray.num_workers, else the vLLM data-parallel size."""
        return self.ray.num_workers or self.inference.data_parallel_size
