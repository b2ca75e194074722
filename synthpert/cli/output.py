"""Failures on stderr in one voice: every error the CLI reports starts with ``error:``, whichever layer (our
code, the option parser, a stage's outcome) raised it."""

from __future__ import annotations

import typer


def error(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
