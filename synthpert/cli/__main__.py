"""`python -m synthpert.cli`: the same command line as the `synthpert` entry point."""

from .main import main

main()
