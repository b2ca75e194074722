"""Tokenisation through the chat template and the loss-mask guards, checked before the first training step.

* the whole assistant turn (reasoning block and answer) receives loss: some reasoning-model templates
  (DeepSeek-R1 family) drop everything before the closing think tag from assistant turns, which would silently
  train on answers only;
* nothing outside the assistant turn receives loss, and the end-of-turn token does (else the model never
  learns to stop);
* no tokens are added (vLLM cannot serve adapters with embedding / lm_head weights);
* examples longer than ``max_length`` are counted and reported; above a threshold training refuses.
"""

from __future__ import annotations

import logging
import unicodedata

from .answer import THINK_CLOSE, THINK_OPEN, answer_block, think_block
from .config.train import TrainConfig
from .errors import SynthpertError

log = logging.getLogger("synthpert.train")

GENERATION_MARKERS = ("{% generation %}", "{%- generation %}", "{% generation -%}", "{%- generation -%}")


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
    return " ".join(unicodedata.normalize("NFC", text).split())


def check_loss_mask(tokenizer, ids: list[int], labels: list[int], assistant: str, eot_ids: set[int]) -> None:
    """Guards on one rendered example: exactly the assistant turn (+ end-of-turn token) receives loss."""
    loss_ids = [t for t in labels if t != -100]
    text = _norm(tokenizer.decode(loss_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    assistant = _norm(assistant)
    think = think_block(assistant)
    if think and think not in text:
        raise SynthpertError(
            f"the chat template removes the reasoning from the assistant turn: the {THINK_OPEN}…{THINK_CLOSE} block of "
            f"the training target receives no loss (DeepSeek-R1-style templates drop everything before {THINK_CLOSE} "
            "from "
            "assistant messages). Training would silently teach answers only. Use a template that keeps it, e.g. "
            "chat_template=r1_distill_train (configs/chat_templates/).\n"
            f"trained text: {text[:300]!r}")
    answer = answer_block(assistant)
    if answer and answer not in text:
        raise SynthpertError(f"the answer {answer!r} receives no loss; trained text: {text[:300]!r}")
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
