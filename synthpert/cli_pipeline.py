"""`synthpert run`: the whole pipeline from one config."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        config: Path = typer.Argument(..., help="Run config (YAML). Shipped ones are found by name: quickstart.yaml"),
        overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lora.r=16"),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Parent folder of run directories."),
        name: str | None = typer.Option(None, "--name", help="Run name (default: the config's `name`)."),
        from_stage: str | None = typer.Option(None, "--from", help="Rerun this stage and every later one."),
        force: list[str] = typer.Option(None, "--force", help="Rerun this stage (repeatable)."),
        until: str | None = typer.Option(None, "--until", help="Stop after this stage."),
    ) -> None:
        """Run data -> generate -> judge -> train -> eval in runs/NAME/, skipping stages already complete."""
        from .pipeline import load_run_config, run_pipeline

        ovr = list(overrides or [])
        if name:
            ovr.append(f"name={name}")
        cfg, _ = load_run_config(config, ovr)
        run_pipeline(cfg, runs_dir, from_stage=from_stage, force=list(force or []), until=until)
