"""CLI commands of the pipeline stage (placeholder until that stage lands)."""

import typer


def register(app: typer.Typer) -> None:
    pass
