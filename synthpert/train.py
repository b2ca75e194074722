"""Distillation training: LoRA SFT of a student model on kept reasoning traces (TRL SFTTrainer + PEFT).

Each example is a chat conversation: the student prompt (``prompting.student_messages``, never the label)
and the assistant turn = the kept trace in the answer format (or just the answer, ``mode: label_only``).

We tokenize the conversations ourselves, through the tokenizer's own chat template, and hand SFTTrainer
``input_ids`` + ``labels``. That way the guards below inspect exactly the tokens and loss mask that are
trained, before the first step:

* the whole assistant turn (reasoning block and answer) receives loss: some reasoning-model templates
  (DeepSeek-R1 family) drop everything before ``</think>`` from assistant turns, which would silently
  train on answers only;
* nothing outside the assistant turn receives loss, and the end-of-turn token does (else the model never
  learns to stop);
* no tokens are added and no embedding / lm_head weights are trained (vLLM cannot serve such adapters);
* examples longer than ``max_length`` are counted and reported; above a threshold training refuses.

Outputs (the run folder): the adapter, the tokenizer with the exact chat template used, the resolved
config, ``manifest.json`` and ``checkpoints/`` (for ``--resume``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .config import StrictModel, dump_config
from .errors import SynthpertError
from .runs import git_revision, library_versions
from .resources import resource_dir, sha256_text

log = logging.getLogger("synthpert.train")

MANIFEST = "manifest.json"
CONFIG_FILE = "train_config.yaml"
STATE_FILE = "run_state.json"
CHECKPOINTS = "checkpoints"
GENERATION_MARKERS = ("{% generation %}", "{%- generation %}", "{% generation -%}", "{%- generation -%}")


# ---------------------------------------------------------------------------------------------------------
# Config


class LoraSettings(StrictModel):
    """PEFT LoRA settings (SynthPert's recipe: r=32, alpha=32, dropout 0, all linear layers)."""

    r: int = Field(32, ge=1, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' (every linear layer but lm_head) or a list of module names")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r)")


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

    base_model: str | None = Field(None, description="hub id or local folder of the base (student) model")
    revision: str | None = Field(None, description="hub revision (commit / tag) of the base model")
    mode: Literal["reasoning", "label_only"] = Field(
        "reasoning", description="'reasoning': assistant = kept trace + answer (input: traces JSONL); "
        "'label_only': assistant = just the answer (input: a built dataset folder), the ablation")
    data_path: str | None = Field(None, description="kept traces JSONL, or a built dataset folder (label_only)")
    dataset_dir: str | None = Field(
        None, description="built dataset folder (`synthpert data build --out`) whose data_config.json gives the "
        "training rows for evidence context; default: data_path in label_only mode")
    output_dir: str | None = Field(None, description="run folder (CLI --out wins)")
    only_kept: bool = Field(True, description="train only on traces the judge kept (kept == true)")
    max_examples: int | None = Field(None, ge=1, description="use at most this many training examples (seeded)")
    evidence: bool = Field(False, description="show the leakage-safe training evidence block in the student "
                           "prompt (evaluation and serving must then use it too)")
    chat_template: str | None = Field(
        None, description="Jinja chat template file (path, or a name in configs/chat_templates/) replacing the "
        "tokenizer's; saved with the adapter so serving uses exactly it")
    loss_mask: Literal["auto", "assistant_only", "completion_only"] = Field(
        "auto", description="assistant_only: {% generation %} markers of the template; completion_only: "
        "everything after the generation prompt; auto: the first if the template has markers")
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
        "auto", description="auto: bf16 on a GPU that supports it, fp32 on CPU")
    quantization: Literal["none", "4bit"] = Field("none", description="4bit = QLoRA (bitsandbytes NF4, CUDA only)")
    gradient_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="recompute activations in the backward pass to save memory (selective: TRL's SAC)")
    packing: bool = Field(False, description="pack examples into max_length rows (BFD, padding-free)")
    padding_free: bool = Field(False, description="concatenate a batch without padding (position_ids)")
    attn_implementation: str | None = Field(None, description="sdpa, eager, flash_attention_2, ... (default: "
                                            "transformers' choice)")
    use_liger_kernel: bool = Field(False, description="Liger fused kernels (needs liger-kernel; GPU)")
    resume: bool = Field(False, description="continue from the last checkpoint in the run folder")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)

    @model_validator(mode="after")
    def _combinations(self):
        if self.quantization == "4bit" and self.precision == "fp32":
            raise ValueError("QLoRA (quantization=4bit) computes in bf16/fp16; precision=fp32 is not possible")
        if self.packing and self.overlength == "truncate":
            raise ValueError("packing cuts rows at max_length itself; use overlength=drop with packing")
        if self.use_liger_kernel and self.quantization == "4bit":
            pass  # supported by liger; listed so the combination is a conscious choice
        if self.gradient_checkpointing == "selective" and self.quantization == "4bit":
            raise ValueError("selective checkpointing is not supported with QLoRA's reentrant checkpointing")
        return self


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML (its `train:` section, or the whole file) + dotted overrides -> validated TrainConfig."""
    from .config import load_section

    return load_section(TrainConfig, "train", path, overrides)


# ---------------------------------------------------------------------------------------------------------
# Examples


def _student_prompt(row: dict, stats) -> list[dict]:
    from .evidence import evidence_text
    from .prompting import student_messages

    evidence = evidence_text(stats, row["cell_line"], row["perturbation"], row["gene"]) if stats else None
    return student_messages(row["cell_line"], row["perturbation"], row["gene"], evidence)


def _evidence_stats(cfg: TrainConfig, source: Path | None):
    """TrainingStats over the training rows named by the dataset folder's data_config.json."""
    from .report import dataset_training_stats

    folder = cfg.dataset_dir or (str(source) if cfg.mode == "label_only" and source else None)
    if folder is None:
        raise SynthpertError("evidence=true needs the built dataset the traces came from: set dataset_dir to the "
                             "`synthpert data build --out` folder (its data_config.json names the training rows)")
    return dataset_training_stats(folder)


