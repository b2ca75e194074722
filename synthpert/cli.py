"""The `synthpert` command line. Heavy libraries (torch, transformers, trl, vllm) are imported only inside
the commands that need them, so `synthpert --help` stays fast.

Each pipeline stage registers its commands from its own ``cli_<stage>.py`` module.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import typer

from .errors import SynthpertError

app = typer.Typer(
    name="synthpert",
    help="Distil frontier-model reasoning about genetic perturbations into small language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Fetch PerturbQA and build three-class examples.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# Stage modules that add their own commands; each defines `register(app)`.
STAGE_CLI_MODULES = ("cli_generate", "cli_train", "cli_evaluate", "cli_pipeline")


def _echo_err(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        from . import __version__

        typer.echo(__version__)
        raise typer.Exit()


@data_app.command("fetch")
def data_fetch(
    dest: Path | None = typer.Option(None, "--dest", help="Target folder (default: $SYNTHPERT_DATA or "
                                        "~/.cache/synthpert/perturbqa)."),
    from_dir: Path | None = typer.Option(None, "--from", help="Copy from a local folder instead of downloading."),
) -> None:
    """Download PerturbQA's CSVs (CC BY 4.0) and verify their size and SHA-256."""
    from .data import fetch

    out = fetch(dest, from_dir)
    typer.echo(f"PerturbQA CSVs ready in {out}")


def _data_config(config: Optional[Path], overrides: list[str], **cli) -> "DataConfig":  # noqa: F821
    """Data settings from an optional YAML (its `data:` section or the whole file) + CLI flags + overrides."""
    from .cells import parse_cell_list, register_cell_line
    from .config import DataConfig, load_section, read_yaml

    raw = read_yaml(config) if config else {}
    for k, extra in (raw.get("data", raw) or {}).get("extra_cell_lines", {}).items():
        register_cell_line(k, extra.get("name"), extra.get("description", ""))  # user lines named on the CLI
    for key in ("train_cells", "test_cells"):
        if cli.get(key) is not None:
            cli[key] = parse_cell_list(cli[key])
    return load_section(DataConfig, "data", config, overrides, cli)


@data_app.command("build")
def data_build(
    out: Path = typer.Option(..., "--out", help="Folder to write dataset/ and summary.json into."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with data settings."),
    source: str | None = typer.Option(None, "--source", help="Folder with PerturbQA CSVs."),
    train_cells: str | None = typer.Option(None, "--train-cells", help="Comma-separated, e.g. k562,hepg2."),
    test_cells: str | None = typer.Option(None, "--test-cells", help="Comma-separated, e.g. rpe1."),
    protocol: str | None = typer.Option(None, "--protocol", help="'split' (default) or 'published'."),
    seed: int | None = typer.Option(None, "--seed"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train_subsample.n=1500"),
) -> None:
    """Build train / validation / test examples from the CSVs and save them as a datasets.DatasetDict."""
    from .data import build

    cfg = _data_config(config, overrides, source=source, train_cells=train_cells, test_cells=test_cells,
                       protocol=protocol, seed=seed)
    _, summary = build(cfg, out)
    typer.echo(json.dumps(summary, indent=2))


@app.command("baselines")
def baselines_cmd(
    source: str | None = typer.Option(None, "--source", help="Folder with PerturbQA CSVs."),
    train_cells: str = typer.Option("k562", "--train-cells", help="Comma-separated training lines."),
    test_cells: str = typer.Option("k562", "--test-cells", help="Comma-separated test lines."),
    protocol: str = typer.Option("split", "--protocol", help="'split' (default) or 'published'."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with data settings (optional)."),
    bootstrap: int = typer.Option(0, "--bootstrap", help="Bootstrap resamples of perturbations for CIs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Score the model-free baselines (majority, per-gene prior, cross-cell transfer) on a test split."""
    from .report import baseline_table, run_baselines

    cfg = _data_config(config, [], source=source, train_cells=train_cells, test_cells=test_cells,
                       protocol=protocol)
    result = run_baselines(cfg, n_bootstrap=bootstrap)
    if as_json:
        typer.echo(json.dumps(result, indent=None, default=float))
    else:
        baseline_table(result)


def _register_stages() -> None:
    for name in STAGE_CLI_MODULES:
        importlib.import_module(f"synthpert.{name}").register(app)


_register_stages()


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except SynthpertError as e:
        _echo_err(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        _echo_err("interrupted; finished work is saved and a rerun resumes")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _echo_err("aborted")
        sys.exit(130)
    except typer.TyperException as e:  # usage errors: bad option, missing argument
        show = getattr(e, "show", None)
        if show is None:
            raise
        show()
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
