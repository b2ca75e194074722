"""Settings of distillation training: the student, LoRA, optimiser, loss mask and length policy."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..tracking import TRACKERS, check_report_to
from .base import StrictModel


class LoraSettings(StrictModel):
    """PEFT LoRA settings (SynthPert's recipe: r=32, alpha=32, dropout 0, all linear layers). Ignored with
    train.method=full (one config can then switch method), which trains every weight."""

    r: int = Field(32, ge=1, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' (every linear layer but lm_head) or a list of module names")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r)")
    layers: int | None = Field(
        None, ge=1, description="LoRA on the last N transformer layers only (PEFT layers_to_transform); null = all. "
        "Gradients then stop below those layers, so a step costs a fraction of all-layer LoRA: what makes a real "
        "model trainable on a CPU (SmolLM2-135M: the last 6 of 30 layers)")


class OptimSettings(StrictModel):
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    epochs: float = Field(1.0, gt=0, description="passes over the training examples (ignored if max_steps)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(1, ge=1, description="examples per device per micro-batch")
    grad_accum: int = Field(8, ge=1, description="micro-batches per optimizer step")
    warmup: float = Field(0.03, ge=0, description="warm-up: a share of all steps if < 1, else a step count")
    weight_decay: float = Field(0.0, ge=0)
    scheduler: str = Field("cosine", description="transformers lr_scheduler_type (cosine, linear, constant, ...)")
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: str = Field("adamw_torch", description="transformers optim name (adamw_torch, paged_adamw_8bit, ...)")
    eval_batch_size: int | None = Field(None, ge=1, description="default: batch_size")


class TrainConfig(StrictModel):
    """Settings of `synthpert train` (YAML `train:` section or a whole file, plus key=value overrides)."""

    base_model: str | None = Field(None, description="hub id or local folder of the base (student) model",
                                   json_schema_extra={"path": "model"})
    revision: str | None = Field(None, description="hub revision (commit / tag) of the base model")
    method: Literal["lora", "full"] = Field(
        "lora", description="lora: train a PEFT LoRA adapter on the frozen base model, saved as an adapter "
        "folder; full: train every weight of the base model (LLaMA-Factory's finetuning_type: full), saved as "
        "a whole model folder that eval / predict / serve / --run load in place of base model + adapter. Full "
        "keeps fp32 master weights plus AdamW's two moments (~16 bytes per parameter before activations) and "
        "writes a whole model; the lora.* settings are ignored with it; quantization=4bit (QLoRA) and RL "
        "(which continues a LoRA adapter) need method lora")
    mode: Literal["reasoning", "label_only", "multitask"] = Field(
        "reasoning", description="'reasoning': assistant = kept trace + answer (input: traces JSONL); "
        "'label_only': assistant = just the answer (input: a built dataset folder), the ablation; 'multitask': "
        "each kept trace gives two examples (distilling step-by-step, Hsieh et al. 2023): answer at once, and "
        "explain then answer; the student predicts with the answer task, so its class probabilities come "
        "before it commits to any reasoning")
    explain_fraction: float = Field(
        1.0, gt=0, le=1, description="multitask only (other modes ignore it, so one config can switch "
        "mode): share of the triples that also get the explain task (seeded); "
        "every triple keeps its answer task. Explanations are ~10x longer than answers, so a fraction buys "
        "more answer-task triples in the same compute")
    data_path: str | None = Field(None, description="kept traces JSONL, or a built dataset folder (label_only)",
                                  json_schema_extra={"path": "file"})
    dataset_dir: str | None = Field(
        None, description="built dataset folder (`synthpert data build --out`) whose data_config.json gives the "
        "training rows for evidence context; default: data_path in label_only mode",
        json_schema_extra={"path": "dir"})
    output_dir: str | None = Field(None, description="run folder (CLI --out wins)", json_schema_extra={"path": "dir"})
    only_kept: bool = Field(True, description="train only on traces the judge kept (kept == true)")
    max_examples: int | None = Field(None, ge=1, description="use at most this many training examples (seeded)")
    evidence: bool = Field(False, description="show the leakage-safe training evidence block in the student "
                           "prompt (evaluation and serving must then use it too)")
    evidence_lookup: bool = Field(
        False, description="with evidence: the block gains a line stating the `combined` baseline's class "
        "probabilities for the triple (a training example's from a fit on the other perturbation folds, never "
        "on its own label); recorded in the adapter manifest, so evaluation, prediction and serving show it too")
    chat_template: str | None = Field(
        None, description="Jinja chat template file (path, or a name in configs/chat_templates/) replacing the "
        "tokenizer's; saved with the adapter so serving uses exactly it", json_schema_extra={"path": "name_or_path"})
    loss_mask: Literal["auto", "assistant_only", "completion_only"] = Field(
        "auto", description="assistant_only: {% generation %} markers of the template; completion_only: "
        "everything after the generation prompt; auto: the first if the template has markers")
    loss_average: Literal["token", "example"] = Field(
        "token", description="token: TRL's mean over every trained token of a batch, so long examples weigh "
        "more; example: each example's mean token loss, averaged over examples, so in a multitask set the "
        "one-token answers are not outweighed by the long explanations (each task a per-example mean, as in "
        "distilling step-by-step). Not with packing or padding_free, which merge examples into one row")
    curriculum: Literal["none", "contrast_first"] = Field(
        "none", description="none: one seeded shuffle of every example; contrast_first: first the examples "
        "whose (cell line, readout gene, evidence fold) holds both changed and unchanged knockdowns (their "
        "gene-level evidence is identical, so only the knockdown's own evidence tells them apart), then the "
        "rest, each part shuffled (seeded). The student learns to read the knockdown before the gene's overall "
        "rate, which alone explains most labels. Pair with data.train_subsample.gene_matched, which draws such "
        "contrasts")
    max_length: int = Field(2048, ge=16, description="longest tokenized example (prompt + assistant)")
    overlength: Literal["drop", "truncate"] = Field(
        "drop", description="what to do with longer examples: drop them (a truncated trace loses its answer and "
        "stop token) or keep their start")
    max_overlength_fraction: float = Field(0.02, ge=0, le=1, description="refuse to train if more than this "
                                           "share of examples exceeds max_length")
    eval_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of (cell line, perturbation) groups "
                                 "held out for eval loss (label_only: the dataset's validation split); 0 = none")
    eval_max_examples: int = Field(256, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps (default: at the end)")
    save_steps: int = Field(200, ge=1, description="checkpoint every N steps (for --resume)")
    save_total_limit: int | None = Field(2, ge=1, description="checkpoints kept")
    logging_steps: int = Field(10, ge=1)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 on CPU. bf16 also runs on CPU (autocast; "
        "fast on CPUs with avx512_bf16 / amx_bf16, a warning on others); fp16 needs a GPU")
    quantization: Literal["none", "4bit"] = Field("none", description="4bit = QLoRA (bitsandbytes NF4, CUDA only)")
    gradient_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="recompute activations in the backward pass to save memory (selective: TRL's SAC)")
    packing: bool = Field(False, description="pack examples into max_length rows (BFD, padding-free)")
    padding_free: bool = Field(False, description="concatenate a batch without padding (position_ids)")
    attn_implementation: str | None = Field(None, description="sdpa, eager, flash_attention_2, ... (default: "
                                            "transformers' choice)")
    use_liger_kernel: bool = Field(False, description="Liger fused kernels (needs liger-kernel; GPU)")
    resume: bool = Field(False, description="continue from the last checkpoint in the run folder")
    report_to: list[str] = Field(
        ["none"], description=f"experiment trackers ({', '.join(TRACKERS)}); the tracker run is named after the "
        "run folder, `synthpert eval` logs its metrics to the same run, and each tracker needs its extra "
        "(pip install 'synthpert[tensorboard]'). TensorBoard logs go to <run>/tensorboard")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, v):
        return check_report_to(v)

    @model_validator(mode="after")
    def _combinations(self):
        if self.evidence_lookup and not self.evidence:
            raise ValueError("evidence_lookup adds a line to the evidence block: it needs evidence=true")
        if self.method == "full" and self.quantization == "4bit":
            raise ValueError("method=full trains every weight, but quantization=4bit freezes the base model in "
                             "4 bits (QLoRA trains only a LoRA adapter on it): use method=lora with 4bit, or "
                             "quantization=none with full")
        if self.quantization == "4bit" and self.precision == "fp32":
            raise ValueError("QLoRA (quantization=4bit) computes in bf16/fp16; precision=fp32 is not possible")
        if self.packing and self.overlength == "truncate":
            raise ValueError("packing cuts rows at max_length itself; use overlength=drop with packing")
        if self.curriculum != "none" and self.packing:
            raise ValueError("curriculum orders the examples; packing reorders them into rows (use one or the other)")
        if self.loss_average == "example" and (self.packing or self.padding_free):
            raise ValueError("loss_average=example needs one example per row; packing and padding_free merge them")
        if self.lora.layers is not None and isinstance(self.lora.target_modules, str) \
                and self.lora.target_modules != "all-linear":
            raise ValueError("lora.layers needs lora.target_modules as 'all-linear' or a list of module names (PEFT "
                             "cannot combine a pattern string with a layer selection)")
        if self.gradient_checkpointing == "selective" and self.quantization == "4bit":
            raise ValueError("selective checkpointing is not supported with QLoRA's reentrant checkpointing")
        return self
