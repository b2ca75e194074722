"""The `synthpert` command line: main.py builds the app from one module per command group; only it prints."""

from .main import main

__all__ = ["main"]