def _trace_rows(path: Path, cfg: TrainConfig, skipped: Counter) -> list[dict]:
    from .schema import TraceRecord, read_jsonl

    rows = []
    for t in read_jsonl(path, TraceRecord):
        if cfg.only_kept and t.kept is not True:
            skipped["not kept by the judge" if t.kept is False else "not judged (kept is null)"] += 1
            continue
        if t.parsed_label is not None and t.parsed_label != t.label:
            skipped["answer differs from the label"] += 1  # never train on a wrong answer, kept or not
            continue
        if not t.reasoning or not t.reasoning.strip():
            skipped["no reasoning"] += 1
            continue
        rows.append({"example_id": t.example_id, "cell_line": t.cell_line, "perturbation": t.perturbation,
                     "gene": t.gene, "label": t.label, "assistant": t.assistant_text()})
    return rows


def _dataset_rows(path: Path, split: str) -> list[dict]:
    from .answer import format_answer
    from .data import load_built

    ds = load_built(path, split)
    return [{"example_id": r["id"], "cell_line": r["cell_line"], "perturbation": r["perturbation"],
             "gene": r["gene"], "label": r["label"], "assistant": format_answer(r["label"])}
            for r in ds.to_list()]


def _split_eval(rows: list[dict], fraction: float, max_n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole (cell line, perturbation) groups, so eval loss measures unseen knockdowns."""
    if fraction <= 0:
        return rows, []
    groups = sorted({(r["cell_line"], r["perturbation"]) for r in rows})
    if len(groups) < 2:
        return rows, []
    rng = random.Random(seed)
    held = set(rng.sample(groups, max(1, round(fraction * len(groups)))))
    train = [r for r in rows if (r["cell_line"], r["perturbation"]) not in held]
    ev = [r for r in rows if (r["cell_line"], r["perturbation"]) in held]
    return train, ev[:max_n]


def load_examples(cfg: TrainConfig, source) -> dict[str, Any]:
    """Training / eval conversations from a traces JSONL, a built dataset folder, or a list of TraceRecords.

    Returns {'train': rows, 'eval': rows, 'skipped': Counter, 'source': str}; each row has the triple,
    'prompt' (system + user messages) and 'assistant' (the target text).
    """
    skipped: Counter = Counter()
    src_path: Path | None = None
    if isinstance(source, (list, tuple)):
        import tempfile

        from .schema import write_jsonl

        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / "traces.jsonl"
            write_jsonl(tmp, source)
            rows = _trace_rows(tmp, cfg, skipped)
        eval_rows = None
        origin = f"{len(source)} in-memory traces"
    else:
        src_path = Path(source).expanduser()
        if not src_path.exists():
            raise SynthpertError(f"training data not found: {src_path}")
        if cfg.mode == "label_only":
            if not src_path.is_dir():
                raise SynthpertError(f"mode=label_only trains on a built dataset folder (`synthpert data build "
                                     f"--out`), but {src_path} is a file")
            rows = _dataset_rows(src_path, "train")
            eval_rows = _dataset_rows(src_path, "validation") if cfg.eval_fraction > 0 else []
        else:
            if src_path.is_dir():
                raise SynthpertError(f"mode=reasoning trains on a kept-traces JSONL file, but {src_path} is a "
                                     "folder (for answer-only training on a built dataset set mode=label_only)")
            rows = _trace_rows(src_path, cfg, skipped)
            eval_rows = None
        origin = str(src_path)
    if not rows:
        detail = ", ".join(f"{n} {why}" for why, n in skipped.items()) or "the file is empty"
        hint = ("; run the judge first, or set only_kept=false to train on every trace whose answer matches "
                "its label") if skipped.get("not judged (kept is null)") else ""
        raise SynthpertError(f"no training examples in {origin} ({detail}){hint}")
    if cfg.max_examples and len(rows) > cfg.max_examples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(rows)), cfg.max_examples))
        skipped[f"over max_examples={cfg.max_examples}"] += len(rows) - len(keep)
        rows = [rows[i] for i in keep]
    if eval_rows is None:
        rows, eval_rows = _split_eval(rows, cfg.eval_fraction, cfg.eval_max_examples, cfg.seed)
    else:
        eval_rows = eval_rows[: cfg.eval_max_examples]
    stats = _evidence_stats(cfg, src_path) if cfg.evidence else None
    for r in [*rows, *eval_rows]:
        r["prompt"] = _student_prompt(r, stats)
    return {"train": rows, "eval": eval_rows, "skipped": skipped, "source": origin}


def data_hash(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["prompt"], r["assistant"]], sort_keys=True).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, chat template, loss mask and guards


def resolve_chat_template(name: str) -> str:
    path = Path(name).expanduser()
    if not path.exists():
        shipped = resource_dir("configs") / "chat_templates" / name
        path = shipped if shipped.exists() else shipped.with_suffix(".jinja")
    if not path.exists():
        raise SynthpertError(f"chat template {name!r} not found (a file path, or a name in configs/chat_templates/)")
    return path.read_text()


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    if not cfg.base_model:
        raise SynthpertError("no base_model: set it in the config (hub id or local folder), e.g. base_model=DIR")
    try:
        tok = AutoTokenizer.from_pretrained(cfg.base_model, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise SynthpertError(f"cannot load the tokenizer of base_model {cfg.base_model!r}: {e}") from None
    if cfg.chat_template:
        tok.chat_template = resolve_chat_template(cfg.chat_template)
    if not tok.chat_template:
        raise SynthpertError(f"{cfg.base_model} has no chat template (a base, not an instruct, model?): give one "
                             "with chat_template=FILE (e.g. configs/chat_templates/chatml.jinja)")
    return tok


def mask_mode(cfg: TrainConfig, tokenizer) -> str:
    if cfg.loss_mask != "auto":
        return cfg.loss_mask
    has_markers = any(m in tokenizer.chat_template for m in GENERATION_MARKERS)
    return "assistant_only" if has_markers else "completion_only"


def _ids(out) -> list[int]:
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def tokenize_example(tokenizer, prompt: list[dict], assistant: str, mode: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation through the tokenizer's chat template; -100 = no loss."""
    messages = [*prompt, {"role": "assistant", "content": assistant}]
    if mode == "assistant_only":
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if not any(mask):
            raise SynthpertError("the chat template marks no assistant tokens ({% generation %} markers missing "
                                 "or empty): set loss_mask=completion_only or fix the template")
        return ids, [t if m else -100 for t, m in zip(ids, mask)]
    prompt_ids = _ids(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True))
    ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True))
    if ids[: len(prompt_ids)] != prompt_ids:
        n = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        raise SynthpertError(
            "the chat template renders the generation prompt differently from the start of an assistant turn: "
            f"prompt-only ends {tokenizer.decode(prompt_ids[n:n + 20])!r} where the conversation has "
            f"{tokenizer.decode(ids[n:n + 20])!r}. The model would be trained on a context it never sees at "
            "inference. Use a chat template that renders both alike (chat_template=...), e.g. "
            "configs/chat_templates/r1_distill_train.jinja for DeepSeek-R1 distills")
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]


