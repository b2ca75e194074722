#!/usr/bin/env python
"""LoRA training throughput at real model shapes with random weights (no download).

Builds the config of a published model from its dimensions, initialises it randomly on the device, adds
LoRA (default r=32 on all linear layers) with PEFT and times forward+backward+optimizer steps on random
token batches. Prints one JSON line per configuration: tokens/s, model FLOPs utilisation, peak memory.

MFU counts model FLOPs, not hardware FLOPs (recomputation under checkpointing is not credited):
  frozen linear layers (lm_head included): 4 * N_frozen * T  (forward 2NT + input-gradient 2NT, no weight grads)
  LoRA adapters:                            6 * N_lora * T
  causal attention:                         3 * forward, forward = 2 * T^2 * d_attn per layer per sequence
divided by the peak bf16 rate (--peak-tflops, default 790: measured on H100/H200 for bf16 matmuls).

Variants (comma-separated --variants), all optional speedups:
  plain        transformers + PEFT, full-vocabulary logits and fp32 cross-entropy (the reference)
  chunked_ce   no full-vocabulary fp32 logits: lm_head + cross-entropy in checkpointed chunks
  liger        liger-kernel fused linear + cross-entropy (and its RMSNorm/RoPE/SwiGLU) if installed
  padding_free variable-length batch concatenated into one row (position_ids), no padding tokens
  (--ckpt none|full|selective picks activation checkpointing; selective = TRL's SAC when available)

  python scripts/bench_train.py --shape tiny                      # CPU, seconds
  python scripts/bench_train.py --shape qwen2.5-7b --batch 4 --ckpt full --variants plain,chunked_ce,liger
GPU variants other than `plain` were written without a GPU at hand: correct by construction and tested
on the tiny shape on CPU, but their speed is unverified until run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time

SHAPES = {
    # name: (architecture, hidden, intermediate, layers, heads, kv_heads, vocab, tied embeddings)
    "tiny": ("qwen2", 128, 256, 2, 4, 4, 2048, False),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064, False),
    "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128256, False),
}


def build_config(shape: str, attn: str):
    from transformers import LlamaConfig, Qwen2Config

    arch, hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    cfg = cls(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=8192,
              initializer_range=0.02)
    cfg._attn_implementation = attn
    return cfg


def build_model(shape: str, device: str, dtype, attn: str, liger: bool, lora_r: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = build_config(shape, attn)
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

        apply = apply_liger_kernel_to_qwen2 if SHAPES[shape][0] == "qwen2" else apply_liger_kernel_to_llama
        apply(fused_linear_cross_entropy=True, cross_entropy=False, rms_norm=True, rope=True, swiglu=True)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_r, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, cfg


def count_flops(model, cfg, tokens_per_seq: list[int]) -> float:
    frozen = lora = 0
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            n = mod.in_features * mod.out_features
            if "lora_" in name:
                lora += n
            elif not any(isinstance(c, torch.nn.Linear) for c in mod.children()):
                frozen += n
    if cfg.tie_word_embeddings and not any("lm_head" in n for n, m in model.named_modules()
                                           if isinstance(m, torch.nn.Linear)):
        frozen += cfg.vocab_size * cfg.hidden_size
    T = sum(tokens_per_seq)
    d_attn = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    attn_fwd = sum(2 * t * t * d_attn for t in tokens_per_seq) * cfg.num_hidden_layers
    return 4 * frozen * T + 6 * lora * T + 3 * attn_fwd


def chunked_lm_loss(hidden, weight, labels, chunk: int = 2048):
    """Causal-LM loss without materialising all logits: each chunk's logits are recomputed in backward."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    h = hidden[:, :-1].reshape(-1, hidden.size(-1))
    y = labels[:, 1:].reshape(-1)
    n_valid = (y != -100).sum().clamp(min=1)

    def piece(hc, yc):
        return F.cross_entropy((hc @ weight.t()).float(), yc, ignore_index=-100, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.size(0), chunk):
        total = total + checkpoint(piece, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
    return total / n_valid


def make_batch(cfg, batch: int, seq: int, variable: bool, padding_free: bool, device: str, gen):
    import torch

    lengths = [seq] * batch
    if variable:
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen).tolist()
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in lengths]
    if padding_free:
        ids = torch.cat(seqs)[None]
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        labels = ids.clone()
        labels[pos == 0] = -100  # no loss across document boundaries
        return {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": labels.to(device)}, lengths
    ids = torch.zeros(batch, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}, lengths


def enable_ckpt(model, mode: str) -> str:
    if mode == "none":
        return "none"
    model.enable_input_require_grads()
    if mode == "selective":
        try:
            from trl.models import enable_selective_activation_checkpointing
        except ImportError:
            return "selective-unavailable"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enable_selective_activation_checkpointing(model)
        return "selective"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return "full"


def run_variant(args, variant: str) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    liger = variant == "liger"
    if liger:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return {"variant": variant, "shape": args.shape, "skipped": "liger-kernel not installed"}
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, cfg = build_model(args.shape, device, dtype, args.attn, liger, args.lora_r)
    ckpt = enable_ckpt(model, args.ckpt)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    padding_free = variant == "padding_free"
    variable = args.variable_lengths or padding_free
    lm_head = model.get_output_embeddings()

    def step():
        batch, lengths = make_batch(cfg, args.batch, args.seq, variable, padding_free, device, gen)
        if variant == "chunked_ce":
            labels = batch.pop("labels")
            hidden = model.base_model.model.model(**batch).last_hidden_state
            loss = chunked_lm_loss(hidden, lm_head.weight, labels, args.ce_chunk)
        else:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return lengths, loss

    try:
        for _ in range(args.warmup):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        flops = tokens = 0.0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            lengths, loss = step()
            tokens += sum(lengths)
            flops += count_flops(model, cfg, lengths)
        float(loss.detach())  # sync
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        return {"variant": variant, "shape": args.shape, "seq": args.seq, "batch": args.batch, "ckpt": ckpt,
                "error": "out of memory"}
    peak = args.peak_tflops * 1e12 if device == "cuda" else None
    result = {
        "shape": args.shape, "variant": variant, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "seq": args.seq, "batch": args.batch,
        "variable_lengths": variable, "ckpt": ckpt, "attn": args.attn, "lora_r": args.lora_r,
        "steps": args.steps, "tokens_per_s": round(tokens / elapsed, 1),
        "model_tflops_per_s": round(flops / elapsed / 1e12, 4),
        "mfu": round(flops / elapsed / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "loss": round(float(loss.detach()), 4), "finite": math.isfinite(float(loss.detach())),
    }
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1536; tiny: 256)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; tiny: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny: 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="plain,chunked_ce,padding_free",
                   help="comma-separated: plain, chunked_ce, liger, padding_free")
    p.add_argument("--ckpt", choices=["none", "full", "selective"], default="none")
    p.add_argument("--attn", default="sdpa", help="sdpa, eager, flash_attention_2, ...")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--ce-chunk", type=int, default=2048, help="tokens per chunk for chunked_ce")
    p.add_argument("--variable-lengths", action="store_true", help="lengths uniform in [seq/2, seq]")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="peak bf16 TFLOP/s for MFU")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    args = p.parse_args(argv)
    tiny = args.shape == "tiny"
    args.seq = args.seq or (256 if tiny else 1536)
    args.batch = args.batch or (2 if tiny else 4)
    args.steps = args.steps or (3 if tiny else 10)
    if tiny:
        args.warmup = min(args.warmup, 1)
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant not in ("plain", "chunked_ce", "liger", "padding_free"):
            p.error(f"unknown variant {variant!r}")
        print(json.dumps(run_variant(args, variant)), flush=True)


if __name__ == "__main__":
    main()
