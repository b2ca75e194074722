"""`synthpert run`: the whole pipeline from one config (or its --dry-run plan), with progress and outcome printed."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import typer

from ..config import load_section
from ..config.run import RunConfig
from ..errors import SynthpertError
from ..metric_table import metrics


def run_cmd(
    config: Path = typer.Argument(..., help="Run config (YAML). Shipped ones are found by name: quickstart.yaml"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lora.r=16"),
    merge: list[Path] = typer.Option(None, "--merge", help="Another config whose sections go on top (repeatable), "
                                     "e.g. --merge teacher_openai.yaml for a real teacher and judge."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Parent folder of run directories."),
    name: str | None = typer.Option(None, "--name", help="Run name (default: the config's `name`)."),
    from_stage: str | None = typer.Option(None, "--from", help="Rerun this stage and every later one."),
    force: list[str] = typer.Option(None, "--force", help="Rerun this stage (repeatable)."),
    until: str | None = typer.Option(None, "--until", help="Stop after this stage."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build the data, print what each stage would do "
                                 "(requests, cost, training steps, eval pairs) and stop before any request "
                                 "is sent or model loaded."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print each evaluation's full report and the "
                                 "trainer's logged losses too (by default: report paths, the at-a-glance lines, "
                                 "a progress bar; the losses are in train/train_log.jsonl)."),
) -> None:
    """Run data -> generate -> judge -> train -> eval in runs/NAME/, skipping stages already complete."""
    from rich.console import Console

    from ..pipeline import STAGES, Pipeline, run_pipeline

    # Checked before anything is printed or built: a typo must leave no run folder behind (a dry run builds
    # the data stage, and an unknown --until would have let it).
    for flag, value in (("--from", from_stage), ("--until", until), *(("--force", f) for f in force or [])):
        if value is not None and value not in STAGES:
            guess = difflib.get_close_matches(value, STAGES, n=1)
            raise SynthpertError(f"{flag} {value!r} is not a stage" + (f" (did you mean {guess[0]!r}?)" if guess
                                 else "") + f"; stages: {', '.join(STAGES)}")
    ovr = list(overrides or [])
    if name:
        ovr.append(f"name={name}")
    cfg = load_section(RunConfig, None, config, ovr, merge=list(merge or []))
    console = Console()
    log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    say = lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    run_dir = Path(runs_dir) / cfg.name
    if dry_run:
        console.print(f"[bold]synthpert run {cfg.name} --dry-run[/] → {run_dir}")
        print_plan(console, Pipeline(cfg, run_dir, log=log).dry_run(until))
        return
    if verbose:
        import os

        from ..checkpoints import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # the trainer's own log lines on the console again
    console.print(f"[bold]synthpert run[/] {cfg.name} → {run_dir}")
    heuristics = _offline_heuristics(cfg)
    if heuristics:  # said first: "traces generated: 4800, kept: 4800" reads like a language model's work
        say(f"note: {heuristics}: no language model writes or rates the traces; the student learns the "
            "heuristic's reasoning")
    pipe, summaries = run_pipeline(cfg, runs_dir, from_stage=from_stage, force=list(force or []), until=until,
                                   log=log)
    _print_outcome(console, pipe, summaries, verbose)


def _offline_heuristics(cfg: RunConfig) -> str:
    parts = ([f"the teacher (mode {cfg.teacher.mode})"] if cfg.teacher.offline else []) + (
        ["the judge (rules, form only)"] if cfg.judge.kind == "rules" else [])
    if not parts:
        return ""
    return " and ".join(parts) + (" are offline heuristics" if len(parts) == 2 else " is an offline heuristic")


def _print_outcome(console, pipe, summaries: dict, verbose: bool = False) -> None:
    """Counts, where each evaluation's report is (the report itself with -v), which predictor to use for
    predictions and how, how to serve the model, where the manifest is."""
    from .generate import judge_detail_lines, teacher_detail_lines

    counts = pipe.manifest.data.get("counts", {})
    say = lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    # what a language-model teacher and judge did (parse rates, problems, ratings, rejections); nothing for heuristics
    for line in teacher_detail_lines(summaries.get("generate") or {}):
        say(f"teacher {line}")
    for line in judge_detail_lines(summaries.get("judge") or {}):
        say(f"judge {line}")
    console.print(f"traces generated: {counts.get('traces_generated')}, kept: {counts.get('traces_kept')}, "
                  f"trained on: {counts.get('examples_trained')}")
    for name in pipe.cfg.eval_sets:
        report = pipe.stage_dir("eval") / name / "result" / "report.md"
        if report.exists():
            if verbose:
                console.rule(f"eval: {name}")
                console.print(report.read_text(), markup=False, highlight=False)
            else:
                say(f"report ({name}): {report}")
    glance = [line for name in pipe.cfg.eval_sets for line in _glance(name, pipe.stage_dir("eval") / name / "result")]
    if glance:
        console.print("\nAt a glance (the judged answer, 95% intervals; details in each report.md):")
        for line in glance:
            say(line)
    if "train" in summaries:
        for line in _which_predictor(pipe):
            say(line)
        console.print("\nServe the trained model locally:")
        say(f"  synthpert serve --run {pipe.dir}")
    console.print(f"manifest: {pipe.manifest.path}")


def _which_predictor(pipe) -> list[str]:
    """Which predictor to use for one's own triples, from the verdicts on macro-F1: the student only where it
    beats the best baseline beyond the intervals on every set, else that baseline (same data, no model)."""
    verdicts = []
    for name in pipe.cfg.eval_sets:
        path = pipe.stage_dir("eval") / name / "result" / "metrics.json"
        if path.exists():
            v = json.loads(path.read_text()).get("verdict", {}).get("macro_f1")
            if v:
                verdicts.append(v)
    if not verdicts:
        return []
    student = f"  synthpert predict --run {pipe.dir} --input pairs.csv --out predictions.csv"
    if all(v.get("outcome", "beats" if v["beats"] else "trails") == "beats" for v in verdicts):
        return ["\nPredict your own triples (the student beats every baseline on macro-F1 beyond the intervals):",
                student]
    names = [v["best_baseline"] for v in verdicts]
    best = max(set(names), key=names.count)
    how = "trails" if any(v.get("outcome") == "trails" for v in verdicts) else "does not beat"
    return [f"\nPredict your own triples with the {best} baseline while the student {how} it on macro-F1 (same "
            "training data, no model):",
            f"  synthpert predict --run {pipe.dir} --baseline {best} --input pairs.csv --out predictions.csv",
            "  (the student's answers and reasoning: the same command without --baseline)"]


def _glance(name: str, result: Path) -> list[str]:
    """One line per headline metric of a finished evaluation: the model beside majority and the best baseline."""
    path = result / "metrics.json"
    if not path.exists():
        return []
    m = json.loads(path.read_text())
    lines = []
    for key, label in ((metric.key, metric.glance) for metric in metrics("glance")):
        v = m.get("verdict", {}).get(key)
        if v is None:
            continue
        ci = m["model"][v["row"]]["overall"].get("ci", {})  # the row the verdict judged (evaluate.verdict_row)
        lo_hi = f" [{ci[key][0]:.2f}, {ci[key][1]:.2f}]" if key in ci else ""
        majority = f", majority {v['majority']:.3f}" if v.get("majority") is not None else ""
        lines.append(f"  {name} ({m['n_predicted']:,} pairs) {label}: model {v['model']:.3f}{lo_hi}{majority}, "
                     f"best baseline {v['best_baseline']} {v['baseline']:.3f}")
    return lines


def _usd(x) -> str:
    return "unknown (no price configured)" if x is None else f"${x:,.2f}"


def _client_line(est: dict) -> str:
    if est["base_url"] == "local":
        return f"{est['model']}: {est['requests']:,} items, no API, no cost"
    via = (f" through the Batch API ({est['batch']['files']:,} file(s), prices × {est['batch']['discount']:g})"
           if est.get("batch") else "")
    return (f"{est['model']} at {est['base_url']}{via}: {est['http_requests_needed']:,} requests to send "
            f"({est['already_cached']:,} cached), {est['samples_to_generate']:,} samples, "
            f"~{est['est_prompt_tokens']:,} "
            f"prompt + ~{est['est_completion_tokens']:,} completion tokens; est. cost {_usd(est['est_cost_usd'])}, "
            f"at most {_usd(est['max_cost_usd'])} (every completion at its token cap)")


def plan_lines(plan: dict) -> list[str]:
    """The dry-run plan as lines of text, one block per stage."""
    lines = []
    d = plan["data"]
    sp = d["splits"]
    lines.append(f"[data] {d['setting']}: train {sp['train']['n']:,} triples, validation {sp['validation']['n']:,}, "
                 f"test {sp['test']['n']:,} (built; a real run reuses it)")
    if "generate" in plan:
        g = plan["generate"]
        lines.append(f"[generate] teacher ({g['mode']}) on {g['examples']:,} training triples: {_client_line(g)}")
    if "judge" in plan:
        j = plan["judge"]
        lines.append(f"[judge] at most {j['traces']:,} traces judged (those whose answer is not the label are "
                     f"rejected free): {_client_line(j)}")
    if "generate" in plan and "judge" in plan:
        costs = [plan[s]["est_cost_usd"] for s in ("generate", "judge")]
        total = None if None in costs else sum(costs)
        worst = [plan[s]["max_cost_usd"] for s in ("generate", "judge")]
        lines.append(f"[cost] teacher + judge: est. {_usd(total)}, at most "
                     f"{_usd(None if None in worst else sum(worst))}")
    if "train" in plan:
        t = plan["train"]
        lines.append(f"[train] {t['base_model']} ({t['mode']}, LoRA r={t['lora_r']}, quantization {t['quantization']}, "
                     f"max_length {t['max_length']}): at most {t['max_examples']:,} examples "
                     f"({t['examples_bound']}), at most {t['steps_per_epoch_max']:,} optimizer steps per epoch × "
                     f"{t['epochs']:g} epochs = {t['optimizer_steps_max']:,} steps; CUDA here: "
                     f"{'yes' if t['cuda_available'] else 'no'}")
        rate = t.get("published_keep_rate")
        if rate and t["max_examples"]:
            n = round(t["max_examples"] * rate)
            lines.append(f"[train] at SynthPert's published keep rate (about 2 traces in 15) that is ~{n:,} examples, "
                         f"~{round(t['optimizer_steps_max'] * rate):,} optimizer steps")
    if "eval" in plan:
        e = plan["eval"]
        sets = ", ".join(f"{k} ({'+'.join(v['test_cells'])}) {v['pairs']:,} pairs" for k, v in e["sets"].items())
        lines.append(f"[eval] backend {e['backend']}, up to {e['max_new_tokens']} new tokens per answer: {sets}; "
                     f"at most {e['max_generated_tokens']:,} generated tokens")
    for p in plan.get("problems", []):
        lines.append(f"would stop: {p}")
    n = len(plan.get("problems", []))
    lines.append("dry run: nothing was sent and no model was loaded" + (
        f"; a real run would refuse to start ({n} problem{'s' if n > 1 else ''} above)" if n else ""))
    return lines


def print_plan(console, plan: dict) -> None:
    for line in plan_lines(plan):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
