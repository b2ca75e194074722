"""`synthpert generate` (the teacher) and `synthpert judge`, with exit codes that say how a run stopped.

Both read an optional YAML (its ``teacher:`` / ``judge:`` section, so one run config can hold every
stage) and ``key=value`` overrides (``teacher.model=gpt-4o-mini`` or just ``model=gpt-4o-mini``).

Exit codes: 0 done; 3 stopped at --max-cost (everything received is cached: rerun with a larger budget);
1 some requests failed after all retries (rerun retries only those); 130 interrupted (rerun resumes);
2 a user error (bad config, missing key, refused request).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from ..config import load_section
from ..config.generate import JudgeConfig, TeacherConfig


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _flags_win(cfg, max_cost: float | None, no_progress: bool):
    """--max-cost and --no-progress override the config and its key=value overrides."""
    if max_cost is not None:
        cfg.max_cost = max_cost
    if no_progress:
        cfg.progress = False
    return cfg


def _finish(summary: dict) -> None:
    typer.echo(json.dumps(summary, indent=2, default=str))
    engine = summary.get("engine") or {}
    stopped = engine.get("stopped")
    if stopped == "interrupted":
        typer.secho("interrupted: outputs hold everything finished so far; rerun the same command to resume",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130)
    if stopped == "max_cost":
        typer.secho(f"stopped before exceeding the budget (spent ${summary.get('cost_usd_this_run', 0):.4f}); "
                    "rerun with a larger --max-cost to continue (cached answers are free)",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(3)
    if engine.get("failed"):
        typer.secho(f"{engine['failed']} request(s) failed after all retries (see failed_examples); rerun to "
                    "retry just those", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def generate_cmd(
    dataset: Path = typer.Option(..., "--dataset", help="Built dataset folder (from `synthpert data build`)."),
    out: Path = typer.Option(..., "--out", help="Folder for traces.jsonl, summary.json and cache.sqlite."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with a `teacher:` section."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Estimate requests, tokens and cost; send nothing."),
    max_cost: float | None = typer.Option(None, "--max-cost", help="USD this run may spend (stops before)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. teacher.model=gpt-4o-mini"),
) -> None:
    """Teacher: write reasoning traces for training triples (any OpenAI-compatible API, or offline)."""
    from ..generate import run_generate

    _setup_logging()
    cfg = _flags_win(load_section(TeacherConfig, "teacher", config, overrides), max_cost, no_progress)
    summary = run_generate(cfg, dataset, out, dry_run=dry_run)
    _finish(summary)


def judge_cmd(
    traces: Path = typer.Option(..., "--traces", help="traces.jsonl written by `synthpert generate`."),
    out: Path = typer.Option(..., "--out", help="Folder for kept.jsonl, rejected.jsonl, summary.json."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with a `judge:` section."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Estimate requests, tokens and cost; send nothing."),
    max_cost: float | None = typer.Option(None, "--max-cost", help="USD this run may spend (stops before)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. judge.kind=rules"),
) -> None:
    """Judge: rate each trace's reasoning; keep it iff rating >= threshold AND answer == label."""
    from ..judge import run_judge

    _setup_logging()
    cfg = _flags_win(load_section(JudgeConfig, "judge", config, overrides), max_cost, no_progress)
    summary = run_judge(cfg, traces, out, dry_run=dry_run)
    _finish(summary)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
    app.command("judge")(judge_cmd)
