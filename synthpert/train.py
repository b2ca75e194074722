"""Distillation training: SFT of a student model on kept reasoning traces (TRL SFTTrainer), of a PEFT LoRA
adapter (train.method=lora) or of every weight (method=full).

We tokenize the conversations ourselves (loss_mask.py), through the tokenizer's own chat template, and hand
SFTTrainer ``input_ids`` + ``labels``, so the guards inspect exactly the tokens and loss mask that are
trained, before the first step. Examples come from train_data.py.

Outputs (the run folder): the adapter (full: the whole model, which later stages load alone), the tokenizer
with the exact chat template used, the resolved config, ``manifest.json`` and ``checkpoints/`` (``--resume``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .config import dump_config
from .decision import class_shares
from .checkpoints import graceful_stop_callback, last_complete_checkpoint, quiet_progress, restore_signal
from .config.train import TrainConfig
from .errors import SynthpertError
from .loss_mask import check_overlength, check_vocab, end_of_turn_ids, mask_mode, tokenize_rows
from .models import resolve_model, shipped_model
from .precision import device_kind as _device_kind, resolve_precision as precision_for
from .prompting import student_prompt_hash
from .resources import sha256_file, sha256_text
from . import tracking
from .run_folder import own_cell_lines
from .runs import ADAPTER_MANIFEST, git_revision, library_versions, storage_errors, write_adapter_manifest
from .tokenizer import load_tokenizer
from .train_data import data_hash, training_examples

log = logging.getLogger("synthpert.train")

CONFIG_FILE = "train_config.yaml"
STATE_FILE = "run_state.json"
CHECKPOINTS = "checkpoints"


def student_tokenizer(cfg: TrainConfig):
    """The base model's tokenizer with the chat template training uses (``cfg.chat_template`` when given)."""
    if not cfg.base_model:
        raise SynthpertError("no base_model: set it in the config (hub id or local folder), e.g. base_model=DIR")
    return load_tokenizer(cfg.base_model, revision=cfg.revision, chat_template=cfg.chat_template)


# ---------------------------------------------------------------------------------------------------------
# Model and trainer


def resolve_precision(cfg: TrainConfig) -> str:
    return precision_for(cfg.precision, cfg.quantization, "training", _device_kind())[0]


