"""`synthpert push`: publish a run's adapter (with a model card) and kept traces (with a dataset card)."""

from __future__ import annotations

from pathlib import Path

import typer


def push_cmd(
    run: Path = typer.Argument(..., help="The run folder `synthpert run` wrote (runs/NAME)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repo for the adapter, ORG/NAME; the traces go to "
                                "ORG/NAME-traces (a dataset)."),
    what: str = typer.Option("adapter,traces,report", "--what", help="Comma-separated parts: adapter (with the "
                             "model card), traces (a dataset with its card), report (each eval set's metrics.json "
                             "and report.md beside the adapter)."),
    private: bool = typer.Option(False, "--private", help="Create the repos private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the folders that would be uploaded and list them; "
                                 "no network, no token needed."),
    out: Path | None = typer.Option(None, "--out", help="Where the folders are built (default RUN/push)."),
    base_model: str | None = typer.Option(None, "--base-model", help="Hub id of the base model for the card "
                                          "(default: the run's base_model when it is a Hub id)."),
    license: str = typer.Option("other", "--license", help="License of the adapter in the card metadata (the "
                                "base model's license still applies; the traces are CC BY 4.0 like PerturbQA)."),
) -> None:
    """Publish a finished run to the Hugging Face Hub: the adapter with a model card generated from the run's
    manifest and metrics, and the kept traces as a dataset. Token: HF_TOKEN or `hf auth login`."""
    from ..publish import push

    result = push(run, repo_id, out=out, what=what, private=private, dry_run=dry_run, base_model=base_model,
                  license=license)
    for part, info in result["folders"].items():
        target = repo_id if part == "model" else f"{repo_id}-traces"
        typer.echo(f"{part} -> {target} ({'would upload' if dry_run else 'uploaded'} {info['path']}):")
        for f in info["files"]:
            typer.echo(f"  {f}")
    for part, url in (result.get("urls") or {}).items():
        typer.echo(f"{part}: {url}")


def register(app: typer.Typer) -> None:
    app.command("push")(push_cmd)
