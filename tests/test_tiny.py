"""The tiny offline model: loads like a hub model, tokenizes consistently, and its template masks the assistant."""

from __future__ import annotations

import json

import pytest

from synthpert.errors import SynthpertError
from synthpert.prompting import student_messages

pytestmark = pytest.mark.slow

ASSISTANT = "<think>\nKnockdown of AAMP barely touches ADGRE5.\n</think>\n<answer>not differentially expressed</answer>"


def test_loads_with_from_pretrained(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.num_hidden_layers == 2
    assert cfg.hidden_size // cfg.num_attention_heads in (32, 64, 80, 96, 112, 128)  # vLLM CPU attention
    assert cfg.initializer_range == pytest.approx(0.1)
    assert len(tok) <= cfg.vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    # random init at std 0.1, not the 0.02 that would make LoRA unable to learn
    assert 0.07 < float(model.lm_head.weight.detach().std()) < 0.13


def test_reloaded_tokenizer_splits_like_the_trained_one(tiny_model_dir):
    """AutoTokenizer loads the folder as a Qwen2Tokenizer, which rebuilds its own pre-tokenizer: the
    merges must have been learnt with that same pipeline, or text would tokenize differently after reload."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = student_messages("k562", "AAMP", "ADGRE5")[1]["content"] + " 12345 héllo  \n\n" + ASSISTANT
    assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # the prompt vocabulary was learnt: a prompt is far shorter than its byte count
    assert len(tok(text)["input_ids"]) < len(text.encode()) / 2.5


def test_chat_template_masks_assistant_and_end_of_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = student_messages("k562", "AAMP", "ADGRE5") + [{"role": "assistant", "content": ASSISTANT}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(trained) == ASSISTANT + "<|im_end|>"
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "not differentially expressed</answer>" not in \
        prompt.split("<|im_start|>user")[0]


def test_cli_builds_with_builtin_vocabulary_and_rejects_bad_head_dim(tmp_path):
    from typer.testing import CliRunner

    from synthpert.cli.main import app
    from synthpert.tiny import build_tiny_model

    result = CliRunner().invoke(app, ["model", "tiny", "--out", str(tmp_path / "m"), "--source",
                                      str(tmp_path / "no_csvs"), "--vocab-size", "600"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "m" / "synthpert_tiny.json").read_text())
    assert info["vocab_source"] == "built-in gene list" and info["vocab_size"] <= 600
    with pytest.raises(SynthpertError, match="head_dim 30"):
        build_tiny_model(tmp_path / "bad", hidden=120, heads=4)


def test_tokenizer_ignores_other_csvs_in_the_data_folder(tmp_path, perturbqa_dir):
    """The same seed gives the same tokenizer whether or not PerturbQA's k562_set-* files sit beside the lines."""
    import shutil

    from synthpert.tiny import build_tiny_model

    only_lines = tmp_path / "lines"
    only_lines.mkdir()
    for f in perturbqa_dir.glob("*.csv"):
        if not f.name.startswith("k562_set"):
            shutil.copy(f, only_lines / f.name)
    a = build_tiny_model(tmp_path / "a", source=only_lines, seed=0)
    b = build_tiny_model(tmp_path / "b", source=perturbqa_dir, seed=0)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()



def test_a_registered_user_line_does_not_change_the_tiny_model(tmp_path):
    """The tiny model is a function of its seed and vocabulary source, not of what ran before in the process:
    a user's line registered earlier (a run's extra_cell_lines) used to enter the tokenizer's corpus."""
    from synthpert.cells import register_cell_line
    from synthpert.tiny import build_tiny_model

    a = build_tiny_model(tmp_path / "a", seed=0)
    register_cell_line("mylab_ipsc", "iPSC", "Induced pluripotent stem cells from our lab, CRISPRi screen.")
    b = build_tiny_model(tmp_path / "b", seed=0)
    for name in ("tokenizer.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_given_tokenizer_must_carry_a_chat_template(tmp_path):
    """(the model built around a real vocabulary: tests/test_real_tokenizers.py)"""
    from synthpert.tiny import build_tiny_model, train_tokenizer

    tok = train_tokenizer(["MYC GAPDH knockdown"] * 4, vocab_size=300)
    tok.chat_template = None
    with pytest.raises(SynthpertError, match="chat template"):
        build_tiny_model(tmp_path / "m", tokenizer=tok)
    assert not (tmp_path / "m").exists()  # refused before writing anything
