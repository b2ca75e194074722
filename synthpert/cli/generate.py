"""`synthpert generate` (the teacher) and `synthpert judge`, with exit codes that say how a run stopped.

Both read an optional YAML (its ``teacher:`` / ``judge:`` section, so one run config can hold every
stage) and ``key=value`` overrides (``teacher.model=gpt-4o-mini`` or just ``model=gpt-4o-mini``).

With ``batch: true`` requests go through the OpenAI Batch API; ``--export-batch FILE`` / ``--import-batch FILE``
move them through a file instead (e.g. ``vllm run-batch``).

Exit codes: 0 done; 3 stopped at --max-cost (everything received is cached: rerun with a larger budget);
1 some requests failed after all retries (rerun retries only those); 130 interrupted (rerun resumes);
2 a user error (bad config, missing key, refused request).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from ..answer import DISPLAY
from ..config import load_section
from ..config.generate import JudgeConfig, TeacherConfig
from ..errors import SynthpertError
from .output import error


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _flags_win(cfg, max_cost: float | None, no_progress: bool, no_resubmit: bool = False):
    """--max-cost, --no-progress and --no-resubmit override the config and its key=value overrides."""
    if max_cost is not None:
        cfg.max_cost = max_cost
    if no_progress:
        cfg.progress = False
    if no_resubmit:
        cfg.batch_resubmit = False
    return cfg


def _batch_files(export_batch: Path | None, import_batch: Path | None, dry_run: bool) -> None:
    if export_batch is not None and (import_batch is not None or dry_run):
        raise SynthpertError("--export-batch writes the requests and sends nothing; use it without --import-batch "
                             "and --dry-run")


def _usd(x) -> str:
    return "unknown (no price configured)" if x is None else f"${x:,.4f}"


def _short(label: str) -> str:
    return DISPLAY.get(label, label)


def _pct(x) -> str:
    return "—" if x is None else f"{x:.0%}"


def teacher_detail_lines(summary: dict) -> list[str]:
    """What a real model's outputs got wrong (nothing to say for a teacher with no problems)."""
    rates, problems = summary.get("parse_rates"), summary.get("output_problems") or {}
    if not rates or (not any(problems.values()) and summary.get("offline_heuristic")):
        return []
    found = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in problems.items() if v) or "none"
    return [f"parsed: strict {_pct(rates['strict'])}, lenient {_pct(rates['lenient'])} of {summary['traces']:,} "
            f"traces; problems: {found}"]


def judge_detail_lines(summary: dict) -> list[str]:
    """The judge's rating distribution and why traces were rejected."""
    if summary.get("kind") != "llm":
        return []
    ratings = ", ".join(f"{r if r != 'unparseable' else 'no rating'} {v['n']:,}"
                        for r, v in (summary.get("per_rating") or {}).items())
    reasons = ", ".join(f"{k} {v:,}" for k, v in (summary.get("rejection_reasons") or {}).items()) or "none"
    return [f"ratings: {ratings}", f"rejected: {reasons}", *(f"warning: {w}" for w in summary.get("warnings") or [])]


def summary_lines(summary: dict, out: Path) -> list[str]:
    """A few lines a person reads: what was kept of what, requests, cost, where the files are."""
    if summary.get("dry_run"):
        items = summary.get("examples", summary.get("traces", 0))
        price = " at the Batch API price" if summary.get("batch") else ""
        return [f"dry run: {items:,} items, {summary['http_requests_needed']:,} requests to send "
                f"({summary['already_cached']:,} already cached) to {summary['model']}; est. cost{price} "
                f"{_usd(summary['est_cost_usd'])}, at most {_usd(summary['max_cost_usd'])}; nothing was sent"]
    if summary.get("export_batch"):
        return [f"wrote {summary['exported']:,} request(s) to {summary['path']} ({summary['already_cached']:,} already "
                f"cached, not written); nothing was sent. Run it, e.g. `vllm run-batch -i {summary['path']} -o "
                f"OUT.jsonl --model MODEL`, then rerun this command with --import-batch OUT.jsonl"]
    engine = summary.get("engine") or {}
    batch = engine.get("batch")
    batch_line = ([f"batch API: {batch['jobs_created']} job(s) created, {batch['jobs_resumed']} resumed, "
                   f"{batch['requests_submitted']:,} request(s) submitted ({batch['requests_resubmitted']:,} "
                   f"resubmitted), {len(batch['problems'])} problem(s) reported"] if batch else [])
    imported = summary.get("import_batch")
    if imported:
        batch_line.append(f"imported {imported['imported']:,} answer(s) from {imported['path']} "
                          f"({imported['errors']:,} error line(s), {imported['damaged_lines']:,} damaged line(s))")
    requests = (f"requests: {engine.get('requests', 0):,} ({engine.get('from_cache', 0):,} from the cache, "
                f"{engine.get('failed', 0):,} failed); cost this run {_usd(summary.get('cost_usd_this_run'))}, "
                f"all traces so far {_usd(summary.get('cost_usd_total'))}")
    if "kept" in summary:  # the judge
        kind = f"{summary['kind']}" + (", an offline heuristic" if summary.get("offline_heuristic") else "")
        by_class = ", ".join(f"{_short(c)} {v['kept']:,}/{v['traces']:,}" for c, v in summary["per_class"].items())
        rate = summary.get("keep_rate")
        return [f"judge ({kind}): kept {summary['kept']:,} of {summary['traces']:,} traces"
                + (f" ({rate:.0%})" if rate is not None else "") + f"; by class {by_class}",
                *judge_detail_lines(summary), requests, *batch_line,
                f"written: {summary['kept_path']} and {summary['rejected_path']} (details: {out / 'summary.json'})"]
    kind = summary["teacher"] + (", an offline heuristic" if summary.get("offline_heuristic") else "")
    return [f"teacher ({kind}, mode {summary['mode']}): {summary['traces']:,} traces for "
            f"{summary['examples_done']:,} of {summary['examples']:,} training triples; "
            f"{summary['answer_matches_label']:,} answers match the label, {summary['parse_failures']:,} unparseable",
            *teacher_detail_lines(summary), requests, *batch_line,
            f"written: {summary['traces_path']} (details: {out / 'summary.json'})"]


