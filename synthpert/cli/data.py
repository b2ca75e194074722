"""`synthpert data fetch`, `synthpert data build` and `synthpert baselines` (a table or JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..answer import DISPLAY, SHORT_KEYS
from ..metric_table import PER_CLASS, class_f1s, headers, metrics, scalar_keys
from ..config import load_section
from ..config.data import DataConfig

data_app = typer.Typer(help="Fetch PerturbQA, turn your own screen (.h5ad) into triples, build three-class examples.",
                       no_args_is_help=True)



def data_fetch(
    dest: Path | None = typer.Option(None, "--dest", help="Target folder (default: $SYNTHPERT_DATA or "
                                        "~/.cache/synthpert/perturbqa)."),
    from_dir: Path | None = typer.Option(None, "--from", help="Copy from a local folder instead of downloading."),
) -> None:
    """Download PerturbQA's CSVs (CC BY 4.0) and verify their size and SHA-256."""
    from ..fetch import fetch

    out = fetch(dest, from_dir, log=typer.echo)
    typer.echo(f"PerturbQA CSVs ready in {out}")


def _data_config(config: Path | None, overrides: list[str], **flags) -> DataConfig:
    """Data settings from an optional YAML (its `data:` section or the whole file) + CLI flags + overrides.
    Cell lists given as flags are checked once the config's own cell lines are registered."""
    from ..cells import parse_cell_list
    from ..dataset import register_extra_lines

    lists = {k: flags.pop(k) for k in ("train_cells", "test_cells") if flags.get(k) is not None}
    raw_lists = {k: [c.strip().lower() for c in v.split(",") if c.strip()] for k, v in lists.items()}
    cfg = load_section(DataConfig, "data", config, overrides, {**flags, **raw_lists})
    register_extra_lines(cfg)  # a user's own lines may be named on the command line
    return cfg.model_copy(update={k: parse_cell_list(v) for k, v in lists.items()})


def data_build(
    out: Path = typer.Option(..., "--out", help="Folder to write dataset/ and summary.json into."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with data settings."),
    source: str | None = typer.Option(None, "--source", help="Folder with PerturbQA CSVs."),
    train_cells: str | None = typer.Option(None, "--train-cells", help="Comma-separated, e.g. k562,hepg2."),
    test_cells: str | None = typer.Option(None, "--test-cells", help="Comma-separated, e.g. rpe1."),
    protocol: str | None = typer.Option(None, "--protocol", help="'split' (default) or 'published'."),
    seed: int | None = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print the full summary as JSON instead of a few lines."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train_subsample.n=1500"),
) -> None:
    """Build train / validation / test examples from the CSVs and save them as a datasets.DatasetDict."""
    from ..data import build

    cfg = _data_config(config, overrides, source=source, train_cells=train_cells, test_cells=test_cells,
                       protocol=protocol, seed=seed)
    _, summary = build(cfg, out)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{summary['setting']}: train {', '.join(summary['train_cells'])} → test "
               f"{', '.join(summary['test_cells'])} ({summary['protocol']} protocol, seed {summary['seed']})")
    for name, split in summary["splits"].items():
        by = ", ".join(f"{DISPLAY.get(k, k)} {v:,}" for k, v in split.get("by_class", {}).items())
        typer.echo(f"{name}: {split['n']:,} triples, {split.get('perturbations', 0):,} perturbations ({by})")
    typer.echo(f"written: {out / 'dataset'} (details: {out / 'summary.json'})")


