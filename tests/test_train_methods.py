"""train.method=full (every weight trained, a whole model saved) and precision=bf16 on CPU, on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from synthpert.answer import LABELS
from synthpert.errors import SynthpertError

pytestmark = pytest.mark.slow


def _cfg(tiny_model_dir, **kw):
    from synthpert.config.train import TrainConfig

    base = {"base_model": str(tiny_model_dir), "max_length": 512, "eval_fraction": 0.0, "logging_steps": 1,
            "max_examples": 16, "lora": {"r": 8, "alpha": 16},
            "optim": {"lr": 1e-3, "batch_size": 4, "grad_accum": 1, "warmup": 0.0, "max_steps": 6}}
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return TrainConfig.model_validate(base)


def _mean_loss(model, tok, rows):
    import torch

    from synthpert.loss_mask import tokenize_example

    losses = []
    for r in rows:
        ids, labels = tokenize_example(tok, r["prompt"], r["assistant"], "assistant_only")
        with torch.no_grad():
            losses.append(float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss))
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tiny_traces_path, tmp_path_factory):
    """A train.method=full run folder: 3 steps, then resumed from its checkpoint to 8."""
    from synthpert.train import run_train, train_model

    cfg = _cfg(tiny_model_dir, method="full", save_steps=3, optim={"max_steps": 3})
    out = tmp_path_factory.mktemp("full") / "train"
    first = train_model(cfg, tiny_traces_path, out).summary
    assert (out / "checkpoints" / "checkpoint-3").is_dir()
    more = cfg.model_copy(update={"resume": True, "optim": cfg.optim.model_copy(update={"max_steps": 8})})
    return cfg, out, first, run_train(more, tiny_traces_path, out)


def test_full_fine_tuning_trains_every_weight_and_saves_a_model_later_stages_load(tiny_model_dir, tiny_traces_path,
                                                                                 full_run, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synthpert.backends import adapter_version, student_dirs
    from synthpert.config.evaluate import InferenceConfig
    from synthpert.merge import merge_adapter
    from synthpert.run_folder import resolve_model_paths
    from synthpert.runs import is_full_model, read_manifest, student_weight_files
    from synthpert.train_data import training_examples

    cfg, out, first, summary = full_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_params = sum(p.numel() for p in base.parameters())
    assert first["trainable_params"] == n_params and first["method"] == "full"
    # resume continued the full fine-tune from its checkpoint (optimizer state and all)
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["global_step"] == 8

    # a whole model folder, no adapter: it loads with from_pretrained alone
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    assert is_full_model(out) and read_manifest(out)["method"] == "full"
    assert student_weight_files(out) == [out / "config.json", out / "model.safetensors"]
    tuned = AutoModelForCausalLM.from_pretrained(out)
    changed = [n for n, p in tuned.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) == len(list(base.named_parameters()))  # every weight moved, embeddings included
    rows = training_examples(cfg, tiny_traces_path)["train"][:6]
    tok = AutoTokenizer.from_pretrained(out)
    before, after = _mean_loss(base, tok, rows), _mean_loss(tuned, tok, rows)
    assert after < 0.7 * before, (before, after)
    assert summary["last_logged_loss"] < first["first_logged_loss"]

    # eval / predict / serve load the folder given as the adapter as THE model, without the base
    model_dir, adapter_dir = student_dirs(InferenceConfig(model=None, adapter=str(out)))
    assert (model_dir, adapter_dir) == (out, None)
    assert resolve_model_paths(None, None, str(out), None)[:2] == (str(out), str(out))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    version = adapter_version(copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes() + b" ")
    assert adapter_version(copy) != version  # a retrained model gets a new hash (decision rules bind to it)
    with pytest.raises(SynthpertError, match="nothing to merge"):
        merge_adapter(out, tmp_path / "merged")
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "predict", "--adapter", str(out), "--cell", "K562",
                        "--perturbation", "MYC", "--gene", "GAPDH", "inference.max_new_tokens=8"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    one = json.loads(r.stdout)
    assert one["label"] in LABELS and abs(sum(one["probabilities"].values()) - 1) < 1e-6

    import httpx
    from _live_server import LiveServer

    from synthpert.config.serve import ServeConfig, ServeSettings
    from synthpert.decision import decision_for
    from synthpert.inference import load_predictor
    from synthpert.serve import create_app

    predictor = load_predictor(ServeConfig(inference={"adapter": str(out), "max_new_tokens": 8}))
    try:
        with LiveServer(create_app(predictor, ServeSettings(), None, decision_for("auto", str(out), None))) as srv:
            body = httpx.post(f"{srv.url}/v1/predict", json={"cell_line": "k562", "perturbation": "MYC",
                                                             "gene": "GAPDH"}, timeout=60).json()
        assert body["label"] in LABELS and body["adapter"] == str(out), body
    finally:
        predictor.backend.close()


def test_bad_method_combinations_are_refused_before_anything_loads(tmp_path):
    from synthpert.config import load_section
    from synthpert.config.run import RunConfig
    from synthpert.config.train import TrainConfig

    with pytest.raises(SynthpertError, match="method=full trains every weight, but quantization=4bit"):
        load_section(TrainConfig, "train", None, ["base_model=x", "method=full", "quantization=4bit"])
    with pytest.raises(SynthpertError, match="rl continues the SFT LoRA adapter"):
        load_section(RunConfig, None, None, ["name=x", "train.base_model=x", "train.method=full", "rl.max_steps=1"])
    # lora.* is ignored with full, so one config switches method with one override
    cfg = load_section(TrainConfig, "train", None, ["base_model=x", "method=full", "lora.r=4"])
    assert cfg.method == "full" and cfg.lora.r == 4


def test_rl_and_push_refuse_a_full_fine_tune_by_name(tmp_path):
    from synthpert.config.rl import RLConfig
    from synthpert.publish import push
    from synthpert.rl import sft_run

    train = tmp_path / "run" / "train"
    train.mkdir(parents=True)
    (train / "config.json").write_text("{}")
    (train / "manifest.json").write_text(json.dumps({"method": "full"}))
    with pytest.raises(SynthpertError, match="fully fine-tuned model .* train with train.method=lora"):
        sft_run(RLConfig.model_validate({"adapter": str(train)}))
    with pytest.raises(SynthpertError, match="train.method=full.*LoRA adapters only"):
        push(tmp_path / "run", "user/student", dry_run=True)


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f {extra}\n"


def test_bf16_on_cpu_runs_and_warns_only_where_the_cpu_lacks_bf16_instructions():
    from synthpert.precision import cpu_has_bf16, resolve_precision

    assert cpu_has_bf16(CPUINFO.format(extra="avx512_bf16")) is True
    assert cpu_has_bf16(CPUINFO.format(extra="amx_bf16")) is True
    assert cpu_has_bf16(CPUINFO.format(extra="")) is False
    assert cpu_has_bf16("model name : something\n") is None
    assert resolve_precision("bf16", device="cpu", cpuinfo=CPUINFO.format(extra="avx512_bf16")) == ("bf16", None)
    precision, warning = resolve_precision("bf16", device="cpu", cpuinfo=CPUINFO.format(extra=""))
    assert precision == "bf16" and "without bf16 instructions" in warning
    assert resolve_precision("auto", device="cpu") == ("fp32", None)  # auto stays fp32 on CPU
    with pytest.raises(SynthpertError, match="precision=fp16 needs a GPU"):
        resolve_precision("fp16", device="cpu")
    with pytest.raises(SynthpertError, match="QLoRA .* needs a CUDA GPU"):
        resolve_precision("bf16", "4bit", device="cpu")


def test_bf16_lora_training_on_cpu_lowers_the_loss_with_fp32_adapter_weights(tiny_model_dir, tiny_traces_path,
                                                                             tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from synthpert.runs import read_manifest
    from synthpert.train import train_model

    result = train_model(_cfg(tiny_model_dir, precision="bf16", optim={"lr": 1e-2}), tiny_traces_path,
                         tmp_path / "bf16")
    s = result.summary
    assert s["precision"] == "bf16" and read_manifest(tmp_path / "bf16")["precision"] == "bf16"
    assert s["last_logged_loss"] < 0.7 * s["first_logged_loss"], s
    dtypes = {n: p.dtype for n, p in result.trainer.model.named_parameters()}
    # the frozen base computes in bf16; PEFT keeps the trained LoRA weights in fp32 (autocast_adapter_dtype)
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "bf16")
    assert torch.isfinite(reloaded(input_ids=torch.tensor([[5, 17, 99]])).logits).all()


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_and_transformers_score_a_full_fine_tune_alike(full_run):
    """Last in this file: importing vllm changes torch's threading for the tests after it."""
    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig
    from synthpert.prompting import student_messages

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = str(full_run[1])
    hf = make_backend(InferenceConfig(adapter=out, max_new_tokens=8))
    vl = make_backend(InferenceConfig(backend="vllm", adapter=out, merge_adapter=True, max_new_tokens=8,
                                      max_model_len=1024))
    try:
        assert "enable_lora" not in vl.describe()["engine"]  # the folder is the engine's model, no LoRA
        msgs = [student_messages("k562", "MYC", "GAPDH"), student_messages("rpe1", "TP53", "CDKN1A")]
        scores = [b.answer_logprobs([b.prepare(m) for m in msgs], ["", ""]) for b in (hf, vl)]
        diff = max(abs(x - y) for a, b in zip(*scores) for x, y in zip(a, b))
        assert diff < 2e-3, diff
    finally:
        vl.close()