def load_model(cfg: TrainConfig, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    # full fine-tuning keeps fp32 master weights (bf16/fp16 run under autocast): updates of ~lr*1e-3 vanish
    # when added to bf16 weights; LoRA's base is frozen, so it loads in the compute dtype
    kwargs: dict[str, Any] = {"revision": cfg.revision, "dtype": torch.float32 if cfg.method == "full" else dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization == "4bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SynthpertError("quantization=4bit needs bitsandbytes: pip install bitsandbytes") from None
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        kwargs["device_map"] = {"": PartialState(cpu=False).local_process_index}  # one full copy per DDP process
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
    except (OSError, ValueError) as e:
        raise SynthpertError(f"cannot load base_model {cfg.base_model!r}: {e}") from None
    if cfg.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing != "none",
            gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def lora_config(cfg: TrainConfig, model=None):
    """PEFT's LoRA settings. ``lora.layers: N`` becomes the last N layers of ``model``; PEFT then wants the module
    names as a list, so "all-linear" is spelled out from the model (every linear layer but the output head)."""
    from peft import LoraConfig

    layers, targets = None, cfg.lora.target_modules
    if cfg.lora.layers is not None:
        n = getattr(getattr(model, "config", None), "num_hidden_layers", None) if model is not None else None
        if not n:
            raise SynthpertError("lora.layers needs the base model's number of layers (num_hidden_layers)")
        if cfg.lora.layers > n:
            raise SynthpertError(f"lora.layers={cfg.lora.layers}, but the base model has {n} layers")
        layers = list(range(n - cfg.lora.layers, n))
        if targets == "all-linear":
            targets = _linear_names(model)
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, use_rslora=cfg.lora.use_rslora, bias="none",
                      layers_to_transform=layers, task_type="CAUSAL_LM")


def _linear_names(model) -> list[str]:
    import torch

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def _field(fields, *names: str) -> str | None:
    return next((n for n in names if n in fields), None)


def sft_config(cfg: TrainConfig, out_dir: Path, precision: str, has_eval: bool):
    from trl import SFTConfig

    fields = SFTConfig.__dataclass_fields__
    o = cfg.optim
    kwargs: dict[str, Any] = dict(
        output_dir=str(out_dir / CHECKPOINTS), learning_rate=o.lr, num_train_epochs=o.epochs,
        max_steps=o.max_steps or -1, per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.eval_batch_size or o.batch_size, gradient_accumulation_steps=o.grad_accum,
        warmup_steps=o.warmup, weight_decay=o.weight_decay, lr_scheduler_type=o.scheduler,
        max_grad_norm=o.max_grad_norm, optim=o.optimizer, logging_steps=cfg.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        eval_strategy=("steps" if cfg.eval_steps else "no") if has_eval else "no", eval_steps=cfg.eval_steps,
        seed=cfg.seed, data_seed=cfg.seed, bf16=precision == "bf16", fp16=precision == "fp16",
        dataloader_pin_memory=_device_kind() == "cuda", use_cpu=_device_kind() == "cpu",
        # We enforce max_length ourselves (guards + drop policy); padding-free without packing needs None.
        max_length=cfg.max_length if (cfg.packing or not cfg.padding_free) else None,
        packing=cfg.packing, padding_free=cfg.padding_free, use_liger_kernel=cfg.use_liger_kernel,
        # a curriculum is an order: keep it (sequential sampler, no up-front shuffle; resume replays it exactly)
        shuffle_dataset=cfg.curriculum == "none", **tracking.trainer_kwargs(cfg.report_to, out_dir, fields),
    )
    if cfg.curriculum != "none":
        kwargs["train_sampling_strategy"] = "sequential"
    if cfg.packing:
        kwargs["packing_strategy"] = "bfd"
    # transformers renamed gradient_checkpointing -> activation_checkpointing (5.2x); support both.
    flag = _field(fields, "activation_checkpointing", "gradient_checkpointing")
    # said either way: TRL's SFTConfig turns it on by default, which recomputed every forward pass of a
    # `gradient_checkpointing: none` run (a fifth of the quickstart's training time)
    kwargs[flag] = cfg.gradient_checkpointing != "none"
    if cfg.gradient_checkpointing != "none":
        kw = _field(fields, "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
        gc_kwargs: dict[str, Any] = {"use_reentrant": cfg.quantization == "4bit"}
        if cfg.gradient_checkpointing == "selective":
            gc_kwargs["selective"] = True
        kwargs[kw] = gc_kwargs
    return SFTConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# The run


class TrainResult:
    def __init__(self, summary: dict, trainer):
        self.summary = summary
        self.trainer = trainer


def _check_run_dir(out_dir: Path, cfg: TrainConfig, dhash: str) -> None:
    """Every process checks before any writes (else a later rank would see the run the first rank just began)."""
    state_path = out_dir / STATE_FILE
    ckpt_dir = out_dir / CHECKPOINTS
    if cfg.resume:
        if not state_path.exists():
            raise SynthpertError(f"--resume: {out_dir} holds no training run to resume")
        state = json.loads(state_path.read_text())
        if state.get("data_sha256") != dhash:
            raise SynthpertError(f"--resume: the training data differ from the ones this run started with "
                                 f"({state.get('data_sha256', '?')[:12]}… vs {dhash[:12]}…); resume with the same data")
        return
    if state_path.exists() or (ckpt_dir.exists() and any(ckpt_dir.iterdir())) or (out_dir / ADAPTER_MANIFEST).exists():
        raise SynthpertError(f"{out_dir} already holds a training run: continue it with --resume, or choose "
                             "another --out")


def _start_run_dir(out_dir: Path, cfg: TrainConfig, dhash: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(dump_config(cfg))
    if not cfg.resume:
        (out_dir / STATE_FILE).write_text(json.dumps({"data_sha256": dhash, "started": time.time()}))


def _dataset(records: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(records) if records else None


def _losses(history: list[dict]) -> tuple[float | None, float | None]:
    losses = [h["loss"] for h in history if "loss" in h]
    return (losses[0], losses[-1]) if losses else (None, None)


def average_loss_per_example(trainer) -> None:
    """train.loss_average=example: every example weighs the same in the loss, whatever its length.

    TRL averages over tokens: in a multitask set a tenth of the examples explain (~150 tokens each) and the rest
    answer (one label token that matters), so the explanations carry ~15 times the answers' weight and the
    student learns to write before it learns to decide. TRL 1.16's loss is the sum of -log p over the label
    tokens divided by their count N in the accumulated batch; a forward hook scales each example's token
    log-probs by N / (B · n_i) (n_i its label tokens, B the examples N counts), which turns that sum into the
    mean over examples of each example's mean token loss. Entropy and token accuracy are left as they are."""
    import torch

    state = {"n_items": None}
    plain = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        state["n_items"] = num_items_in_batch
        return plain(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def reweight(_module, _args, kwargs, output):
        if not kwargs.get("fused_lm_head"):
            return output
        log_probs, mask = getattr(output, "log_probs", None), getattr(output, "label_mask", None)
        if log_probs is None or mask is None:
            raise SynthpertError("train.loss_average=example needs the per-token outputs of TRL's fused loss "
                                 "(trl 1.16); this TRL returns none: use loss_average=token")
        mask = mask.to(log_probs.dtype)
        n_items, rows = state["n_items"], mask.shape[0]
        if n_items is None:
            total = mask.sum()
        else:  # N counts the tokens of every accumulation step (and rank): so does B
            total = torch.as_tensor(n_items, dtype=log_probs.dtype, device=log_probs.device)
            rows *= getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
            if trainer.args.average_tokens_across_devices:
                rows *= trainer.accelerator.num_processes
        weights = total / (rows * mask.sum(dim=1).clamp(min=1))
        output.log_probs = log_probs * weights.detach()[:, None]
        return output

    trainer.compute_loss = compute_loss
    trainer.model.register_forward_hook(reweight, with_kwargs=True)


def check_launch(env, device: str, num_processes: int) -> None:
    """Refuse a launch whose processes would each train the whole model alone, writing the same output.

    accelerate 1.15 does that without a word for an FSDP config on a CPU-only machine (docs/distributed.md):
    every process comes up outside any process group. ``env``: the process environment."""
    if device == "cpu" and env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise SynthpertError("an accelerate FSDP config was launched on a machine without a GPU: FSDP does not run "
                             "on CPU (each process would train the whole model on its own). On CPU, launch with "
                             "configs/accelerate/ddp.yaml (gloo DDP); FSDP needs GPUs.")
    world = int(env.get("WORLD_SIZE") or 1)
    if world > 1 and num_processes == 1:
        raise SynthpertError(f"this process is one of WORLD_SIZE={world} launched processes but joined no process "
                             "group, so each would train the whole model alone and write the same output. Check "
                             "the launcher's config (distributed_type, use_cpu) against docs/distributed.md.")


def train_model(cfg: TrainConfig, source, out_dir: str | Path) -> TrainResult:
    """Everything `synthpert train` does; returns the summary and the trainer (whose model is in memory)."""
    from accelerate import PartialState

    started = time.time()
    out_dir = Path(out_dir).expanduser()
    shipped_name = cfg.base_model if shipped_model(cfg.base_model) else None
    # a shipped model's short name trains on its converted folder, which adapter_config.json then records
    cfg = cfg.model_copy(update={"base_model": resolve_model(cfg.base_model)})
    if cfg.base_model and Path(cfg.base_model).expanduser().is_dir():
        # adapter_config.json records this path: make it absolute so the adapter loads from anywhere
        cfg = cfg.model_copy(update={"base_model": str(Path(cfg.base_model).expanduser().resolve())})
    # PartialState is a process-wide singleton and the first call decides the backend: on CPU it must be
    # cpu=True (as TrainingArguments(use_cpu=True) asks), or a torchrun launch would not become gloo DDP.
    state = PartialState(cpu=_device_kind() == "cpu")
    check_launch(os.environ, _device_kind(), state.num_processes)
    # fails early on CPU for QLoRA / fp16; warns for bf16 on a CPU without bf16 instructions
    precision, precision_warning = precision_for(cfg.precision, cfg.quantization, "training", _device_kind())
    tracking.require(cfg.report_to)  # a missing tracker package fails before an hour of training, not after
    examples = training_examples(cfg, source)
    tokenizer = student_tokenizer(cfg)
    mode = mask_mode(cfg, tokenizer)
    eot = end_of_turn_ids(tokenizer, cfg.base_model, cfg.revision)
    if not eot:
        raise SynthpertError(f"{cfg.base_model}: neither the tokenizer nor generation_config names an end-of-turn "
                             "(eos) token")
    train_records, over = tokenize_rows(examples["train"], tokenizer, cfg, mode, eot, "train")
    check_overlength(over, len(examples["train"]), cfg, "training")
    eval_records, eval_over = tokenize_rows(examples["eval"], tokenizer, cfg, mode, eot, "eval")
    if not train_records:
        raise SynthpertError("no training example fits max_length")

    from transformers import AutoConfig

    base_config = AutoConfig.from_pretrained(cfg.base_model, revision=cfg.revision)
    check_vocab(tokenizer, base_config.get_text_config().vocab_size)
    dhash = data_hash(examples["train"] + examples["eval"])
    _check_run_dir(out_dir, cfg, dhash)
    state.wait_for_everyone()
    if state.is_main_process:
        _start_run_dir(out_dir, cfg, dhash)
    state.wait_for_everyone()

    from transformers import set_seed

    set_seed(cfg.seed)
    model = load_model(cfg, precision)
    from trl import SFTTrainer

    stop = graceful_stop_callback()
    trainer = SFTTrainer(model=model, args=sft_config(cfg, out_dir, precision, bool(eval_records)),
                         train_dataset=_dataset(train_records), eval_dataset=_dataset(eval_records),
                         processing_class=tokenizer, callbacks=[stop],
                         peft_config=lora_config(cfg, model) if cfg.method == "lora" else None)
    tracking.point_tensorboard_at(trainer, out_dir)
    quiet_progress(trainer, out_dir / "train_log.jsonl")
    if cfg.loss_average == "example":
        average_loss_per_example(trainer)
    bad = [n for n, p in trainer.model.named_parameters()  # a full fine-tune trains them and is served whole
           if cfg.method == "lora" and p.requires_grad and ("embed_tokens" in n or "lm_head" in n or "wte" in n)]
    if bad:
        raise SynthpertError(f"embedding / lm_head weights would be trained ({bad[:3]}): such an adapter cannot be "
                             "served by vLLM; remove them from lora.target_modules")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    resume_from = None
    if cfg.resume:
        ckpt = out_dir / CHECKPOINTS
        resume_from = last_complete_checkpoint(ckpt)
        if resume_from is None:
            raise SynthpertError(f"--resume: no checkpoint in {ckpt} (checkpoints are written every save_steps="
                                 f"{cfg.save_steps} steps)")
    try:
        with storage_errors(out_dir):  # a full disk mid-checkpoint: safetensors' and torch's own error types
            output = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        restore_signal(stop)
    if stop.requested:
        raise SynthpertError(f"interrupted: stopped at step {trainer.state.global_step} with a checkpoint in "
                             f"{out_dir / CHECKPOINTS}; run the same command with --resume to continue")
    eval_loss = trainer.evaluate()["eval_loss"] if eval_records else None

    first_loss, last_loss = _losses(trainer.state.log_history)
    summary = {
        "run_dir": str(out_dir), "base_model": cfg.base_model, "base_model_name": shipped_name, "mode": cfg.mode,
        "method": cfg.method,
        "loss_mask": mode,
        "loss_average": cfg.loss_average, "curriculum": cfg.curriculum, "n_contrast_first": examples["n_contrast"],
        "n_train": len(train_records), "n_eval": len(eval_records),
        # the prior the model learns: a decision rule corrects from it to the test-time prior
        "class_shares": class_shares([r["label"] for r in examples["train"]]),
        "skipped": dict(examples["skipped"]),
        "n_overlength": len(over) + len(eval_over), "overlength_policy": cfg.overlength,
        "global_step": trainer.state.global_step, "resumed_from": resume_from,
        "train_loss": output.training_loss, "first_logged_loss": first_loss, "last_logged_loss": last_loss,
        "eval_loss": eval_loss, "trainable_params": trainable, "precision": precision,
        "precision_warning": precision_warning,
        "runtime_s": round(time.time() - started, 2),
    }
    summary["tracking"] = tracking.run_record(cfg.report_to, out_dir.name, out_dir) if tracking.active(
        cfg.report_to) else None
    if state.is_main_process:
        with storage_errors(out_dir):
            trainer.save_model(str(out_dir))  # lora: the PEFT adapter only; full: the whole model
            tokenizer.save_pretrained(str(out_dir))  # with the exact chat template trained on
        # written last: a run folder without it is unfinished (its adapter may be half-written)
        _write_manifest(out_dir, cfg, summary, examples, tokenizer, dhash, base_config, precision)
    state.wait_for_everyone()
    return TrainResult(summary, trainer)


def _write_manifest(out_dir, cfg, summary, examples, tokenizer, dhash, base_config, precision) -> None:
    src = examples["source"]
    file_hash = sha256_file(Path(src)) if Path(src).is_file() else None
    manifest = {
        "synthpert_stage": "train",
        "base_model": cfg.base_model, "base_model_name": summary["base_model_name"],
        "base_model_revision": cfg.revision or getattr(base_config, "_commit_hash", None),
        "base_model_config_sha256": sha256_text(base_config.to_json_string()),
        "data_source": src, "data_file_sha256": file_hash, "data_sha256": dhash,
        "seed": cfg.seed, "git_revision": git_revision(), "libraries": library_versions(),
        "chat_template_sha256": sha256_text(tokenizer.chat_template),
        "student_prompt_hash": student_prompt_hash(), "evidence": cfg.evidence,
        "evidence_lookup": cfg.evidence_lookup, "mode": cfg.mode,
        "method": cfg.method,  # full: this folder is a whole model, loaded without the base (runs.is_full_model)
        "extra_cell_lines": own_cell_lines(cfg.dataset_dir or (src if Path(src).is_dir() else None)),
        "precision": precision, "device": _device_kind(), "num_processes": _num_processes(),
        **{k: summary[k] for k in ("loss_mask", "n_train", "n_eval", "skipped", "n_overlength", "global_step",
                                   "train_loss", "first_logged_loss", "last_logged_loss", "eval_loss",
                                   "trainable_params", "runtime_s", "class_shares", "tracking")},
        "config": cfg.model_dump(mode="json"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_adapter_manifest(out_dir, manifest)


def _num_processes() -> int:
    from accelerate import PartialState

    return PartialState(cpu=_device_kind() == "cpu").num_processes


def run_train(cfg: TrainConfig, source, out_dir: str | Path) -> dict:
    """Train and return the summary dict (the pipeline runner's entry point)."""
    return train_model(cfg, source, out_dir).summary
