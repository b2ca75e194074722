"""CLI commands of the train stage (placeholder until that stage lands)."""

import typer


def register(app: typer.Typer) -> None:
    pass
