"""Settings of `synthpert rl`: GRPO on top of an SFT adapter, its rewards, sampling and vLLM generation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..answer import canonical_class
from ..tracking import TRACKERS, check_report_to
from .base import StrictModel


class RewardSettings(StrictModel):
    """What a completion earns. Total = correctness + format + length (each logged separately by TRL)."""

    preset: Literal["inverse_frequency", "aroma"] = Field(
        "inverse_frequency", description="inverse_frequency: a correct answer earns 1/(3·share of its class among "
        "the RL prompts), so 'not DE' cannot win by volume; aroma: +5 correct / -1 wrong (AROMA, ACL 2026)")
    correct: dict[str, float] | None = Field(
        None, description="per-class reward for a correct answer, keys up/down/not_de (or the full labels); "
        "overrides the preset's values for the classes named")
    wrong: float | None = Field(None, description="reward of a wrong or unparseable answer (default: 0, aroma: -1)")
    format: float = Field(0.5, description="bonus for a strictly parseable answer (answer.py's strict parser)")
    length_penalty: float = Field(0.0, ge=0, description="subtract length_penalty x (completion tokens / "
                                  "max_completion_length); 0 = off")

    @model_validator(mode="after")
    def _known_classes(self):
        unknown = sorted(k for k in (self.correct or {}) if canonical_class(k) is None)
        if unknown:
            raise ValueError(f"unknown class name(s) in rewards.correct: {unknown}; use up, down, not_de (or "
                             "upregulated, downregulated, not differentially expressed)")
        return self


class RLConfig(StrictModel):
    """Settings of `synthpert rl` (YAML `rl:` section or a whole file, plus key=value overrides)."""

    adapter: str | None = Field(None, description="the SFT run folder written by `synthpert train` (adapter, "
                                "tokenizer, manifest.json); RL continues this adapter",
                                json_schema_extra={"path": "dir"})
    base_model: str | None = Field(None, description="base model; default: the SFT manifest's (a different one is "
                                   "an error)", json_schema_extra={"path": "model"})
    dataset_dir: str | None = Field(None, description="built dataset folder (`synthpert data build --out`): "
                                    "prompts come from its TRAINING split", json_schema_extra={"path": "dir"})
    split: str = Field("train", description="the split prompts come from; only 'train' is accepted (RL on "
                       "validation or test rows would tune the model to the rows it is scored on)")
    prompts_path: str | None = Field(
        None, description="optional JSONL of training triples (cell_line, perturbation, gene, label; e.g. kept "
        "traces) to use instead of the whole training split; any row of the dataset's validation or test split "
        "is refused", json_schema_extra={"path": "file"})
    max_prompts: int | None = Field(None, ge=1, description="use at most this many prompts (seeded sample)")
    output_dir: str | None = Field(None, description="run folder (CLI --out wins)", json_schema_extra={"path": "dir"})
    rewards: RewardSettings = Field(default_factory=RewardSettings)

    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (a GRPO group); AROMA: "
                                 "16 beat 4")
    batch_size: int = Field(8, ge=1, description="completions per device per micro-batch (TRL "
                            "per_device_train_batch_size)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    generation_batch_size: int | None = Field(
        None, ge=1, description="completions generated at once (default batch_size x grad_accum x processes); "
        "must be a multiple of num_generations")
    max_completion_length: int = Field(512, ge=1, description="longest sampled completion in tokens")
    max_prompt_length: int | None = Field(None, ge=16, description="refuse prompts longer than this (tokens)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1)
    scale_rewards: Literal["none", "group", "batch"] = Field(
        "none", description="'none' (Dr. GRPO): per-group std normalisation makes class probabilities "
        "overconfident (Bereket & Leskovec 2025), and PerturbQA scores per-gene AUROC over them")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"] = Field(
        "dr_grpo", description="TRL loss aggregation; dr_grpo normalises by a constant (no length bias)")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the SFT policy (0: no reference model)")
    epsilon: float = Field(0.2, gt=0, description="PPO clip range")
    num_iterations: int = Field(1, ge=1, description="optimisation passes per generated batch (GRPO's mu)")
    mask_truncated_completions: bool = Field(False, description="exclude completions cut at max_completion_length "
                                             "from the loss")

    lr: float = Field(5e-6, gt=0, description="peak learning rate")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    epochs: float = Field(1.0, gt=0, description="passes over the prompts (ignored if max_steps)")
    warmup: float = Field(0.0, ge=0, description="warm-up: a share of all steps if < 1, else a step count")
    scheduler: str = Field("constant", description="transformers lr_scheduler_type")
    max_grad_norm: float = Field(1.0, gt=0)
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (for --resume)")
    save_total_limit: int | None = Field(2, ge=1)
    logging_steps: int = Field(1, ge=1)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 on a GPU that "
                                                               "supports it, fp32 on CPU; bf16 also runs on CPU, "
                                                               "fp16 needs a GPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory (8B: on)")
    resume: bool = Field(False, description="continue from the last checkpoint in the run folder")
    report_to: list[str] = Field(
        ["none"], description=f"experiment trackers ({', '.join(TRACKERS)}), as train.report_to: the tracker "
        "run is named after the RL run folder and logs the reward curves; `synthpert eval` of the RL adapter "
        "adds its metrics to it. Each tracker needs its extra (pip install 'synthpert[tensorboard]'); "
        "TensorBoard logs go to <run>/tensorboard")

    use_vllm: bool = Field(False, description="generate rollouts with vLLM (needs vllm and a CUDA GPU)")
    vllm_mode: Literal["colocate", "server"] = Field("colocate", description="colocate: vLLM in the training "
                                                     "process, sharing the GPU")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1, description="colocate: the GPU share vLLM takes "
                                               "(weights + KV cache); training needs the rest")
    vllm_enable_sleep_mode: bool = Field(False, description="offload vLLM's weights and KV cache during the "
                                         "optimizer step")
    vllm_max_model_length: int | None = Field(None, ge=16, description="vLLM context (prompt + completion)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, v):
        return check_report_to(v)

    @model_validator(mode="after")
    def _combinations(self):
        if self.split != "train":
            raise ValueError(f"split={self.split!r}: RL trains on the training split only (prompts from the "
                             "validation or test split would tune the model on the rows it is evaluated on)")
        per_step = self.generation_batch_size or self.batch_size * self.grad_accum
        if per_step % self.num_generations:
            which = ("generation_batch_size" if self.generation_batch_size else
                     f"batch_size x grad_accum = {self.batch_size} x {self.grad_accum}")
            raise ValueError(f"{which} = {per_step} completions is not a multiple of num_generations="
                             f"{self.num_generations}: every prompt's group must be generated together")
        if self.generation_batch_size and self.generation_batch_size % self.batch_size:
            raise ValueError(f"generation_batch_size={self.generation_batch_size} is not a multiple of "
                             f"batch_size={self.batch_size}")
        if self.vllm_mode == "server" and self.use_vllm:
            raise ValueError("vllm_mode=server is not wired up in synthpert rl yet; use vllm_mode=colocate")
        return self
