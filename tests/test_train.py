"""LoRA SFT on the tiny model with examples built from the real PerturbQA CSVs: loss, mask, guards, outputs."""

from __future__ import annotations

import json
import shutil

import pytest

from synthpert.errors import SynthpertError

pytestmark = pytest.mark.slow

# R1-style: drops everything up to </think> from assistant turns (markers present, so only the guard catches it)
STRIPPING_TEMPLATE = (
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{- '<|im_start|>assistant\\n' }}{%- generation %}{{- c + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# end-of-turn token outside the generation markers: the model would never learn to stop
NO_EOT_TEMPLATE = STRIPPING_TEMPLATE.replace(
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}", "").replace(
    "{{- c + '<|im_end|>' }}{%- endgeneration %}", "{{- c }}{%- endgeneration %}{{- '<|im_end|>' }}")


def _cfg(tiny_model_dir, **kw):
    from synthpert.config.train import TrainConfig

    base = {"base_model": str(tiny_model_dir), "max_length": 512, "eval_fraction": 0.0, "logging_steps": 1,
            "lora": {"r": 8, "alpha": 16}, "optim": {"lr": 1e-2, "batch_size": 4, "grad_accum": 1, "warmup": 0.0}}
    for k, v in kw.items():
        if isinstance(v, dict):
            base[k] = {**base.get(k, {}), **v}
        else:
            base[k] = v
    return TrainConfig.model_validate(base)


def _mean_loss(model, tok, rows):
    import torch

    from synthpert.loss_mask import tokenize_example

    total, n = 0.0, 0
    for r in rows:
        ids, labels = tokenize_example(tok, r["prompt"], r["assistant"], "assistant_only")
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        total, n = total + float(out.loss), n + 1
    return total / n


def test_config_errors_are_explained(tmp_path):
    from synthpert.config import load_section
    from synthpert.config.train import TrainConfig
    from synthpert.train import resolve_precision

    def load_train_config(path, overrides=None):
        return load_section(TrainConfig, "train", path, overrides)

    (tmp_path / "t.yaml").write_text("train:\n  base_model: x\n  lora:\n    alpah: 8\n")
    with pytest.raises(SynthpertError, match="unknown key 'lora.alpah' \\(did you mean 'alpha'"):
        load_train_config(tmp_path / "t.yaml")
    with pytest.raises(SynthpertError, match="packing"):
        load_train_config(None, ["base_model=x", "packing=true", "overlength=truncate"])
    cfg = load_train_config(None, ["base_model=x", "quantization=4bit", "optim.lr=2e-4"])
    assert cfg.optim.lr == 2e-4 and cfg.lora.r == 32 and cfg.max_length == 2048  # the recipe's defaults
    with pytest.raises(SynthpertError, match="QLoRA .* needs a CUDA GPU"):
        resolve_precision(cfg)


def test_loss_mask_covers_exactly_the_assistant_turn(tiny_model_dir, tiny_traces_path):
    from synthpert.prompting import student_messages
    from synthpert.loss_mask import tokenize_example
    from synthpert.train import student_tokenizer
    from synthpert.train_data import training_examples

    cfg = _cfg(tiny_model_dir)
    row = training_examples(cfg, tiny_traces_path)["train"][0]
    tok = student_tokenizer(cfg)
    # the question is THE student prompt (shared with evaluation and serving), without the label
    assert row["prompt"] == student_messages(row["cell_line"], row["perturbation"], row["gene"])
    for mode, tail in (("assistant_only", "<|im_end|>"), ("completion_only", "<|im_end|>\n")):
        ids, labels = tokenize_example(tok, row["prompt"], row["assistant"], mode)
        trained = [i for i, t in enumerate(labels) if t != -100]
        first, last = trained[0], trained[-1]
        assert trained == list(range(first, last + 1))  # one contiguous span
        assert tok.decode(ids[first:last + 1]) == row["assistant"] + tail
        assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
        assert tok.decode(ids[last + 1:]) in ("", "\n")  # assistant_only leaves the turn's newline out
    assert row["assistant"].startswith("<think>\n") and row["assistant"].endswith(f"<answer>{row['label']}</answer>")


def test_guards_fire_before_training(tiny_model_dir, tiny_traces_path, tmp_path):
    from synthpert.train import run_train

    (tmp_path / "strip.jinja").write_text(STRIPPING_TEMPLATE)
    with pytest.raises(SynthpertError, match="removes the reasoning"):
        run_train(_cfg(tiny_model_dir, chat_template=str(tmp_path / "strip.jinja")), tiny_traces_path, tmp_path / "a")
    # the same without generation markers: the completion-only mask path must catch it too
    bare = STRIPPING_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    (tmp_path / "bare.jinja").write_text(bare)
    with pytest.raises(SynthpertError, match="removes the reasoning"):
        run_train(_cfg(tiny_model_dir, chat_template=str(tmp_path / "bare.jinja")), tiny_traces_path, tmp_path / "a")
    # markers around the user turn too: prompt text would be trained
    user_turn = "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    leaky = NO_EOT_TEMPLATE.replace("{%- else %}" + user_turn,
                                    "{%- else %}{%- generation %}" + user_turn + "{%- endgeneration %}")
    assert leaky != NO_EOT_TEMPLATE
    (tmp_path / "leaky.jinja").write_text(leaky)
    with pytest.raises(SynthpertError, match="outside the assistant turn receives loss"):
        run_train(_cfg(tiny_model_dir, chat_template=str(tmp_path / "leaky.jinja")), tiny_traces_path, tmp_path / "a")
    (tmp_path / "noeot.jinja").write_text(NO_EOT_TEMPLATE)
    with pytest.raises(SynthpertError, match="end-of-turn token .* receives no loss"):
        run_train(_cfg(tiny_model_dir, chat_template=str(tmp_path / "noeot.jinja")), tiny_traces_path, tmp_path / "b")
    # student prompts are ~300 tokens: at max_length 320 a share of examples is over-long
    with pytest.raises(SynthpertError, match=r"\d+ of 96 training examples .* longer than max_length=320"):
        run_train(_cfg(tiny_model_dir, max_length=320), tiny_traces_path, tmp_path / "c")
    # a tokenizer with an added token would need resized embeddings: refused
    from transformers import AutoTokenizer

    grown = tmp_path / "grown"
    shutil.copytree(tiny_model_dir, grown)
    tok = AutoTokenizer.from_pretrained(grown)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(grown)
    with pytest.raises(SynthpertError, match="tokens were added"):
        run_train(_cfg(grown), tiny_traces_path, tmp_path / "d")
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing written, no step taken


