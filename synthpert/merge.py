"""Merge a LoRA adapter into its base model for serving, and prove the merge changed nothing.

The merged model's logits are compared with base+adapter on a few student prompts, once in memory right
after ``merge_and_unload`` and once after reloading the saved folder (which catches saving problems such
as dropped tied weights). The largest absolute difference is reported; above ``tolerance`` it fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import SynthpertError
from .models import resolve_model
from .runs import is_full_model

# Fixed probe triples: real PerturbQA genes, one per built-in cell line family.
PROBES = (("k562", "AAMP", "ADGRE5"), ("rpe1", "RPL11", "CDKN1A"), ("k562", "GATA1", "HBG1"))


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise SynthpertError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


def _probe_batch(tokenizer, device: str):
    from .answer import THINK_OPEN
    from .prompting import student_messages

    texts = [tokenizer.apply_chat_template(student_messages(c, p, g), tokenize=False, add_generation_prompt=True)
             + THINK_OPEN + "\n" for c, p, g in PROBES]
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokenizer.padding_side = pad_side
    return batch


def _logits(model, batch):
    import torch

    with torch.no_grad():
        out = model(**batch).logits.float()
    return out[batch["attention_mask"].bool()]  # padded positions are not compared


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None, tolerance: float = 1e-3,
                  dtype: str = "auto", reload_check: bool = True) -> dict:
    """Merge ``adapter`` (a `synthpert train` run folder) into its base; save to ``out``; return the report."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter).expanduser()
    cfg_path = adapter / "adapter_config.json"
    if is_full_model(adapter):  # refused rather than copied: a copy would only double the disk it takes
        raise SynthpertError(f"{adapter} holds a fully fine-tuned model (train.method=full), not an adapter: there "
                             "is nothing to merge. Use the folder itself as the model (--model, or --adapter / "
                             "--run, which load it alone)")
    if not cfg_path.exists():
        raise SynthpertError(f"{adapter} holds no LoRA adapter (adapter_config.json missing)")
    out = Path(out).expanduser()
    if out.resolve() == adapter.resolve():
        raise SynthpertError("--out must differ from --adapter (the merged model would overwrite the adapter)")
    adapter_cfg = json.loads(cfg_path.read_text())
    base = resolve_model(base or adapter_cfg.get("base_model_name_or_path"))
    if not base:
        raise SynthpertError(f"{cfg_path} names no base model; pass --base")
    revision = adapter_cfg.get("revision")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = _dtype(dtype, device)

    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter)  # the run's tokenizer: the exact template trained on
    except (OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(base, revision=revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, revision=revision, dtype=torch_dtype).to(device)
    except (OSError, ValueError) as e:
        raise SynthpertError(f"cannot load base model {base!r}: {e}") from None
    model = PeftModel.from_pretrained(model, adapter).eval()
    batch = _probe_batch(tokenizer, device)
    reference = _logits(model, batch)

    merged = model.merge_and_unload()
    diffs = {"in_memory": float((_logits(merged, batch) - reference).abs().max())}
    if diffs["in_memory"] > tolerance:
        raise SynthpertError(f"merged logits differ from base+adapter by {diffs['in_memory']:.3g} > tolerance "
                             f"{tolerance} (bf16/fp16 merges need ~0.1; or merge with --dtype float32)")
    if out.exists() and any(out.iterdir()):
        raise SynthpertError(f"{out} is not empty; choose a new folder for the merged model")
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if (adapter / "manifest.json").exists():
        shutil.copyfile(adapter / "manifest.json", out / "train_manifest.json")
    del merged, model
    if reload_check:
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype).to(device).eval()
        diffs["reloaded"] = float((_logits(reloaded, batch) - reference).abs().max())
        del reloaded
        if diffs["reloaded"] > tolerance:
            raise SynthpertError(f"the saved merged model's logits differ from base+adapter by "
                                 f"{diffs['reloaded']:.3g} > tolerance {tolerance}; {out} is not trustworthy")
    report = {"merged_dir": str(out), "adapter": str(adapter), "base_model": base, "dtype": str(torch_dtype),
              "device": device, "probe_prompts": len(PROBES), "tolerance": tolerance,
              "max_abs_logit_diff": max(diffs.values()), "max_abs_logit_diff_by_check": diffs}
    (out / "merge_report.json").write_text(json.dumps(report, indent=2))
    return report
