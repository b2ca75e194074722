"""`synthpert data from-anndata` (a Perturb-seq .h5ad to PerturbQA-format triples) and `synthpert data
synth-screen` (a synthetic screen with planted effects, for trying it out)."""

from __future__ import annotations

from pathlib import Path

import typer


def from_anndata_cmd(
    h5ad: Path = typer.Argument(..., help="AnnData file: cells x genes raw counts, one perturbation label per cell."),
    perturbation_key: str = typer.Option(..., "--perturbation-key", help="obs column with each cell's knocked-down "
                                         "gene (the label of its guide's target)."),
    control: str = typer.Option(..., "--control", help="The label of control cells in that column, e.g. "
                                "non-targeting."),
    cell_line: str = typer.Option(..., "--cell-line", help="Key of the line: names the CSVs ({key}-de.csv) and the "
                                  "data.extra_cell_lines entry."),
    out: Path = typer.Option(..., "--out", help="Folder to write the CSVs and {key}-screen.json into."),
    layer: str | None = typer.Option(None, "--layer", help="Layer holding raw counts (default: X)."),
    gene_symbols: str | None = typer.Option(None, "--gene-symbols", help="var column with gene symbols (default: "
                                            "var_names)."),
    min_cells: int = typer.Option(25, "--min-cells", min=2, help="Drop perturbations with fewer cells."),
    min_mean_counts: float = typer.Option(0.1, "--min-mean-counts", min=0,
                                          help="Readout genes: mean raw UMI per control cell at least this."),
    genes_file: Path | None = typer.Option(None, "--genes", help="Text file, one readout gene symbol a line "
                                           "(instead of the expression threshold)."),
    fdr: float = typer.Option(0.05, "--fdr", min=0, max=1, help="Benjamini-Hochberg false-discovery rate."),
    min_lfc: float = typer.Option(0.0, "--min-lfc", min=0, help="Also require |difference of mean log1p "
                                  "expression| at least this to call DE."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of perturbations in the test split."),
    split_half: bool = typer.Option(False, "--split-half", help="Also compute the split-half noise ceiling."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split-half draw."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Call DE on a Perturb-seq screen (streamed from the .h5ad in cell chunks) and write PerturbQA-format CSVs."""
    import json

    from ..errors import SynthpertError
    from ..screen import ScreenOptions, from_anndata

    genes = None
    if genes_file is not None:
        if not genes_file.is_file():
            raise SynthpertError(f"no such file: {genes_file} (--genes)")
        genes = [g.strip() for g in genes_file.read_text().splitlines() if g.strip()]
    opts = ScreenOptions(perturbation_key, control, cell_line, layer=layer, gene_symbols=gene_symbols,
                         min_cells=min_cells, min_mean_counts=min_mean_counts, genes=genes, fdr=fdr, min_lfc=min_lfc,
                         test_fraction=test_fraction, split_half=split_half, seed=seed)
    s = from_anndata(h5ad, out, opts)
    if as_json:
        typer.echo(json.dumps(s, indent=2, default=float))
        return
    de, key = s["de"], s["cell_line"]
    typer.echo(f"{key}: {s['perturbations']['n']:,} perturbations ({s['perturbations']['n_test']:,} test) x "
               f"{s['readout_genes']['n']:,} readout genes; {s['cells']['control']:,} control cells")
    typer.echo(f"DE at FDR {s['test']['fdr']}: {de['de']:,} of {de['pairs']:,} pairs ({de['up']:,} up, "
               f"{de['down']:,} down)")
    kd = s["knockdown"]
    if kd.get("measured"):
        typer.echo(f"on-target knockdown called in {kd['called_down']:,} of {kd['measured']:,} perturbations "
                   "whose target is measured")
    dropped = s["dropped"]["perturbations_below_min_cells"]
    if dropped:
        typer.echo(f"dropped {len(dropped):,} perturbations with fewer than {min_cells} cells")
    if "split_half" in s:
        c = s["split_half"]["ceiling"]
        typer.echo(f"split-half ceiling (~{c['cells_per_perturbation_per_half']:.0f} cells per perturbation per "
                   f"half): agreement {c['agreement']:.3f}, per-gene AUROC DE {c['auroc_de_per_gene']:.3f}, "
                   f"direction {c['auroc_dir_per_gene']:.3f}")
    typer.echo(f"written: {out / (key + '-de.csv')}, {out / (key + '-dir.csv')} (details: "
               f"{out / (key + '-screen.json')})")
    typer.echo(f"use it: data.extra_cell_lines.{key}: {{description: '...', source: {out}}} (alone: also "
               f"data.source: {out}); docs/screens.md has a run config")


def synth_screen_cmd(
    out: Path = typer.Argument(..., help="The .h5ad file to write (a .truth.json with the planted effects beside it)."),
    perturbations: int = typer.Option(20, "--perturbations"),
    genes: int = typer.Option(400, "--genes"),
    cells_per_perturbation: int = typer.Option(150, "--cells-per-perturbation"),
    control_cells: int = typer.Option(1200, "--control-cells"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a synthetic Perturb-seq screen with planted up (2.5x) and down (0.3x) effects, negative-binomial noise."""
    from ..screen_synth import ScreenSpec, write_synthetic_screen

    spec = ScreenSpec(perturbations=perturbations, genes=genes, cells_per_perturbation=cells_per_perturbation,
                      control_cells=control_cells, seed=seed)
    write_synthetic_screen(out, spec)
    n = perturbations * cells_per_perturbation + control_cells
    typer.echo(f"written: {out} ({n:,} cells x {genes:,} genes; obs['perturbation'], control "
               f"'{spec.control_label}'; planted effects in {out}.truth.json)")


def register(data_app: typer.Typer) -> None:
    data_app.command("from-anndata")(from_anndata_cmd)
    data_app.command("synth-screen")(synth_screen_cmd)
