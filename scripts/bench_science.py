"""Science benchmark: what a student learns, variant by variant, beside the model-free baselines.

    python scripts/bench_science.py                       # every variant, seed 0, then 3 seeds of --chosen
    python scripts/bench_science.py --variants multitask label_only --seeds 0 1 2
    python scripts/bench_science.py --variants multitask --seeds 0 1 2 --jobs 2
    python scripts/bench_science.py --variants multitask multitask_lookup --base-model smollm2-135m-instruct
    python scripts/bench_science.py --variants multitask --method full
    python scripts/bench_science.py --variants label_only --base-model smollm2-135m-instruct --triples 1200 \
        --eval-sets pilot
    python scripts/bench_science.py --list
    python scripts/bench_science.py --variants multitask_grpo --seeds 0 --table-only   # table from finished runs

Three axes beside the variant and the seed:

* ``--base-model``: ``tiny`` (the random-init model built in the run, the quickstart's), a shipped short name
  (``smollm2-135m-instruct``) or a model folder. Each gets the training and inference settings it needs
  (``BASE_MODELS``: a pretrained model trains at a far lower learning rate than the tiny model's 3e-3);
* ``--method``: ``lora`` or ``full`` (``train.method: full``, every weight trained);
* ``--triples``: the training-set size of every run (``data.train_subsample.n``; equal data across base models);
* ``--eval-sets``: ``science`` (default), ``pilot`` (200 genes of each science draw, for a first look where a
  pretrained student makes the science sets cost hours on a CPU; see EVAL_SETS) or ``quickstart``. The science
  sets are fixed by this benchmark, not by the quickstart: every test pair of 1,200 readout genes drawn at
  random (seed 0, whatever the run's seed, so every variant, seed and base model is scored on the same pairs)
  from K562's held-out perturbations (6,810 pairs, 187 genes with both a changed and an unchanged pair) and
  from RPE1, a line never trained on (9,745 pairs, 186 such genes). Genes are drawn, never labels: 1,200 is
  the smallest round count whose draws (20 seeds) kept at least 150 both-class genes in both lines, enough for
  a per-gene AUROC.
  ``quickstart`` scores the quickstart's own sets (the whole K562 test split, 300 RPE1 genes drawn by the
  run's seed), as the tables in docs/benchmarks.md dated before these axes were.

Each variant is the quickstart recipe (configs/quickstart.yaml: trained on K562 + HepG2 + Jurkat, so the
evidence block carries cross-line observations; multitask student) with a few overrides, run through
`synthpert run` into its own run folder (so a rerun resumes and skips finished stages). Every variant fits
the tuned decision rule on validation rows; the table shows each model three ways from the same predictions
— argmax of its class probabilities, prior shift, tuned — beside majority, gene prior, cross-cell and
combined, with the expected calibration error (ECE) of the probabilities each rule reads. A run with an `rl:`
stage (`multitask_grpo`) shows its SFT adapter (`<set>_sft`) and its SFT+GRPO adapter side by side. Each run
records its wall time and peak memory (the largest resident set of its process tree, from wait4) in
``bench.json`` in its folder; the table lists them with the stage wall times. Writes a Markdown table
(stdout and --out) with the date, the machine and the wall time.
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

BASE = {"eval.figures": "false"}  # the quickstart's own recipe; no figures
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
    # the evidence block also states combined's probabilities (cross-fitted for training examples): the
    # student starts from the strongest model-free bar, and the verdict asks whether it adds to it
    "multitask_lookup": {"train.evidence_lookup": "true"},
}
TINY = "tiny"
# What each base model needs beside the variant's overrides: under "all" whatever the method, under "lora" /
# "full" per method. Starting points, not tuned (nothing has been run with them yet).
PRETRAINED = {
    "all": {
        "train.optim.lr": 2.0e-4,  # a pretrained model: the tiny random-init model's 3e-3 would wreck its weights
        "train.precision": "bf16",  # half the memory of fp32 weights and activations (whether faster: measure)
        # its tokenizer is not the tiny model's prompt-trained one: the explain task's prompt is 480-640 tokens
        # (300 training triples, evidence block and lookup line), the offline teacher's trace a few hundred more
        "train.max_length": 1536,
        "eval.inference.batch_size": 16,  # 16 prompts of ~500 tokens; the tiny model's 32 holds far shorter ones
        # 1.8x the pairs/s of float32 on this machine's avx512_bf16 cores (0.41 vs 0.23 pairs/s, 32 prompts of
        # ~900 tokens, SmolLM2, 2026-12-07); on a CPU without bf16 instructions, override it with float32
        "eval.inference.dtype": "bfloat16",
    },
    "lora": {"eval.inference.merge_adapter": "true"},  # merged: one matmul per layer, as the tiny recipe
    "full": {"train.optim.lr": 5.0e-5},  # every weight moves: a quarter of LoRA's rate
}
BASE_MODELS = {
    TINY: {"all": {}, "lora": {}, "full": {"train.optim.lr": 1.0e-3}},  # full: a third of its LoRA rate
    "smollm2-135m-instruct": {**PRETRAINED, "lora": {**PRETRAINED["lora"],
                                                     "train.lora.layers": 6}},  # the last 6 of 30 layers on a CPU
}
METHODS = {"lora": {}, "full": {"train.method": "full"}}
BASELINES = ("majority", "gene_prior", "crosscell", "combined")
# Fixed for this benchmark (module docstring): every test pair of 1,200 readout genes drawn with seed 0
SCIENCE_GENES, SCIENCE_SEED = 1200, 0
EVAL_SETS = {
    "science": {"k562_science": {"test_cells": ["k562"], "genes": SCIENCE_GENES, "seed": SCIENCE_SEED},
                "rpe1_science": {"test_cells": ["rpe1"], "genes": SCIENCE_GENES, "seed": SCIENCE_SEED}},
    "quickstart": None,  # configs/quickstart.yaml's own: k562_test, rpe1_unseen
    # A first look where the science sets cost too much: a pretrained 135 M student scores ~1 pair/s on 2 CPU
    # cores (~500-token prompts, bfloat16), so the science sets and 1,000 decision rows (~17,500 pairs) take
    # ~5 h a run. 200 genes of the same draw, and 300 decision rows: ~3,000 pairs, ~30 genes with both classes
    # per line, intervals to match. Not the table issue #28 asks for.
    "pilot": {"k562_pilot": {"test_cells": ["k562"], "genes": 200, "seed": SCIENCE_SEED},
              "rpe1_pilot": {"test_cells": ["rpe1"], "genes": 200, "seed": SCIENCE_SEED}},
}
DECISION_FIT_N = {"pilot": 300}  # validation rows the tuned rule is fitted on, where not the recipe's 1,000
QUICKSTART_SETS = ("k562_test", "rpe1_unseen")


def base_model_key(base: str) -> str:
    """The BASE_MODELS entry of ``--base-model``: a known name, else a model folder (a pretrained model)."""
    if base in BASE_MODELS:
        return base
    if not Path(base).expanduser().is_dir():
        raise SystemExit(f"--base-model {base}: neither {' nor '.join(BASE_MODELS)} nor a model folder")
    return "path"


def base_overrides(base: str, method: str) -> dict:
    """The base model's settings for ``method``; a folder gets a pretrained model's, but not a layer count
    (it is the model's own)."""
    key = base_model_key(base)
    sets = BASE_MODELS.get(key, PRETRAINED)
    out = {"train.base_model": base if key != "path" else str(Path(base).expanduser().resolve()),
           **sets["all"], **sets[method], **METHODS[method]}
    if method == "full":  # no adapter: no LoRA layers to pick, nothing to merge
        out = {k: v for k, v in out.items() if not k.startswith(("train.lora.", "eval.inference.merge_adapter"))}
    return out


def run_name(variant: str, seed: int, base: str = TINY, method: str = "lora", triples: int | None = None) -> str:
    """The run folder's name: the variant and seed alone for the tiny model with LoRA (the folders of earlier
    runs of this script), else the base model and method too; ``-n<triples>`` when --triples is given."""
    size = f"-n{triples}" if triples else ""
    if base == TINY and method == "lora":
        return f"{variant}{size}-s{seed}"
    return f"{variant}-{Path(base).name}-{method}{size}-s{seed}"


def run_overrides(variant: str, seed: int, base: str = TINY, method: str = "lora", triples: int | None = None) -> dict:
    """Every override of one run: the benchmark's, the base model's and method's, the variant's (so a variant
    says what it changes), the training-set size of --triples (after the variant: an equal-data comparison
    holds it fixed), the seeds and the name."""
    size = {"data.train_subsample.n": triples} if triples else {}
    return {**BASE, **base_overrides(base, method), **VARIANTS[variant], **size, "seed": seed, "data.seed": seed,
            "train.seed": seed, "name": run_name(variant, seed, base, method, triples)}


def run_config(eval_sets: str, runs_dir: Path) -> str:
    """The config `synthpert run` reads: the quickstart's, with the science eval sets in place of its own
    (written beside the runs: overrides can add eval sets but not remove the quickstart's)."""
    if EVAL_SETS[eval_sets] is None:
        return "quickstart.yaml"
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["eval_sets"] = EVAL_SETS[eval_sets]
    if eval_sets in DECISION_FIT_N:
        cfg["eval"]["decision_fit_n"] = DECISION_FIT_N[eval_sets]
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / f"bench_science_{eval_sets}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def set_names(eval_sets: str) -> tuple[str, ...]:
    return tuple(EVAL_SETS[eval_sets]) if EVAL_SETS[eval_sets] else QUICKSTART_SETS


STAGES = ("data", "base_model", "generate", "judge", "train", "rl", "eval")


def _stage_stamps(run: Path) -> dict[str, int]:
    """When each stage of a run folder last finished (its stage.json's mtime)."""
    return {st: (run / st / "stage.json").stat().st_mtime_ns for st in STAGES if (run / st / "stage.json").exists()}


def run_variant(name: str, seed: int, runs_dir: Path, env: dict, base: str = TINY, method: str = "lora",
                config: str = "quickstart.yaml", triples: int | None = None) -> Path:
    overrides = run_overrides(name, seed, base, method, triples)
    run = runs_dir / overrides["name"]
    before = _stage_stamps(run)
    cmd = [sys.executable, "-m", "synthpert.cli", "run", config, "--runs-dir", str(runs_dir),
           *[f"{k}={v}" for k, v in overrides.items()]]
    runs_dir.mkdir(parents=True, exist_ok=True)
    log = runs_dir / f"{overrides['name']}.log"
    code, wall, peak = measured(cmd, log, env)
    if code != 0:
        tail = log.read_text()[-6000:]
        raise SystemExit(f"{overrides['name']} failed (exit {code}; log {log}):\n{tail}")
    ran = [stage for stage, stamp in _stage_stamps(run).items() if before.get(stage) != stamp]
    if ran:  # a run that only skipped finished stages keeps the measurement of the one that ran them
        (run / "bench.json").write_text(json.dumps({"wall_s": round(wall, 1), "stages_run": ran,
                                                    "peak_rss_gib": round(peak, 2), "overrides": overrides},
                                                   indent=1))
    print(f"  {overrides['name']}: {wall:.0f} s, peak RSS {peak:.2f} GiB", file=sys.stderr)
    return run


def measured(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float, float]:
    """Run ``cmd`` with its output in ``log``: (exit code, wall seconds, peak resident set in GiB)."""
    t0 = time.time()
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        # wait4, not getrusage(RUSAGE_CHILDREN): that one mixes the runs of --jobs 2; ru_maxrss (KiB on Linux)
        # is the largest resident set among the run's process tree
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.time() - t0, usage.ru_maxrss / 2**20


def _test_and_probs(run: Path, eval_set: str, result: str):
    from synthpert.dataset import load_built
    from synthpert.evaluate import read_predictions

    test = load_built(run / "eval" / eval_set / "data", "test").to_pandas()
    preds = read_predictions(run / "eval" / result / "result" / "predictions.jsonl")
    test = test[test["id"].isin(preds)].reset_index(drop=True)
    return test, np.array([preds[i].prob_vector() for i in test["id"]])


def _prior_row(run: Path, eval_set: str, result: str, adapter: str) -> dict:
    """The prior-shift rule on the same predictions (the run itself applied the tuned rule)."""
    from synthpert.baselines import score_predictions
    from synthpert.dataset import built_config
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
    """Wall seconds of each run's stages (stage.json), e.g. the rl stage's, and the whole run's wall time and
    peak memory (bench.json) where this script measured them."""
    lines = []
    for label, run in results.items():
        secs = {}
        for stage in ("train", "rl", "eval"):
            f = run / stage / "stage.json"
            if f.exists():
                secs[stage] = json.loads(f.read_text())["seconds"]
        parts = [f"{k} {v:.0f} s" for k, v in secs.items()]
        if (run / "bench.json").exists():
            b = json.loads((run / "bench.json").read_text())
            parts.append(f"run {b['wall_s']:.0f} s wall ({', '.join(b.get('stages_run', []))} ran), "
                         f"peak RSS {b['peak_rss_gib']:.2f} GiB")
        lines.append(f"- {label}: " + ", ".join(parts))
    return "\n".join(lines)


def table(results: dict[str, Path], base_run: Path, sets: tuple[str, ...] = QUICKSTART_SETS) -> str:
    head = ("| set | predictor | accuracy | macro-F1 | F1 up | F1 down | F1 not DE | AUROC DE (per gene) | "
            "AUROC dir (per gene) | ECE |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for eval_set in sets:
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--chosen", default=None, help="also run this variant with seeds 1 and 2")
    ap.add_argument("--base-model", default=TINY, help=f"{' | '.join(BASE_MODELS)} | PATH (a model folder)")
    ap.add_argument("--method", choices=list(METHODS), default="lora", help="train LoRA adapters or every weight")
    ap.add_argument("--triples", type=int, default=None,
                    help="training triples (data.train_subsample.n) for every run: equal data across base models "
                         "(default: the recipe's 4,800, or the variant's own)")
    ap.add_argument("--eval-sets", choices=list(EVAL_SETS), default="science",
                    help="science: this benchmark's fixed sets; quickstart: the quickstart's own")
    ap.add_argument("--runs-dir", type=Path, default=None,
                    help="default runs/bench_science (quickstart sets) or runs/bench_science/science")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (2 on 2 cores: ~1.15x the throughput)")
    ap.add_argument("--list", action="store_true", help="show the axes and every override, then stop")
    ap.add_argument("--table-only", action="store_true", help="write the table from finished run folders")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants + ([args.chosen] if args.chosen else []) if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; variants: {', '.join(VARIANTS)}")
    if not args.list:
        try:  # a misspelt name fails here, not after the first run's data stage
            base_model_key(args.base_model)
        except SystemExit as e:
            ap.error(str(e))
    if args.runs_dir is None:
        runs = ROOT / "runs" / "bench_science"
        # the quickstart sets' folders are those of the tables dated before the science sets
        args.runs_dir = runs if args.eval_sets == "quickstart" else runs / args.eval_sets
    return args


def axes() -> dict:
    """What --list shows: every axis and the overrides each value adds."""
    return {"base": BASE, "variants": VARIANTS,
            "base_models": {**BASE_MODELS, "PATH (a model folder)": {k: v for k, v in PRETRAINED.items()}},
            "methods": METHODS, "eval_sets": {k: v or "configs/quickstart.yaml's own" for k, v in EVAL_SETS.items()}}


def plan_of(args: argparse.Namespace) -> list[tuple[str, int]]:
    plan = [(v, s) for v in args.variants for s in args.seeds]
    if args.chosen:
        plan += [(args.chosen, s) for s in (1, 2) if (args.chosen, s) not in plan]
    return plan


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        print(yaml.safe_dump(json.loads(json.dumps(axes())), sort_keys=False))  # plain copies: no YAML aliases
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    plan = plan_of(args)
    base, method = args.base_model, args.method
    folder = {(v, s): args.runs_dir / run_name(v, s, base, method, args.triples) for v, s in plan}
    size = f" n{args.triples}" if args.triples else ""
    label = lambda v, s: (f"{v}{size} s{s}" if (base, method) == (TINY, "lora")
                          else f"{v} {Path(base).name} {method}{size} s{s}")
    if args.table_only:
        missing = [str(f) for f in folder.values() if not (f / "eval" / "stage.json").exists()]
        if missing:
            raise SystemExit(f"no finished run in {', '.join(missing)} (run without --table-only first)")
        results = {label(v, s): folder[(v, s)] for v, s in plan}
    else:
        todo = [label(v, s) for v, s in plan if not (folder[(v, s)] / "eval" / "stage.json").exists()]
        # measured 2026-12-02 (tiny model, quickstart sets): ~8 min a run on 2 cores (train ~250 s, whole-K562
        # eval ~230 s), two at a time barely faster per run; finished runs are skipped
        print(f"{len(todo)} of {len(plan)} runs to do ({', '.join(todo) or 'none'}); a tiny-model run takes about "
              "8 min on 2 cores", file=sys.stderr)
        if args.jobs > 1:  # each run's torch on one thread: two small runs share 2 cores better than they take turns
            env["OMP_NUM_THREADS"] = "1"
        config = run_config(args.eval_sets, args.runs_dir)
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda vs: run_variant(*vs, args.runs_dir, env, base, method, config, args.triples),
                                 plan))
        results = {label(v, s): run for (v, s), run in zip(plan, runs)}
    text = (f"bench_science — {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
            f"wall {time.time() - t0:.0f} s; `python scripts/bench_science.py {' '.join(sys.argv[1:])}`\n\n"
            + stage_times(results) + "\n\n" + table(results, next(iter(results.values())), set_names(args.eval_sets)))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
