"""CLI commands of the evaluate stage (placeholder until that stage lands)."""

import typer


def register(app: typer.Typer) -> None:
    pass
