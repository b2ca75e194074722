"""Reinforcement learning after SFT: TRL's GRPOTrainer continues a `synthpert train` adapter on training prompts.

Reads top to bottom like the stage: check the SFT run and the settings (before any model loads), build the
student's prompts from the TRAINING split exactly as training built them, load base + SFT adapter, run
GRPO with the rewards of rewards.py, save the adapter and a manifest that evaluation and serving read like
train's (base model, mode, evidence), plus the reward curves.

Outputs (the run folder): the adapter, the tokenizer (the SFT run's, chat template included), the resolved
config, ``manifest.json`` and ``checkpoints/`` (for ``--resume``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import pandas as pd

from . import tracking
from .checkpoints import graceful_stop_callback, last_complete_checkpoint, quiet_progress, restore_signal
from .config import dump_config
from .config.rl import RLConfig
from .dataset import load_built
from .decision import class_shares
from .errors import SynthpertError
from .evidence import dataset_training_stats
from .lookup import evidence_blocks
from .prompting import student_messages, student_prompt_hash
from .models import resolve_model
from .precision import device_kind as _device_kind, resolve_precision as precision_for
from .resources import sha256_text
from .rewards import class_weights, reward_functions, wrong_reward
from .runs import (ADAPTER_MANIFEST, git_revision, hash_json, is_full_model, library_versions, read_manifest,
                   storage_errors, write_adapter_manifest)
from .schema import read_jsonl
from .tokenizer import load_tokenizer

log = logging.getLogger("synthpert.rl")

CONFIG_FILE = "rl_config.yaml"
STATE_FILE = "run_state.json"
CHECKPOINTS = "checkpoints"
CURVE_KEYS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
              "completions/clipped_ratio", "loss")


# ---------------------------------------------------------------------------------------------------------
# Checks that need no model


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def sft_run(cfg: RLConfig) -> tuple[Path, dict, str]:
    """The SFT run folder, its manifest and the base model RL uses (the manifest's unless the config names the
    same one)."""
    if not cfg.adapter:
        raise SynthpertError("no SFT adapter: set adapter (the `synthpert train --out` folder) or give --adapter")
    adapter = Path(cfg.adapter).expanduser()
    if is_full_model(adapter):
        raise SynthpertError(f"{adapter} holds a fully fine-tuned model (train.method=full), not a LoRA adapter: "
                             "RL continues an SFT adapter, so train with train.method=lora first")
    if not (adapter / "adapter_config.json").is_file():
        raise SynthpertError(f"SFT adapter {adapter} not found (no adapter_config.json there): give the folder "
                             "`synthpert train --out` wrote")
    manifest = read_manifest(adapter)
    trained_on = manifest.get("base_model")
    adapter_base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    trained_on = trained_on or adapter_base
    if not trained_on:
        raise SynthpertError(f"{adapter}: neither manifest.json nor adapter_config.json names the base model")
    base = resolve_model(cfg.base_model) or trained_on  # a shipped model's short name is its converted folder
    if not _same_model(base, trained_on):
        raise SynthpertError(f"the SFT adapter {adapter} was trained on base model {trained_on!r}, but base_model "
                             f"is {base!r}; RL must continue on the model the adapter belongs to")
    if not Path(base).expanduser().exists() and base.startswith(("/", ".", "~")):
        raise SynthpertError(f"base model {base!r} of the SFT adapter {adapter} is not there any more")
    return adapter.resolve(), manifest, base


def check_vllm(cfg: RLConfig) -> None:
    """vLLM rollouts need the package and a CUDA GPU: say so before a model is loaded."""
    if not cfg.use_vllm:
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SynthpertError("use_vllm=true needs vLLM (pip install vllm, on a CUDA machine); or set use_vllm=false "
                             "to generate rollouts with transformers")
    if _device_kind() != "cuda":
        raise SynthpertError("use_vllm=true needs a CUDA GPU (TRL's colocated vLLM shares the training GPU); on "
                             "this machine set use_vllm=false")


def resolve_precision(cfg: RLConfig) -> str:
    return precision_for(cfg.precision, "none", "RL", _device_kind())[0]


# ---------------------------------------------------------------------------------------------------------
# Prompts: training rows only, built the way the student was trained


def _triple(r: dict) -> tuple[str, str, str]:
    return (str(r["cell_line"]), str(r["perturbation"]), str(r["gene"]))


def prompt_rows(cfg: RLConfig) -> list[dict]:
    """Training triples with labels; any row of the dataset's validation or test split is refused."""
    if not cfg.dataset_dir:
        raise SynthpertError("no dataset_dir: RL prompts come from a built dataset's training split (`synthpert "
                             "data build --out`)")
    dd = load_built(Path(cfg.dataset_dir).expanduser())
    if cfg.prompts_path:
        path = Path(cfg.prompts_path).expanduser()
        if not path.is_file():
            raise SynthpertError(f"prompts_path {path} not found")
        rows = [{"cell_line": r["cell_line"], "perturbation": r["perturbation"], "gene": r["gene"],
                 "label": r["label"]} for r in read_jsonl(path)]
        held = {_triple(r): split for split in dd if split != "train" for r in dd[split].to_list()}
        held_perts = {(c, p): split for (c, p, _), split in held.items()}
        bad = [(r, held.get(_triple(r)) or held_perts.get(_triple(r)[:2])) for r in rows]
        bad = [(r, s) for r, s in bad if s]
        if bad:
            r, s = bad[0]
            raise SynthpertError(f"{path}: {len(bad)} of {len(rows)} rows belong to the dataset's held-out splits "
                                 f"(e.g. {'/'.join(_triple(r))} in {s}); RL trains on training rows only")
    else:
        rows = [{k: r[k] for k in ("cell_line", "perturbation", "gene", "label")}
                for r in load_built(Path(cfg.dataset_dir).expanduser(), "train").to_list()]
    if not rows:
        raise SynthpertError("no RL prompts: the training rows are empty")
    if cfg.max_prompts and len(rows) > cfg.max_prompts:
        keep = sorted(random.Random(cfg.seed).sample(range(len(rows)), cfg.max_prompts))
        rows = [rows[i] for i in keep]
    return rows