def end_of_turn_ids(tokenizer, base_model: str | None = None, revision: str | None = None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if base_model:
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(base_model, revision=revision)
            eos = gen.eos_token_id
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except (OSError, ValueError):
            pass  # no generation_config.json: the tokenizer's eos is the stop token
    return ids


def _norm(text: str) -> str:
    """Compare texts modulo whitespace runs and Unicode normal form (tokenizers may normalise both)."""
    import unicodedata

    return " ".join(unicodedata.normalize("NFC", text).split())


def check_loss_mask(tokenizer, ids: list[int], labels: list[int], assistant: str, eot_ids: set[int]) -> None:
    """Guards on one rendered example: exactly the assistant turn (+ end-of-turn token) receives loss."""
    from .answer import _ANSWER_STRICT, _THINK_STRICT

    loss_ids = [t for t in labels if t != -100]
    text = _norm(tokenizer.decode(loss_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    assistant = _norm(assistant)
    think = _THINK_STRICT.search(assistant)
    if think and think.group(0) not in text:
        raise SynthpertError(
            "the chat template removes the reasoning from the assistant turn: the <think>…</think> block of the "
            "training target receives no loss (DeepSeek-R1-style templates drop everything before </think> from "
            "assistant messages). Training would silently teach answers only. Use a template that keeps it, e.g. "
            "chat_template=r1_distill_train (configs/chat_templates/).\n"
            f"trained text: {text[:300]!r}")
    answer = _ANSWER_STRICT.search(assistant)
    if answer and answer.group(0) not in text:
        raise SynthpertError(f"the answer {answer.group(0)!r} receives no loss; trained text: {text[:300]!r}")
    if assistant not in text:
        raise SynthpertError("the assistant turn is not trained verbatim through the chat template "
                             f"(expected {assistant[:120]!r}…, trained text {text[:300]!r})")
    if not eot_ids & set(loss_ids):
        names = [tokenizer.convert_ids_to_tokens(i) for i in sorted(eot_ids)]
        raise SynthpertError(f"the end-of-turn token ({', '.join(map(str, names))}) receives no loss: the model "
                             "would never learn to stop. Put it inside {% generation %}…{% endgeneration %} or use "
                             "loss_mask=completion_only")
    rest = text.replace(assistant, "", 1)
    for t in eot_ids:
        rest = rest.replace(tokenizer.convert_ids_to_tokens(t) or "", "")
    if rest.strip():
        raise SynthpertError(f"text outside the assistant turn receives loss: {rest.strip()[:200]!r} (the loss must "
                             "cover only the assistant turn)")


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """No new tokens: an adapter carrying embedding / lm_head weights cannot be served by vLLM."""
    if len(tokenizer) > model_vocab_size:
        raise SynthpertError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                             f"{model_vocab_size}: tokens were added. synthpert never resizes embeddings (an adapter "
                             "with embedding/lm_head weights cannot be served by vLLM); use the base tokenizer")


def tokenize_rows(rows: list[dict], tokenizer, cfg: TrainConfig, mode: str, eot_ids: set[int],
                  split: str) -> tuple[list[dict], list[int]]:
    """Tokenize, guard, and apply the max_length policy. Returns (records, lengths of over-long examples)."""
    records, over = [], []
    for i, r in enumerate(rows):
        ids, labels = tokenize_example(tokenizer, r["prompt"], r["assistant"], mode)
        if i < 2:  # full decode check on the first examples; the cheap checks below run on all
            check_loss_mask(tokenizer, ids, labels, r["assistant"], eot_ids)
        elif not eot_ids & {t for t in labels if t != -100}:
            raise SynthpertError(f"{split} example {r['example_id']}: the end-of-turn token receives no loss")
        if len(ids) > cfg.max_length:
            over.append(len(ids))
            if cfg.overlength == "drop":
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            if all(t == -100 for t in labels):
                continue
        records.append({"input_ids": ids, "labels": labels})
    return records, over


def check_overlength(over: list[int], n: int, cfg: TrainConfig, split: str) -> None:
    if not over:
        return
    share = len(over) / max(n, 1)
    msg = (f"{len(over)} of {n} {split} examples ({100 * share:.1f}%) are longer than max_length={cfg.max_length} "
           f"tokens (longest {max(over)})")
    if share > cfg.max_overlength_fraction:
        raise SynthpertError(f"{msg}; that is more than max_overlength_fraction={cfg.max_overlength_fraction}. "
                             f"Raise max_length (≥ {max(over)} keeps all) or max_overlength_fraction")
    log.warning("%s; they are %s", msg, "dropped" if cfg.overlength == "drop" else "truncated")


# ---------------------------------------------------------------------------------------------------------
# Model and trainer


def _device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(cfg: TrainConfig) -> str:
    import torch

    if _device_kind() == "cpu":
        if cfg.quantization == "4bit":
            raise SynthpertError("QLoRA (quantization=4bit) needs a CUDA GPU (bitsandbytes 4-bit kernels); on CPU "
                                 "set quantization=none")
        if cfg.precision in ("bf16", "fp16"):
            raise SynthpertError(f"precision={cfg.precision} needs a GPU; on CPU training runs in fp32 "
                                 "(precision=auto or fp32)")
        return "fp32"
    if cfg.precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cfg.precision


def load_model(cfg: TrainConfig, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    kwargs: dict[str, Any] = {"revision": cfg.revision, "dtype": dtype}
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


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, use_rslora=cfg.lora.use_rslora, bias="none",
                      task_type="CAUSAL_LM")


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
        report_to="none", dataloader_pin_memory=_device_kind() == "cuda", use_cpu=_device_kind() == "cpu",
        # We enforce max_length ourselves (guards + drop policy); padding-free without packing needs None.
        max_length=cfg.max_length if (cfg.packing or not cfg.padding_free) else None,
        packing=cfg.packing, padding_free=cfg.padding_free, use_liger_kernel=cfg.use_liger_kernel,
        shuffle_dataset=True,
    )
    if cfg.packing:
        kwargs["packing_strategy"] = "bfd"
    if cfg.gradient_checkpointing != "none":
        # transformers renamed gradient_checkpointing -> activation_checkpointing (5.2x); support both.
        flag = _field(fields, "activation_checkpointing", "gradient_checkpointing")
        kw = _field(fields, "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
        kwargs[flag] = True
        gc_kwargs: dict[str, Any] = {"use_reentrant": cfg.quantization == "4bit"}
        if cfg.gradient_checkpointing == "selective":
            gc_kwargs["selective"] = True
        kwargs[kw] = gc_kwargs
    return SFTConfig(**kwargs)


def _graceful_stop_callback():
    """First Ctrl-C: finish the step, save a checkpoint, stop (resume with --resume). Second: abort now."""
    import signal

    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        requested = False

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

    cb = GracefulStop()

    def handler(signum, frame):
        if cb.requested:
            raise KeyboardInterrupt
        cb.requested = True
        log.warning("interrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)")

    try:
        cb.previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (e.g. inside a server): no signal handling
        cb.previous = None
    return cb


def _restore_signal(cb) -> None:
    import signal

    if getattr(cb, "previous", None) is not None:
        signal.signal(signal.SIGINT, cb.previous)


# ---------------------------------------------------------------------------------------------------------
# Manifest


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise SynthpertError(f"{run_dir} is not a finished `synthpert train` run folder (no {MANIFEST})")
    return json.loads(path.read_text())


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
    if state_path.exists() or (ckpt_dir.exists() and any(ckpt_dir.iterdir())) or (out_dir / MANIFEST).exists():
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


def train_model(cfg: TrainConfig, source, out_dir: str | Path) -> TrainResult:
    """Everything `synthpert train` does; returns the summary and the trainer (whose model is in memory)."""
    from accelerate import PartialState

    started = time.time()
    out_dir = Path(out_dir).expanduser()
    if cfg.base_model and Path(cfg.base_model).expanduser().is_dir():
        # adapter_config.json records this path: make it absolute so the adapter loads from anywhere
        cfg = cfg.model_copy(update={"base_model": str(Path(cfg.base_model).expanduser().resolve())})
    # PartialState is a process-wide singleton and the first call decides the backend: on CPU it must be
    # cpu=True (as TrainingArguments(use_cpu=True) asks), or a torchrun launch would not become gloo DDP.
    state = PartialState(cpu=_device_kind() == "cpu")
    precision = resolve_precision(cfg)  # fails early on CPU for QLoRA / bf16
    examples = load_examples(cfg, source)
    tokenizer = load_tokenizer(cfg)
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

    stop = _graceful_stop_callback()
    trainer = SFTTrainer(model=model, args=sft_config(cfg, out_dir, precision, bool(eval_records)),
                         train_dataset=_dataset(train_records), eval_dataset=_dataset(eval_records),
                         processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=[stop])
    bad = [n for n, p in trainer.model.named_parameters()
           if p.requires_grad and ("embed_tokens" in n or "lm_head" in n or "wte" in n)]
    if bad:
        raise SynthpertError(f"embedding / lm_head weights would be trained ({bad[:3]}): such an adapter cannot be "
                             "served by vLLM; remove them from lora.target_modules")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    resume_from = None
    if cfg.resume:
        from transformers.trainer_utils import get_last_checkpoint

        ckpt = out_dir / CHECKPOINTS
        resume_from = get_last_checkpoint(str(ckpt)) if ckpt.is_dir() else None
        if resume_from is None:
            raise SynthpertError(f"--resume: no checkpoint in {ckpt} (checkpoints are written every save_steps="
                                 f"{cfg.save_steps} steps)")
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        _restore_signal(stop)
    if stop.requested:
        raise SynthpertError(f"interrupted: stopped at step {trainer.state.global_step} with a checkpoint in "
                             f"{out_dir / CHECKPOINTS}; run the same command with --resume to continue")
    eval_loss = trainer.evaluate()["eval_loss"] if eval_records else None

    first_loss, last_loss = _losses(trainer.state.log_history)
    summary = {
        "run_dir": str(out_dir), "base_model": cfg.base_model, "mode": cfg.mode, "loss_mask": mode,
        "n_train": len(train_records), "n_eval": len(eval_records),
        "skipped": dict(examples["skipped"]),
        "n_overlength": len(over) + len(eval_over), "overlength_policy": cfg.overlength,
        "global_step": trainer.state.global_step, "resumed_from": resume_from,
        "train_loss": output.training_loss, "first_logged_loss": first_loss, "last_logged_loss": last_loss,
        "eval_loss": eval_loss, "trainable_params": trainable, "precision": precision,
        "runtime_s": round(time.time() - started, 2),
    }
    if state.is_main_process:
        trainer.save_model(str(out_dir))  # PEFT adapter only
        tokenizer.save_pretrained(str(out_dir))  # with the exact chat template trained on
        _write_manifest(out_dir, cfg, summary, examples, tokenizer, dhash, base_config, precision)
    state.wait_for_everyone()
    return TrainResult(summary, trainer)


def _write_manifest(out_dir, cfg, summary, examples, tokenizer, dhash, base_config, precision) -> None:
    from .prompting import student_prompt_hash

    src = examples["source"]
    file_hash = None
    if Path(src).is_file():
        from .resources import sha256_file

        file_hash = sha256_file(Path(src))
    manifest = {
        "synthpert_stage": "train",
        "base_model": cfg.base_model,
        "base_model_revision": cfg.revision or getattr(base_config, "_commit_hash", None),
        "base_model_config_sha256": sha256_text(base_config.to_json_string()),
        "data_source": src, "data_file_sha256": file_hash, "data_sha256": dhash,
        "seed": cfg.seed, "git_revision": git_revision(), "libraries": library_versions(),
        "chat_template_sha256": sha256_text(tokenizer.chat_template),
        "student_prompt_hash": student_prompt_hash(), "evidence": cfg.evidence, "mode": cfg.mode,
        "precision": precision, "device": _device_kind(), "num_processes": _num_processes(),
        **{k: summary[k] for k in ("loss_mask", "n_train", "n_eval", "skipped", "n_overlength", "global_step",
                                   "train_loss", "first_logged_loss", "last_logged_loss", "eval_loss",
                                   "trainable_params", "runtime_s")},
        "config": cfg.model_dump(mode="json"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def _num_processes() -> int:
    from accelerate import PartialState

    return PartialState(cpu=_device_kind() == "cpu").num_processes


def run_train(cfg: TrainConfig, source, out_dir: str | Path) -> dict:
    """Train and return the summary dict (the pipeline runner's entry point)."""
    return train_model(cfg, source, out_dir).summary