def _finish(summary: dict, out: Path, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        for line in summary_lines(summary, out):
            typer.echo(line)
    if summary.get("export_batch"):
        return
    engine = summary.get("engine") or {}
    stopped = engine.get("stopped")
    if stopped == "interrupted":
        error("interrupted: outputs hold everything finished so far; rerun the same command to resume")
        raise typer.Exit(130)
    if stopped == "max_cost":
        error(f"stopped before exceeding the budget (spent ${summary.get('cost_usd_this_run', 0):.4f}); "
              "rerun with a larger --max-cost to continue (cached answers are free)")
        raise typer.Exit(3)
    if engine.get("failed") and summary.get("import_batch"):
        error(f"{engine['failed']} request(s) have no answer in the imported file (see failed_examples in "
              "summary.json); import a file with their answers, or rerun without --import-batch to send them")
        raise typer.Exit(1)
    if engine.get("failed"):
        resubmit = " (without --no-resubmit)" if engine.get("batch") else ""
        error(f"{engine['failed']} request(s) failed after all retries (see failed_examples in summary.json); "
              f"rerun{resubmit} to retry just those")
        raise typer.Exit(1)


def generate_cmd(
    dataset: Path = typer.Option(..., "--dataset", help="Built dataset folder (from `synthpert data build`)."),
    out: Path = typer.Option(..., "--out", help="Folder for traces.jsonl, summary.json and cache.sqlite."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with a `teacher:` section."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Estimate requests, tokens and cost; send nothing."),
    max_cost: float | None = typer.Option(None, "--max-cost", help="USD this run may spend (stops before)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the full summary as JSON instead of a few lines."),
    export_batch: Path | None = typer.Option(None, "--export-batch", help="Write the requests not yet cached as "
                                             "Batch API JSONL (custom_id = cache key) and stop; send nothing."),
    import_batch: Path | None = typer.Option(None, "--import-batch", help="Join a Batch output file (OpenAI's or "
                                             "`vllm run-batch`'s) into the cache, then write traces; send nothing."),
    no_resubmit: bool = typer.Option(False, "--no-resubmit", help="teacher.batch: report requests whose batch "
                                     "failed or expired instead of resubmitting them."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. teacher.model=gpt-4o-mini"),
) -> None:
    """Teacher: write reasoning traces for training triples (any OpenAI-compatible API, or offline)."""
    from ..generate import run_generate

    _setup_logging()
    _batch_files(export_batch, import_batch, dry_run)
    cfg = _flags_win(load_section(TeacherConfig, "teacher", config, overrides), max_cost, no_progress, no_resubmit)
    summary = run_generate(cfg, dataset, out, dry_run=dry_run, export_batch=export_batch, import_batch=import_batch)
    _finish(summary, out, as_json)


def judge_cmd(
    traces: Path = typer.Option(..., "--traces", help="traces.jsonl written by `synthpert generate`."),
    out: Path = typer.Option(..., "--out", help="Folder for kept.jsonl, rejected.jsonl, summary.json."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with a `judge:` section."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Estimate requests, tokens and cost; send nothing."),
    max_cost: float | None = typer.Option(None, "--max-cost", help="USD this run may spend (stops before)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the full summary as JSON instead of a few lines."),
    export_batch: Path | None = typer.Option(None, "--export-batch", help="Write the judge requests not yet cached "
                                             "as Batch API JSONL (custom_id = cache key) and stop; send nothing."),
    import_batch: Path | None = typer.Option(None, "--import-batch", help="Join a Batch output file (OpenAI's or "
                                             "`vllm run-batch`'s) into the cache, then judge; send nothing."),
    no_resubmit: bool = typer.Option(False, "--no-resubmit", help="judge.batch: report requests whose batch failed "
                                     "or expired instead of resubmitting them."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. judge.kind=rules"),
) -> None:
    """Judge: rate each trace's reasoning; keep it iff rating >= threshold AND answer == label."""
    from ..judge import run_judge

    _setup_logging()
    _batch_files(export_batch, import_batch, dry_run)
    cfg = _flags_win(load_section(JudgeConfig, "judge", config, overrides), max_cost, no_progress, no_resubmit)
    summary = run_judge(cfg, traces, out, dry_run=dry_run, export_batch=export_batch, import_batch=import_batch)
    _finish(summary, out, as_json)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
    app.command("judge")(judge_cmd)