def test_training_reduces_loss_on_perturbqa_examples(tiny_model_dir, tiny_adapter_dir, tiny_traces_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synthpert.prompting import student_prompt_hash
    from synthpert.resources import sha256_text
    from synthpert.runs import read_manifest
    from synthpert.train_data import training_examples

    manifest = read_manifest(tiny_adapter_dir)
    rows = training_examples(_cfg(tiny_model_dir, max_examples=48, seed=0, eval_fraction=0.1),
                         tiny_traces_path)["train"][:6]
    tok = AutoTokenizer.from_pretrained(tiny_adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = _mean_loss(base, tok, rows)
    tuned = PeftModel.from_pretrained(base, tiny_adapter_dir)
    after = _mean_loss(tuned, tok, rows)
    assert after < 0.5 * before, (before, after)
    assert manifest["n_train"] + manifest["n_eval"] == 48 and manifest["eval_loss"] is not None
    assert manifest["chat_template_sha256"] == sha256_text(tok.chat_template)
    assert manifest["student_prompt_hash"] == student_prompt_hash()
    assert manifest["libraries"]["trl"] and manifest["seed"] == 0 and len(manifest["data_sha256"]) == 64
    adapter_keys = json.loads((tiny_adapter_dir / "adapter_config.json").read_text())
    assert adapter_keys["modules_to_save"] is None  # no embedding / lm_head in the adapter


def test_save_load_and_resume(tiny_model_dir, tiny_traces_path, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from synthpert.train import run_train, train_model

    cfg = _cfg(tiny_model_dir, max_examples=8, save_steps=2, optim={"max_steps": 2, "batch_size": 2})
    out = tmp_path / "run"
    result = train_model(cfg, tiny_traces_path, out)
    assert result.summary["global_step"] == 2 and (out / "checkpoints" / "checkpoint-2").is_dir()
    ids = torch.tensor([[5, 17, 99, 400, 3, 8, 250]])
    model = result.trainer.model.eval()
    with torch.no_grad():
        in_memory = model(input_ids=ids.to(model.device)).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)(
            input_ids=ids).logits
    assert torch.allclose(in_memory.cpu(), reloaded, atol=1e-5)
    assert not torch.allclose(reloaded, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits,
                              atol=1e-3)  # the adapter does something

    with pytest.raises(SynthpertError, match="already holds a training run"):
        run_train(cfg, tiny_traces_path, out)
    more = cfg.model_copy(update={"resume": True, "optim": cfg.optim.model_copy(update={"max_steps": 3})})
    with pytest.raises(SynthpertError, match="data differ"):
        run_train(more.model_copy(update={"max_examples": 6}), tiny_traces_path, out)
    summary = run_train(more, tiny_traces_path, out)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 3


def test_merge_matches_base_plus_adapter(tiny_adapter_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from synthpert.merge import merge_adapter

    report = merge_adapter(tiny_adapter_dir, tmp_path / "merged", tolerance=1e-4)
    assert report["max_abs_logit_diff"] < 1e-4 and set(report["max_abs_logit_diff_by_check"]) == {"in_memory",
                                                                                                  "reloaded"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (tmp_path / "merged" / "chat_template.jinja").exists()
    with pytest.raises(SynthpertError, match="not empty"):
        merge_adapter(tiny_adapter_dir, tmp_path / "merged")
    assert torch.isfinite(merged(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_label_only_examples_with_evidence(tiny_model_dir, tiny_built_dataset):
    from synthpert.answer import format_answer
    from synthpert.train_data import training_examples

    ex = training_examples(_cfg(tiny_model_dir, mode="label_only", evidence=True, eval_fraction=0.1),
                       tiny_built_dataset)
    assert len(ex["train"]) == 96 and len(ex["eval"]) == 24  # the built train / validation splits
    row = ex["train"][0]
    assert row["assistant"] == format_answer(row["label"])
    assert "Observed evidence from the training screens" in row["prompt"][1]["content"]
    with pytest.raises(SynthpertError, match="built dataset folder"):
        training_examples(_cfg(tiny_model_dir, mode="label_only"), tiny_built_dataset / "summary.json")


def test_launches_that_would_train_once_per_process_are_refused():
    from synthpert.train import check_launch

    check_launch({}, "cpu", 1)  # a plain run
    check_launch({"WORLD_SIZE": "2"}, "cpu", 2)  # gloo DDP, as test_ddp_two_cpu_processes launches it
    check_launch({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, "cuda", 2)
    with pytest.raises(SynthpertError, match="FSDP does not run on CPU.*ddp.yaml"):
        check_launch({"ACCELERATE_USE_FSDP": "true"}, "cpu", 1)
    with pytest.raises(SynthpertError, match="WORLD_SIZE=2 .*joined no process group"):
        check_launch({"WORLD_SIZE": "2"}, "cuda", 1)


def test_ddp_two_cpu_processes(tiny_model_dir, tiny_traces_path, tmp_path):
    """The `synthpert train` CLI under torchrun (two gloo processes), with the shipped tiny config and packing."""
    import os
    import socket
    import subprocess
    import sys

    from synthpert.resources import resource_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "synthpert.cli", "train", "--config",
           str(resource_path("configs", "train_tiny.yaml")), "--data", str(tiny_traces_path),
           "--out", str(out), f"base_model={tiny_model_dir}", "max_examples=16", "optim.max_steps=2",
           "optim.batch_size=4", "eval_fraction=0", "max_length=512", "packing=true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["global_step"] == 2 and manifest["config"]["packing"]
    assert (out / "adapter_model.safetensors").exists()


def test_bench_speedups_compute_the_same_loss(capsys):
    """scripts/bench_train.py --shape tiny: the chunked cross-entropy variant gives the plain loss."""
    import importlib.util

    from synthpert.resources import resource_dir

    path = resource_dir("configs").parent / "scripts" / "bench_train.py"
    if not path.exists():
        pytest.skip("scripts/ not shipped in this install")
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--shape", "tiny", "--variants", "plain,chunked_ce,padding_free", "--steps", "1", "--warmup", "0",
                "--seq", "64", "--cpu"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by = {r["variant"]: r for r in rows}
    assert by["plain"]["loss"] == pytest.approx(by["chunked_ce"]["loss"], abs=1e-4)
    assert all(r["finite"] and r["tokens_per_s"] > 0 for r in rows) and by["padding_free"]["variable_lengths"]


def test_loss_average_example_weighs_every_example_once_whatever_its_length(tiny_model_dir, tmp_path):
    """TRL's own loss path, with the hook: the mean over examples of each example's mean token loss (a one-token
    answer counts as much as a long explanation); without it, the mean over tokens."""
    import torch
    from trl import SFTTrainer

    from synthpert.loss_mask import tokenize_example
    from synthpert.tokenizer import load_tokenizer
    from synthpert.train import _dataset, average_loss_per_example, lora_config, sft_config

    cfg = _cfg(tiny_model_dir, loss_average="example")
    tok = load_tokenizer(tiny_model_dir)
    prompt = [{"role": "user", "content": "Is GATA1 changed after MYC knockdown?"}]
    rows = [tokenize_example(tok, prompt, a, "assistant_only") for a in (
        "<answer>upregulated</answer>",
        "<think>" + "The knockdown removes a transcription factor of the erythroid programme. " * 6
        + "</think><answer>not differentially expressed</answer>")]
    records = [{"input_ids": ids, "labels": labels} for ids, labels in rows]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=sft_config(cfg, tmp_path, "fp32", False), train_dataset=_dataset(records),
                         processing_class=tok, peft_config=lora_config(cfg))
    batch = trainer._prepare_inputs(trainer.data_collator(records))
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                ignore_index=-100, reduction="none")
        mask = (batch["labels"][:, 1:] != -100).float()
        per_example = (nll * mask).sum(1) / mask.sum(1)
        by_token = float((nll * mask).sum() / mask.sum())
        by_example = float(per_example.mean())
        assert mask.sum(1)[1] > 5 * mask.sum(1)[0]  # the explanation has many more trained tokens
        assert abs(by_token - by_example) > 0.01  # 100x the tolerance below: the two averages are told apart
        assert float(trainer.compute_loss(trainer.model, dict(batch))) == pytest.approx(by_token, rel=1e-4)
        average_loss_per_example(trainer)
        assert float(trainer.compute_loss(trainer.model, dict(batch))) == pytest.approx(by_example, rel=1e-4)
        # as in training: N counts the tokens of the accumulated batch
        n = int(mask.sum())
        assert float(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n)) == pytest.approx(
            by_example, rel=1e-4)
    with pytest.raises(Exception, match="one example per row"):
        _cfg(tiny_model_dir, loss_average="example", packing=True)


def test_training_logs_go_to_a_file_not_the_console(tiny_model_dir, tiny_traces_path, tmp_path, capfd, monkeypatch):
    """The quickstart printed 64 raw {'loss': ...} dicts; now a progress bar, and the dicts in train_log.jsonl."""
    from synthpert.train import run_train

    monkeypatch.delenv("SYNTHPERT_VERBOSE", raising=False)
    run_train(_cfg(tiny_model_dir, max_examples=8, optim={"epochs": 1}), tiny_traces_path, tmp_path / "run")
    printed = capfd.readouterr()
    assert "{'loss'" not in printed.out + printed.err
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in r and r["step"] >= 1 for r in logged)