def baselines_cmd(
    source: str | None = typer.Option(None, "--source", help="Folder with PerturbQA CSVs."),
    train_cells: str | None = typer.Option(None, "--train-cells", help="Comma-separated training lines "
                                           "(default: the config's, else k562)."),
    test_cells: str | None = typer.Option(None, "--test-cells", help="Comma-separated test lines (default: the "
                                          "config's, else k562)."),
    protocol: str | None = typer.Option(None, "--protocol", help="'split' (default) or 'published'."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with data settings (optional)."),
    bootstrap: int = typer.Option(0, "--bootstrap", help="Bootstrap resamples of perturbations for CIs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Score the model-free baselines (majority, per-gene prior, cross-cell transfer) on a test split."""
    from ..data import run_baselines

    cfg = _data_config(config, [], source=source, train_cells=train_cells, test_cells=test_cells,
                       protocol=protocol)
    result = run_baselines(cfg, n_bootstrap=bootstrap)
    if as_json:
        typer.echo(json.dumps(result, indent=None, default=float))
    else:
        baseline_table(result, bootstrap)


def metrics_rows(results: dict[str, dict], stratum: str = "overall"):
    """One row per predictor (a DataFrame); ``results`` maps name -> flat metrics (with optional 'strata')."""
    import pandas as pd

    keys = scalar_keys("cli")
    rows = []
    for name, m in results.items():
        if "unavailable" in m:
            rows.append({"predictor": name, **{k: None for k in keys}, "note": m["unavailable"]})
            continue
        src = m if stratum == "overall" else m.get("strata", {}).get(stratum)
        if src is None:
            continue
        rows.append({"predictor": name, "n": src["n"], **{k: src.get(k) for k in keys},
                     **{f"f1_{c}": f1 for c, f1 in zip(SHORT_KEYS, class_f1s(src))},
                     **{f"{k}_ci": (src.get("ci") or {}).get(k) for k in keys}, "note": ""})
    return pd.DataFrame(rows)


def _interval(ci):
    """A row's (low, high), or None: pandas fills a missing interval with NaN, which is not one."""
    return ci if isinstance(ci, (list, tuple)) and len(ci) == 2 else None


def baseline_table(result: dict, n_bootstrap: int = 0) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..report import fmt

    with_ci = any("ci" in m for m in result["baselines"].values())
    console = Console(width=max(Console().width, 170 if with_ci else 120))
    console.print(f"[bold]{result['setting']}[/]: train {','.join(result['train_cells'])} → test "
                  f"{','.join(result['test_cells'])}; n={result['n']:,} test pairs "
                  f"({result['n_pert_seen_in_train_lines']:,} with the perturbation seen in another training line)")
    strata = ["overall"] + (["seen", "unseen"] if result["n_pert_seen_in_train_lines"] else [])
    for stratum in strata:
        df = metrics_rows(result["baselines"], stratum)
        table = Table(title=f"baselines — {stratum}", show_lines=False)
        table.add_column("predictor", no_wrap=True)
        shown = metrics("cli")  # the metric table's command-line columns, in its order
        for col in ["n", *(h for m in shown for h in headers(m, "cli"))]:
            table.add_column(col, justify="right", no_wrap=True)
        for _, r in df.iterrows():
            if r.get("note"):
                table.add_row(r["predictor"], "", *["—"] * (len(table.columns) - 2))
                continue
            cells = []
            for m in shown:
                if m.key == PER_CLASS:
                    cells += [fmt(r[f"f1_{c}"]) for c in SHORT_KEYS]
                else:
                    cells.append(fmt(r[m.key], _interval(r.get(f"{m.key}_ci")) if m.interval else None))
            table.add_row(r["predictor"], f"{int(r['n']):,}", *cells)
        console.print(table)
    if with_ci:
        console.print(f"[dim]Brackets: 95% bootstrap intervals ({n_bootstrap} resamples "
                      "of the test perturbations).[/]")
    notes = [f"{k}: {v['unavailable']}" for k, v in result["baselines"].items() if "unavailable" in v]
    for n in dict.fromkeys(notes):
        console.print(f"[dim]{n}[/]")
    console.print("[dim]Per-gene AUROC of the gene priors is 0.5 by construction (one score per gene).[/]")
    if result.get("noise_ceiling"):
        from ..ceiling import ceiling_lines

        console.print("\n".join(ceiling_lines(result["noise_ceiling"], result["baselines"])), markup=False)


def register(app: typer.Typer) -> None:
    data_app.command("fetch")(data_fetch)
    data_app.command("build")(data_build)
    from .screen import register as register_screen

    register_screen(data_app)
    app.add_typer(data_app, name="data")
    app.command("baselines")(baselines_cmd)
