"""Messages on stderr in one voice: every failure the CLI reports starts with ``error:``, everything else it
warns about with ``warning:``, whichever layer (our code, the option parser) raised it."""

from __future__ import annotations

import typer


def error(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)


def warning(msg: str) -> None:
    typer.secho(f"warning: {msg}", fg=typer.colors.YELLOW, err=True)
