"""Science benchmark: what the tiny student learns on CPU, variant by variant, beside the model-free baselines.

    python scripts/bench_science.py                       # every variant, seed 0, then 3 seeds of --chosen
    python scripts/bench_science.py --variants multitask label_only --seeds 0 1 2
    python scripts/bench_science.py --list

Each variant is the quickstart recipe (configs/quickstart.yaml: trained on K562 + HepG2 + Jurkat, so the
evidence block carries cross-line observations; multitask student) with a few overrides, run through
`synthpert run` into its own run folder (so a rerun resumes and skips finished stages), evaluated on the
SAME pairs as the quickstart: every K562 test pair of 300 random readout genes (held-out perturbations) and
every RPE1 test pair of 300 (an unseen line). Every variant fits the tuned decision rule on validation rows;
the table shows each model three ways from the same predictions — argmax of its class probabilities, prior
shift, tuned — beside majority, gene prior, cross-cell and combined. Writes a Markdown table (stdout and
--out) with the date, the machine and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

BASE = {"eval.figures": "false"}  # the quickstart's own recipe and eval sets; no figures
VARIANTS = {
    "multitask": {},  # the quickstart as shipped
    "label_only": {"train.mode": "label_only"},
    "reasoning": {"train.mode": "reasoning", "data.train_subsample.n": 1500, "eval.inference.max_new_tokens": 192},
    "multitask_all_explained": {"train.explain_fraction": 1.0, "data.train_subsample.n": 1500},
    "multitask_blind": {"teacher.mode": "evidence_blind", "teacher.samples": 4},
    "multitask_no_evidence": {"train.evidence": "false"},
    "multitask_natural": {"data.train_subsample.balance": "false"},
    "multitask_gene_matched": {"data.train_subsample.gene_matched": "true"},
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


def _prior_row(run: Path, eval_set: str) -> dict:
    """The prior-shift rule on the same predictions (the run itself applied the tuned rule)."""
    from synthpert.baselines import score_predictions
    from synthpert.data import built_config, load_built
    from synthpert.decision import decision_for
    from synthpert.evaluate import read_predictions
    from synthpert.evidence import training_stats

    data = run / "eval" / eval_set / "data"
    test = load_built(data, "test").to_pandas()
    preds = read_predictions(run / "eval" / eval_set / "result" / "predictions.jsonl")
    test = test[test["id"].isin(preds)].reset_index(drop=True)
    probs = np.array([preds[i].prob_vector() for i in test["id"]])
    d = decision_for("prior", str(run / "train"), training_stats(built_config(data)))  # what eval.decision=prior does
    return score_predictions(test, d.labels_for(probs), d.adjusted(probs), n_bootstrap=200, seed=0)["overall"]


def _cell(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    ci = (m.get("ci") or {}).get(key)
    return f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def rows_for(run: Path, label: str, eval_set: str) -> list[list[str]]:
    metrics = json.loads((run / "eval" / eval_set / "result" / "metrics.json").read_text())
    model = metrics["model"]
    out = []
    for rule, m in (("argmax", model["scored"]["overall"]), ("prior", _prior_row(run, eval_set)),
                    ("tuned", model["decided"]["overall"])):
        out.append([f"{label} ({rule})", m])
    return out


def table(results: dict[str, Path], base_run: Path) -> str:
    head = ("| set | predictor | accuracy | macro-F1 | F1 up | F1 down | F1 not DE | AUROC DE (per gene) | "
            "AUROC dir (per gene) |\n|---|---|---|---|---|---|---|---|---|")
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
                         f"{_cell(m, 'auroc_dir_per_gene')} ({m.get('auroc_dir_genes')} genes) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--chosen", default=None, help="also run this variant with seeds 1 and 2")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench_science")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--list", action="store_true")
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
    for v, s in plan:
        results[f"{v} s{s}"] = run_variant(v, s, args.runs_dir, env)
    text = (f"bench_science — {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
            f"wall {time.time() - t0:.0f} s; `python scripts/bench_science.py {' '.join(sys.argv[1:])}`\n\n"
            + table(results, next(iter(results.values()))))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