def build_prompts(rows: list[dict], manifest: dict, dataset_dir: str) -> list[dict]:
    """TRL's conversational prompt rows: the student's messages (evidence if the SFT adapter was trained with
    it; a multitask adapter's answer task, the one it predicts with) and the target label."""
    stats = dataset_training_stats(Path(dataset_dir).expanduser()) if manifest.get("evidence") else None
    task = "answer" if manifest.get("mode") == "multitask" else None
    frame = pd.DataFrame([_triple(r) for r in rows], columns=["cell_line", "perturbation", "gene"])
    out = []
    for r, ev in zip(rows, evidence_blocks(stats, frame, bool(manifest.get("evidence_lookup")))):
        out.append({"prompt": student_messages(*_triple(r), ev, task), "label": r["label"],
                    "cell_line": r["cell_line"], "perturbation": r["perturbation"], "gene": r["gene"]})
    return out


# ---------------------------------------------------------------------------------------------------------
# Model and trainer


def load_policy(base: str, adapter: Path, precision: str):
    """Base model + the SFT adapter, trainable.

    We continue the SFT adapter (PeftModel.from_pretrained(..., is_trainable=True)) rather than put a fresh
    adapter on a merged SFT model: the result stays an adapter on the ORIGINAL base, so evaluation, serving,
    merge and vLLM's LoRA loading take it exactly like the SFT adapter (same base identity in the manifest,
    same rank and targets), no merged 16 GB copy of an 8B model is written, and with beta > 0 TRL's reference
    policy is a cheap frozen copy of this adapter, i.e. the SFT policy itself."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SynthpertError(f"cannot load base model {base!r}: {e}") from None
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise SynthpertError(f"the SFT adapter {adapter} does not load onto base model {base!r}: {e}") from None


def grpo_config(cfg: RLConfig, out_dir: Path, precision: str):
    from trl import GRPOConfig

    kwargs: dict[str, Any] = dict(
        output_dir=str(out_dir / CHECKPOINTS), learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, generation_batch_size=cfg.generation_batch_size,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, scale_rewards=cfg.scale_rewards, loss_type=cfg.loss_type,
        beta=cfg.beta, epsilon=cfg.epsilon, num_iterations=cfg.num_iterations,
        mask_truncated_completions=cfg.mask_truncated_completions, warmup_steps=cfg.warmup,
        lr_scheduler_type=cfg.scheduler, max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
        logging_first_step=True, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed, bf16=precision == "bf16",
        fp16=precision == "fp16", dataloader_pin_memory=_device_kind() == "cuda",
        use_cpu=_device_kind() == "cpu", use_vllm=cfg.use_vllm, vllm_mode=cfg.vllm_mode,
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        vllm_enable_sleep_mode=cfg.vllm_enable_sleep_mode, vllm_max_model_length=cfg.vllm_max_model_length,
        # the dataset's label column reaches the reward functions only if TRL keeps it
        remove_unused_columns=False, **tracking.trainer_kwargs(cfg.report_to, out_dir, GRPOConfig.__dataclass_fields__),
    )
    fields = GRPOConfig.__dataclass_fields__
    flag = next(n for n in ("activation_checkpointing", "gradient_checkpointing") if n in fields)
    kwargs[flag] = cfg.gradient_checkpointing  # said either way: TRL's default is on
    return GRPOConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# The run


def _check_run_dir(out_dir: Path, cfg: RLConfig, dhash: str) -> None:
    state_path = out_dir / STATE_FILE
    if cfg.resume:
        if not state_path.exists():
            raise SynthpertError(f"--resume: {out_dir} holds no RL run to resume")
        if json.loads(state_path.read_text()).get("prompts_sha256") != dhash:
            raise SynthpertError("--resume: the prompts or the SFT adapter differ from the ones this run started "
                                 "with; resume with the same settings")
        return
    ckpt = out_dir / CHECKPOINTS
    if state_path.exists() or (ckpt.exists() and any(ckpt.iterdir())) or (out_dir / ADAPTER_MANIFEST).exists():
        raise SynthpertError(f"{out_dir} already holds a run: continue it with --resume, or choose another --out")


def reward_curves(history: list[dict]) -> list[dict]:
    """One row per logged step: total reward, each reward function's mean, frac_reward_zero_std, ..."""
    out = []
    for h in history:
        if "reward" not in h:
            continue
        row = {"step": h.get("step")}
        row.update({k: h[k] for k in CURVE_KEYS if k in h})
        row.update({k: v for k, v in h.items() if k.startswith("rewards/") and k.endswith("/mean")})
        out.append(row)
    return out


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def run_rl(cfg: RLConfig, out_dir: str | Path) -> dict:
    """Everything `synthpert rl` does; returns the summary (also written into the manifest)."""
    from accelerate import PartialState

    started = time.time()
    out_dir = Path(out_dir).expanduser()
    adapter, sft_manifest, base = sft_run(cfg)
    check_vllm(cfg)
    state = PartialState(cpu=_device_kind() == "cpu")
    precision = resolve_precision(cfg)
    tracking.require(cfg.report_to, "rl")  # before the policy loads, not after the run
    rows = prompt_rows(cfg)
    shares = class_shares([r["label"] for r in rows])
    weights = class_weights(cfg.rewards, shares)
    records = build_prompts(rows, sft_manifest, cfg.dataset_dir)
    tokenizer = load_tokenizer(adapter)  # the SFT run's copy: its chat template is what the adapter learned
    if cfg.max_prompt_length:
        from .tokenizer import render_prompt_ids

        longest = max(len(render_prompt_ids(tokenizer, r["prompt"])) for r in records)
        if longest > cfg.max_prompt_length:
            raise SynthpertError(f"a prompt has {longest} tokens > max_prompt_length={cfg.max_prompt_length}")
    dhash = hash_json({"prompts": [[r["prompt"], r["label"]] for r in records], "sft": sft_manifest})
    _check_run_dir(out_dir, cfg, dhash)
    state.wait_for_everyone()
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FILE).write_text(dump_config(cfg))
        if not cfg.resume:
            (out_dir / STATE_FILE).write_text(json.dumps({"prompts_sha256": dhash, "started": time.time()}))
    state.wait_for_everyone()

    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOTrainer

    set_seed(cfg.seed)
    args = grpo_config(cfg, out_dir, precision)
    model = load_policy(base, adapter, precision)
    stop = graceful_stop_callback()
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions(cfg.rewards, shares, cfg.max_completion_length),
                          args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                          callbacks=[stop])
    tracking.point_tensorboard_at(trainer, out_dir)
    quiet_progress(trainer, Path(out_dir) / "rl_log.jsonl")
    resume_from = None
    if cfg.resume:
        resume_from = last_complete_checkpoint(out_dir / CHECKPOINTS)
        if resume_from is None:
            raise SynthpertError(f"--resume: no checkpoint in {out_dir / CHECKPOINTS} (written every save_steps="
                                 f"{cfg.save_steps} steps)")
    try:
        with storage_errors(out_dir):  # as train's: a full disk mid-checkpoint is a message, not a traceback
            trainer.train(resume_from_checkpoint=resume_from)
    finally:
        restore_signal(stop)
    if stop.requested:
        raise SynthpertError(f"interrupted: stopped at step {trainer.state.global_step} with a checkpoint in "
                             f"{out_dir / CHECKPOINTS}; run the same command with --resume to continue")

    curves = reward_curves(trainer.state.log_history)
    first, last = (curves[0], curves[-1]) if curves else ({}, {})
    summary = {
        "run_dir": str(out_dir), "base_model": base, "sft_adapter": str(adapter), "mode": sft_manifest.get("mode"),
        "evidence": bool(sft_manifest.get("evidence")), "n_prompts": len(records),
        "prompt_class_shares": shares, "correct_reward_per_class": weights,
        "wrong_reward": wrong_reward(cfg.rewards), "global_step": trainer.state.global_step,
        "resumed_from": resume_from, "first_reward": first.get("reward"), "last_reward": last.get("reward"),
        "mean_frac_reward_zero_std": _mean(curves, "frac_reward_zero_std"), "precision": precision,
        "runtime_s": round(time.time() - started, 2),
        "tracking": (tracking.run_record(cfg.report_to, out_dir.name, out_dir) if tracking.active(cfg.report_to)
                     else None),
    }
    if state.is_main_process:
        # only the trained adapter: with beta > 0 the model also holds TRL's frozen "ref" copy
        with storage_errors(out_dir):
            trainer.model.save_pretrained(str(out_dir), selected_adapters=["default"])
            tokenizer.save_pretrained(str(out_dir))
        _write_manifest(out_dir, cfg, summary, sft_manifest, curves, dhash, tokenizer)
    state.wait_for_everyone()
    return summary


def _write_manifest(out_dir, cfg, summary, sft, curves, dhash, tokenizer) -> None:
    # Evaluation, serving and the decision layer read base_model, mode, evidence and class_shares as they do
    # from a train manifest. class_shares stays the SFT data's: the prior the policy started from.
    manifest = {
        "synthpert_stage": "rl",
        **{k: sft.get(k) for k in ("base_model_revision", "base_model_config_sha256", "mode", "evidence",
                                   "evidence_lookup", "class_shares", "loss_mask")},
        "base_model": summary["base_model"],
        "sft_adapter": summary["sft_adapter"], "sft_manifest": sft,
        "prompts_sha256": dhash, "seed": cfg.seed, "git_revision": git_revision(),
        "libraries": library_versions(), "chat_template_sha256": sha256_text(tokenizer.chat_template),
        "student_prompt_hash": student_prompt_hash(), "device": _device_kind(),
        **{k: v for k, v in summary.items() if k not in ("base_model", "sft_adapter", "mode", "evidence")},
        "reward_curves": curves,
        "config": cfg.model_dump(mode="json"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_adapter_manifest(out_dir, manifest)
