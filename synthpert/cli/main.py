"""The `synthpert` app: every command group registers itself; SynthpertErrors become messages and exit codes.

Heavy libraries (torch, transformers, trl, vllm) are imported only inside the commands that need them, so
`synthpert --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

from ..errors import STORAGE_ERRNOS, SynthpertError
from . import data, evaluate, generate, publish, rl, run, train
from .output import error

app = typer.Typer(
    name="synthpert",
    help="Distil frontier-model reasoning about genetic perturbations into small language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Eager: --version answers before the command-line parser asks for a command."""


for group in (data, generate, train, rl, evaluate, run, publish):
    group.register(app)


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except SynthpertError as e:
        error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        error("interrupted; finished work is saved and a rerun resumes")
        sys.exit(130)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        error(f"{e.filename or 'a file'}: {e.strerror}; finished work is kept: free space (or fix the "
                  "permissions) and rerun the same command")
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        error("aborted")
        sys.exit(130)
    except typer.TyperException as e:  # usage errors: bad option, missing argument
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # the help text itself, not an error
        else:
            if ctx is not None:  # the parser's own "Error: ..." line would be a second error prefix
                typer.echo(f"{ctx.get_usage()}\nTry '{ctx.command_path} --help' for help.\n", err=True)
            error(e.format_message())
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(rc if isinstance(rc, int) else 0)
