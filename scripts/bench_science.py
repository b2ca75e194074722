"""Science benchmark: what the tiny student learns on CPU, variant by variant, beside the model-free baselines.

    python scripts/bench_science.py                       # every variant, seed 0, then 3 seeds of --chosen
    python scripts/bench_science.py --variants multitask label_only --seeds 0 1 2
    python scripts/bench_science.py --variants multitask --seeds 0 1 2 --jobs 2
    python scripts/bench_science.py --list
    python scripts/bench_science.py --variants multitask_grpo --seeds 0 --table-only   # table from finished runs

Each variant is the quickstart recipe (configs/quickstart.yaml: trained on K562 + HepG2 + Jurkat, so the
evidence block carries cross-line observations; multitask student) with a few overrides, run through
`synthpert run` into its own run folder (so a rerun resumes and skips finished stages), evaluated on the SAME
pairs as the quickstart: every K562 test pair (held-out perturbations; 665 genes with both classes, enough to
tell a per-gene AUROC of 0.53 from chance) and every RPE1 test pair of 300 random readout genes (an unseen
line; a seed draws its own genes). Every variant fits the tuned decision rule
on validation rows; the table shows each model three ways from the same predictions — argmax of its class
probabilities, prior shift, tuned — beside majority, gene prior, cross-cell and combined, with the expected
calibration error (ECE) of the probabilities each rule reads. A run with an `rl:` stage (`multitask_grpo`)
shows its SFT adapter (`<set>_sft`) and its SFT+GRPO adapter side by side, and the stage wall times. Writes a
Markdown table (stdout and --out) with the date, the machine and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

BASE = {"eval.figures": "false"}  # the quickstart's own recipe and eval sets; no figures
VARIANTS = {
    "multitask": {},  # the quickstart as shipped
    "label_only": {"train.mode": "label_only"},  # with the recipe's contrast-first order
    "reasoning": {"train.mode": "reasoning", "data.train_subsample.n": 1500, "eval.inference.max_new_tokens": 192},
    "multitask_all_explained": {"train.explain_fraction": 1.0, "data.train_subsample.n": 1500},
    "multitask_blind": {"teacher.mode": "evidence_blind", "teacher.samples": 4},
    "multitask_no_evidence": {"train.evidence": "false"},
    "multitask_natural": {"data.train_subsample.balance": "false", "data.train_subsample.gene_matched": 0},
    # the recipe before contrast_first: class-balanced triples in a shuffled order
    "multitask_shuffled": {"data.train_subsample.gene_matched": 0, "train.curriculum": "none"},
    "multitask_gene_matched": {"data.train_subsample.gene_matched": "true", "train.curriculum": "none"},
    "multitask_half_matched": {"data.train_subsample.gene_matched": 0.5, "train.curriculum": "none"},
    "multitask_example_loss": {"train.loss_average": "example"},
    "multitask_2400x2": {"data.train_subsample.n": 2400, "train.optim.epochs": 2,  # the recipe before 4,800 x 1
                         "data.train_subsample.gene_matched": 0, "train.curriculum": "none"},
    # SFT, then GRPO (issue #15) in the same run: eval scores the RL adapter as <set> and the SFT adapter as
    # <set>_sft on the same pairs. Sized for ~10 min on 2 CPU cores: 150 steps of 4 prompts x 4 completions,
    # completions of at most 16 tokens (the answer task's block needs ~8); prompts are the SFT's own
    # training triples (the run's training split, never validation or test).
    "multitask_grpo": {"rl.num_generations": 4, "rl.batch_size": 16, "rl.max_completion_length": 16,
                       "rl.max_steps": 150, "rl.save_steps": 50, "rl.lr": 5.0e-4, "rl.temperature": 1.0},
    # examples from every fold: same-gene examples of different folds see counts that differ by their labels
    "multitask_shared_folds": {"data.disjoint_evidence": "false"},
}
BASELINES = ("majority", "gene_prior", "crosscell", "combined")
SETS = ("k562_test", "rpe1_unseen")


def run_variant(name: str, seed: int, runs_dir: Path, env: dict) -> Path:
    overrides = {**BASE, **VARIANTS[name], "seed": seed, "data.seed": seed, "train.seed": seed,
                 "name": f"{name}-s{seed}"}
    cmd = [sys.executable, "-m", "synthpert.cli", "run", "quickstart.yaml", "--runs-dir", str(runs_dir),
           *[f"{k}={v}" for k, v in overrides.items()]]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    print(f"  {name} seed {seed}: {time.time() - t0:.0f} s", file=sys.stderr)
    return runs_dir / f"{name}-s{seed}"


def _test_and_probs(run: Path, eval_set: str, result: str):
    from synthpert.data import load_built
    from synthpert.evaluate import read_predictions

    test = load_built(run / "eval" / eval_set / "data", "test").to_pandas()
    preds = read_predictions(run / "eval" / result / "result" / "predictions.jsonl")
    test = test[test["id"].isin(preds)].reset_index(drop=True)
    return test, np.array([preds[i].prob_vector() for i in test["id"]])


def _prior_row(run: Path, eval_set: str, result: str, adapter: str) -> dict:
    """The prior-shift rule on the same predictions (the run itself applied the tuned rule)."""
    from synthpert.baselines import score_predictions
    from synthpert.data import built_config
    from synthpert.decision import decision_for
    from synthpert.evidence import training_stats

    test, probs = _test_and_probs(run, eval_set, result)
    d = decision_for("prior", str(run / adapter), training_stats(built_config(run / "eval" / eval_set / "data")))
    return score_predictions(test, d.labels_for(probs), d.adjusted(probs), n_bootstrap=200, seed=0)["overall"]


def _with_ece(m: dict, run: Path, eval_set: str, result: str, decision: dict | None) -> dict:
    """Metrics of a finished run gain the calibration error when they predate it (recomputed from the saved
    predictions: the probabilities the rule reads, i.e. the tuned rule's adjusted ones)."""
    if "ece" in m:
        return m
    from synthpert.answer import LABELS
    from synthpert.decision import Decision
    from synthpert.metrics import calibration

    test, probs = _test_and_probs(run, eval_set, result)
    if decision:
        probs = Decision(**{k: v for k, v in decision.items() if k in Decision.model_fields}).adjusted(probs)
    return {**m, **calibration(test["label"].map(LABELS.index).to_numpy(), probs)}


def _cell(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    ci = (m.get("ci") or {}).get(key)
    return f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def rows_for(run: Path, label: str, eval_set: str) -> list[list[str]]:
    """The run's model three ways; a run with an rl stage: its SFT adapter first, then SFT+GRPO."""
    models = [(label, eval_set, "train")]
    if (run / "eval" / f"{eval_set}_sft").is_dir():
        models = [(f"{label} SFT", f"{eval_set}_sft", "train"), (f"{label} SFT+GRPO", eval_set, "rl")]
    out = []
    for name, result, adapter in models:
        metrics = json.loads((run / "eval" / result / "result" / "metrics.json").read_text())
        model = metrics["model"]
        for rule, m in (("argmax", _with_ece(model["scored"]["overall"], run, eval_set, result, None)),
                        ("prior", _prior_row(run, eval_set, result, adapter)),
                        ("tuned", _with_ece(model["decided"]["overall"], run, eval_set, result,
                                            metrics.get("decision")))):
            out.append([f"{name} ({rule})", m])
    return out


def stage_times(results: dict[str, Path]) -> str:
    """Wall seconds of each run's stages (stage.json), e.g. the rl stage's."""
    lines = []
    for label, run in results.items():
        secs = {}
        for stage in ("train", "rl", "eval"):
            f = run / stage / "stage.json"
            if f.exists():
                secs[stage] = json.loads(f.read_text())["seconds"]
        lines.append(f"- {label}: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()))
    return "\n".join(lines)


def table(results: dict[str, Path], base_run: Path) -> str:
    head = ("| set | predictor | accuracy | macro-F1 | F1 up | F1 down | F1 not DE | AUROC DE (per gene) | "
            "AUROC dir (per gene) | ECE |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for eval_set in SETS:
        rows = []
        for label, run in results.items():
            rows += rows_for(run, label, eval_set)
        base = json.loads((base_run / "eval" / eval_set / "result" / "metrics.json").read_text())["baselines"]
        rows += [[name, base[name]["overall"]] for name in BASELINES if "overall" in base.get(name, {})]
        for label, m in rows:
            pc = m["per_class"]
            lines.append(f"| {eval_set} | {label} | {_cell(m, 'accuracy')} | {_cell(m, 'macro_f1')} | "
                         f"{pc['up']['f1']:.3f} | {pc['down']['f1']:.3f} | {pc['not_de']['f1']:.3f} | "
                         f"{_cell(m, 'auroc_de_per_gene')} ({m.get('auroc_de_genes')} genes) | "
                         f"{_cell(m, 'auroc_dir_per_gene')} ({m.get('auroc_dir_genes')} genes) | "
                         f"{_cell(m, 'ece')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--chosen", default=None, help="also run this variant with seeds 1 and 2")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench_science")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (2 on 2 cores: ~1.15x the throughput)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="write the table from finished run folders")
    args = ap.parse_args()
    if args.list:
        print(yaml.safe_dump({"base": BASE, "variants": VARIANTS}, sort_keys=False))
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; variants: {', '.join(VARIANTS)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    results: dict[str, Path] = {}
    plan = [(v, s) for v in args.variants for s in args.seeds]
    if args.chosen:
        plan += [(args.chosen, s) for s in (1, 2) if (args.chosen, s) not in plan]
    if args.table_only:
        results = {f"{v} s{s}": args.runs_dir / f"{v}-s{s}" for v, s in plan}
    else:
        todo = [f"{v} s{seed}" for v, seed in plan
                if not (args.runs_dir / f"{v}-s{seed}" / "eval" / "stage.json").exists()]
        # measured 2026-12-02: ~8 min a run on 2 cores (train ~250 s, whole-K562 eval ~230 s), two at a time
        # barely faster per run; finished runs are skipped
        print(f"{len(todo)} of {len(plan)} runs to do ({', '.join(todo) or 'none'}): about {8 * len(todo)} min on 2 "
              "cores", file=sys.stderr)
        if args.jobs > 1:  # each run's torch on one thread: two small runs share 2 cores better than they take turns
            env["OMP_NUM_THREADS"] = "1"
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda vs: run_variant(*vs, args.runs_dir, env), plan))
        results = {f"{v} s{s}": run for (v, s), run in zip(plan, runs)}
    text = (f"bench_science — {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
            f"wall {time.time() - t0:.0f} s; `python scripts/bench_science.py {' '.join(sys.argv[1:])}`\n\n"
            + stage_times(results) + "\n\n" + table(results, next(iter(results.values()))))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
