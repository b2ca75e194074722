"""A user's Perturb-seq screen (.h5ad) to PerturbQA-format triples, with the screen's split-half noise ceiling.

Reads the count matrix in row chunks straight from the HDF5 file (anndata's element readers, never the
whole matrix), calls DE per (perturbation, readout gene) against the control cells (screen_de.py), and
writes ``{line}-de.csv`` / ``{line}-dir.csv`` (columns pert, gene, label, split; dir label 1 = up) plus
``{line}-screen.json``: a folder that works as a ``data.extra_cell_lines`` source.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .ceiling import screen_json_name
from .errors import SynthpertError
from .screen_de import DEFAULT_FDR, TARGET_SUM, Calls, accumulate, check_control, welch_calls, welch_pairs

SPLIT_HALF_BLOCKS = 8  # cells dealt to 8 blocks: halves are 4 blocks each, and 1-4 blocks give the scaling curve


@dataclass
class ScreenOptions:
    perturbation_key: str
    control: str
    cell_line: str
    layer: str | None = None  # None: X holds the raw counts
    gene_symbols: str | None = None  # a var column; None: var_names are the symbols
    min_cells: int = 25
    min_mean_counts: float = 0.1  # readout genes: mean raw UMI per control cell at least this
    genes: list[str] | None = None  # explicit readout genes instead of the expression threshold
    fdr: float = DEFAULT_FDR
    min_lfc: float = 0.0
    test_fraction: float = 0.2
    split_half: bool = False
    seed: int = 0
    chunk_cells: int = 10_000


def require_anndata() -> None:
    try:
        import anndata  # noqa: F401
    except ImportError:
        raise SynthpertError("reading .h5ad screens needs anndata: pip install 'synthpert[screen]'") from None


def _line_key(name: str) -> str:
    key = name.strip().lower()
    if not key or not key.replace("_", "").replace("-", "").isalnum():
        raise SynthpertError(f"invalid --cell-line {name!r}: use letters, digits, '-' or '_' (it names the CSVs)")
    return key


class _Screen:
    """The open file: the perturbation label of each cell, the gene symbols, and a row-chunk reader."""

    def __init__(self, path: Path, opts: ScreenOptions):
        require_anndata()
        import h5py

        if not path.is_file():
            raise SynthpertError(f"no such file: {path}")
        try:
            self.file = h5py.File(path, "r")
        except OSError as e:
            raise SynthpertError(f"{path} is not a readable .h5ad (HDF5) file: {e}") from None
        try:
            self._load(path, opts)
        except BaseException:
            self.file.close()
            raise

    def _load(self, path: Path, opts: ScreenOptions) -> None:
        import h5py
        from anndata.io import read_elem, sparse_dataset

        f = self.file
        for part in ("obs", "var"):
            if part not in f:
                raise SynthpertError(f"{path} has no '{part}' table: is it an AnnData .h5ad file?")
        obs_cols = [c for c in f["obs"].keys() if c != "__categories"]
        if opts.perturbation_key not in obs_cols:
            raise SynthpertError(f"obs has no column {opts.perturbation_key!r} (--perturbation-key); obs columns: "
                                 f"{', '.join(sorted(obs_cols)) or 'none'}")
        import pandas as pd

        # factorize keeps a categorical column as its codes: no per-cell strings for a 2M-cell screen
        codes, uniques = pd.factorize(pd.Series(read_elem(f["obs"][opts.perturbation_key])))
        self.codes, self.names = np.asarray(codes, np.int64), np.asarray(uniques, dtype=object).astype(str)
        if opts.gene_symbols is None:
            self.symbols = np.asarray(read_elem(f["var"][f["var"].attrs["_index"]]), dtype=object).astype(str)
        else:
            var_cols = [c for c in f["var"].keys() if c != "__categories"]
            if opts.gene_symbols not in var_cols:
                raise SynthpertError(f"var has no column {opts.gene_symbols!r} (--gene-symbols); var columns: "
                                     f"{', '.join(sorted(var_cols)) or 'none'}")
            self.symbols = np.asarray(read_elem(f["var"][opts.gene_symbols]), dtype=object).astype(str)
        if opts.layer is None:
            elem, self.where = f.get("X"), "X"
        else:
            layers = f.get("layers")
            if layers is None or opts.layer not in layers:
                have = ", ".join(sorted(layers.keys())) if layers is not None else ""
                raise SynthpertError(f"no layer {opts.layer!r} (--layer); layers: {have or 'none'}")
            elem, self.where = layers[opts.layer], f"layer {opts.layer!r}"
        if elem is None:
            raise SynthpertError(f"{path} has no X matrix")
        if isinstance(elem, h5py.Dataset):
            self._read = lambda a, b: elem[a:b]
            self.shape = elem.shape
        else:
            kind = elem.attrs.get("encoding-type", "")
            if kind == "csc_matrix":
                raise SynthpertError(f"{self.where} is stored column-major (CSC), which cannot be read by cell "
                                     "chunks; rewrite it as CSR (adata.X = adata.X.tocsr(); adata.write_h5ad(...))")
            if kind != "csr_matrix":
                raise SynthpertError(f"{self.where} has an encoding ({kind or 'unknown'}) from-anndata cannot read")
            ds = sparse_dataset(elem)
            self._read = lambda a, b: ds[a:b]
            self.shape = ds.shape
        if self.shape[0] != len(self.codes) or self.shape[1] != len(self.symbols):
            raise SynthpertError(f"{self.where} is {self.shape[0]} x {self.shape[1]} but obs has {len(self.codes)} "
                                 f"cells and var {len(self.symbols)} genes")

    def read(self, start: int, stop: int):
        return self._read(start, stop)


def held_out_perturbations(perts: list[str], fraction: float) -> set[str]:
    """PerturbQA splits each line by perturbation. The test share here is chosen by a hash of the symbol
    (salted, so it is independent of the evidence folds of schema.perturbation_fold), hence stable under
    adding or removing other perturbations' cells."""
    if fraction <= 0 or len(perts) < 2:
        return set()
    ranked = sorted(perts, key=lambda p: hashlib.sha1(f"synthpert-split:{p}".encode()).digest())
    k = min(max(1, round(fraction * len(perts))), len(perts) - 1)
    return set(ranked[:k])


def _calls_for(n, s1, s2, pert_rows, control, gene_cols, exclude, opts) -> Calls:
    return welch_calls(n, s1, s2, pert_rows, control, gene_cols, opts.fdr, opts.min_lfc, exclude)


def _three_class(c: Calls) -> np.ndarray:
    return np.where(~c.de, 0, np.where(c.lfc > 0, 1, 2))


def _ceiling(mom, pert_rows, control, gene_cols, exclude, opts) -> dict:
    """Split-half ceiling at 1..4 blocks per half: how well one half's calls predict the other's."""
    from sklearn.metrics import cohen_kappa_score

    from .metrics import per_gene_auroc

    half = SPLIT_HALF_BLOCKS // 2
    tested = ~exclude
    genes_of_pair = np.broadcast_to(np.arange(exclude.shape[1])[None, :], exclude.shape)[tested]
    curve = []
    for m in range(1, half + 1):
        a_blocks, b_blocks = list(range(m)), list(range(half, half + m))
        na, nb = mom.pooled(a_blocks), mom.pooled(b_blocks)
        ca = _calls_for(*na, pert_rows, control, gene_cols, exclude, opts)
        cb = _calls_for(*nb, pert_rows, control, gene_cols, exclude, opts)
        la, lb = _three_class(ca)[tested], _three_class(cb)[tested]
        de_a, de_b = la > 0, lb > 0
        auc_de, n_de = per_gene_auroc(genes_of_pair, de_b, np.abs(ca.t[tested]))
        auc_dir, n_dir = per_gene_auroc(genes_of_pair[de_b], lb[de_b] == 1, ca.t[tested][de_b])
        union = int((de_a | de_b).sum())
        curve.append({
            "blocks_per_half": m,
            "cells_per_perturbation_per_half": float(np.mean(na[0][pert_rows] + nb[0][pert_rows]) / 2),
            "control_cells_per_half": int((na[0][control] + nb[0][control]) // 2),
            "agreement": float(np.mean(la == lb)),
            "kappa": float(cohen_kappa_score(la, lb)) if len(np.union1d(la, lb)) > 1 else float("nan"),
            "de_jaccard": float((de_a & de_b).sum() / union) if union else float("nan"),
            "de_replication": float((de_a & de_b).sum() / de_a.sum()) if de_a.any() else float("nan"),
            "de_calls": [int(de_a.sum()), int(de_b.sum())],
            "auroc_de_per_gene": auc_de, "auroc_de_genes": n_de,
            "auroc_dir_per_gene": auc_dir, "auroc_dir_genes": n_dir,
        })
    return {
        "method": "cells of every perturbation and of the controls dealt at random to 8 blocks; half A = blocks "
                  "0-3, half B = 4-7, each called against its own controls with the same test; half A's |t| "
                  "scores half B's DE labels (per-gene AUROC, PerturbQA's metric) and A's t scores B's direction "
                  "among B's DE pairs. Each half has half the cells, so the full screen's own ceiling is at or "
                  "above the last point; the curve shows how it grows with cells",
        "ceiling": curve[-1],
        "scaling": curve,
    }


@dataclass
class _Groups:
    """Which cells count: the label of each cell, the control, the perturbations kept and those dropped."""

    names: np.ndarray
    cell_codes: np.ndarray  # label index per cell; -1: no label or a dropped perturbation
    control: int
    perts: list[str]
    too_few: dict[str, int]
    unlabelled: int


def _groups(scr: _Screen, opts: ScreenOptions) -> _Groups:
    names, codes = scr.names, scr.codes
    missing = codes < 0
    counts = np.bincount(codes[~missing], minlength=len(names))
    code_of = {n: i for i, n in enumerate(names)}
    if opts.control not in code_of:
        seen = ", ".join(repr(n) for n in names[:8])
        raise SynthpertError(f"no control cells: obs[{opts.perturbation_key!r}] has no value {opts.control!r} "
                             f"(--control); values include {seen}")
    control = code_of[opts.control]
    check_control(counts, control, opts.control)
    too_few = {n: int(c) for n, c in zip(names, counts) if n != opts.control and c < opts.min_cells}
    perts = [n for n, c in zip(names, counts) if n != opts.control and c >= opts.min_cells]
    if not perts:
        raise SynthpertError(f"no perturbation has at least {opts.min_cells} cells (--min-cells); "
                             f"{len(too_few)} have fewer")
    keep = np.isin(names, [*perts, opts.control])
    cell_codes = np.where(~missing & keep[np.maximum(codes, 0)], codes, -1)
    return _Groups(names, cell_codes, control, perts, too_few, int(missing.sum()))


def _readout_genes(symbols: np.ndarray, mean_control: np.ndarray, opts: ScreenOptions) -> tuple[np.ndarray, dict]:
    """Column indices of the readout genes (first occurrence of a duplicated symbol) and what was dropped."""
    first: dict[str, int] = {}
    for j, s in enumerate(symbols):
        first.setdefault(s, j)
    report = {"genes_duplicated_symbol": len(symbols) - len(first), "readout_genes_not_in_screen": [],
              "genes_below_expression_threshold": 0}
    if opts.genes:
        report["readout_genes_not_in_screen"] = [g for g in opts.genes if g not in first]
        cols = np.array([first[g] for g in dict.fromkeys(opts.genes) if g in first], dtype=np.int64)
        if not len(cols):
            raise SynthpertError(f"none of the {len(opts.genes)} readout genes is in the screen "
                                 f"(e.g. {opts.genes[0]!r})")
        return cols, {**report, "rule": f"the {len(cols)} genes given"}
    cols = np.array([j for j in first.values() if mean_control[j] >= opts.min_mean_counts], dtype=np.int64)
    if not len(cols):
        raise SynthpertError(f"no gene reaches {opts.min_mean_counts} mean UMI per control cell (--min-mean-counts)")
    report["genes_below_expression_threshold"] = len(first) - len(cols)
    return cols, {**report, "rule": f"genes with mean >= {opts.min_mean_counts} raw UMI per control cell"}


TEST_DESCRIPTION = {
    "name": "Welch's t-test (scipy.stats.ttest_ind_from_stats) per perturbation and readout gene against the "
            "control cells, on log1p(counts / cell total x 1e4)",
    "normalisation_target_sum": TARGET_SUM,
    "multiple_testing": "Benjamini-Hochberg (scipy.stats.false_discovery_control) over every tested pair of "
                        "the screen",
    "direction": "sign of the difference in mean log1p-normalised expression",
}


def from_anndata(path: str | Path, out: str | Path, opts: ScreenOptions) -> dict:
    """Call DE on the screen and write the line's CSVs and summary into ``out``; returns the summary."""
    path, out = Path(path).expanduser(), Path(out).expanduser()
    key = _line_key(opts.cell_line)
    if not 0 <= opts.test_fraction < 1:
        raise SynthpertError(f"--test-fraction must be in [0, 1), got {opts.test_fraction}")
    scr = _Screen(path, opts)
    try:
        g = _groups(scr, opts)
        mom = accumulate(scr.read, scr.shape[0], scr.shape[1], g.cell_codes, len(g.names), g.control,
                         blocks=SPLIT_HALF_BLOCKS if opts.split_half else 1, seed=opts.seed,
                         chunk_cells=opts.chunk_cells, where=scr.where)
    finally:
        scr.file.close()
    n_control = int(mom.n[g.control].sum())
    gene_cols, genes_report = _readout_genes(scr.symbols, mom.control_counts / n_control, opts)
    gene_names = scr.symbols[gene_cols]
    pert_rows = np.flatnonzero(np.isin(g.names, g.perts))  # g.perts is in names order
    # The knocked-down gene itself is the guide's own target, not a downstream effect (PerturbQA has no
    # such pair): left out of the triples and of the BH family, and reported as knockdown efficiency.
    exclude = np.asarray(g.perts, dtype=object)[:, None] == gene_names[None, :].astype(object)
    calls = _calls_for(*mom.pooled(), pert_rows, g.control, gene_cols, exclude, opts)
    test = held_out_perturbations(g.perts, opts.test_fraction)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "input": str(path), "cell_line": key, "options": asdict(opts),
        "cells": {"total": int(scr.shape[0]), "control": n_control,
                  "per_perturbation": {p: int(mom.n[r].sum()) for p, r in zip(g.perts, pert_rows)}},
        "test": {**TEST_DESCRIPTION, "fdr": opts.fdr, "min_abs_lfc": opts.min_lfc},
        "readout_genes": {"rule": genes_report.pop("rule"), "n": len(gene_cols)},
        "perturbations": {"n": len(g.perts), "test": sorted(test), "n_test": len(test)},
        "de": _write_csvs(out, key, g.perts, gene_names, calls, exclude, test),
        "knockdown": _knockdown(g.perts, gene_names, opts, mom, pert_rows, g.control, gene_cols),
        "dropped": {"perturbations_below_min_cells": g.too_few, "cells_without_label": g.unlabelled,
                    "cells_of_dropped_perturbations": int(sum(g.too_few.values())), **genes_report,
                    "target_gene_pairs": int(exclude.sum())},
    }
    if opts.split_half:
        summary["split_half"] = _ceiling(mom, pert_rows, g.control, gene_cols, exclude, opts)
    (out / screen_json_name(key)).write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _knockdown(perts, gene_names, opts, mom, pert_rows, control, gene_cols) -> dict:
    """How many perturbations' own target (when measured) is called down (BH over these pairs): the screen's
    on-target check."""
    from scipy.stats import false_discovery_control

    col = {g: i for i, g in enumerate(gene_names)}
    measured = [i for i, p in enumerate(perts) if p in col]
    if not measured:
        return {"measured": 0, "note": "no perturbation label is a readout gene symbol"}
    own = gene_cols[[col[perts[i]] for i in measured]]
    _, p, lfc = welch_pairs(*mom.pooled(), pert_rows[measured], own, control)
    down = (false_discovery_control(p, method="bh") < opts.fdr) & (lfc < 0)
    return {"measured": len(measured), "called_down": int(down.sum()), "median_lfc": float(np.median(lfc))}


def _write_csvs(out: Path, key: str, perts, gene_names, calls: Calls, exclude, test: set[str],
                block: int = 256) -> dict:
    """Both CSVs, written a block of perturbations at a time (a genome-wide screen has ~80M pairs)."""
    import pandas as pd

    from .dataset import csv_name

    genes = np.asarray(gene_names, dtype=object)
    totals = {"pairs": 0, "de": 0, "up": 0, "down": 0}
    by_split = {s: {"pairs": 0, "de": 0} for s in ("train", "test")}
    paths = out / csv_name(key, "de"), out / csv_name(key, "dir")
    for i in range(0, len(perts), block):
        pi, gi = np.nonzero(~exclude[i:i + block])
        pert = np.asarray(perts[i:i + block], dtype=object)[pi]
        split = np.where(np.isin(pert, list(test)), "test", "train")
        de = calls.de[i:i + block][pi, gi]
        up = calls.lfc[i:i + block][pi, gi] > 0
        frame = pd.DataFrame({"pert": pert, "gene": genes[gi], "label": de.astype(int), "split": split})
        first = i == 0
        frame.to_csv(paths[0], index=False, header=first, mode="w" if first else "a")
        frame[de].assign(label=up[de].astype(int)).to_csv(paths[1], index=False, header=first,
                                                          mode="w" if first else "a")
        for k, v in (("pairs", len(frame)), ("de", de.sum()), ("up", (de & up).sum()), ("down", (de & ~up).sum())):
            totals[k] += int(v)
        for sp in by_split:
            by_split[sp]["pairs"] += int((split == sp).sum())
            by_split[sp]["de"] += int(de[split == sp].sum())
    return {**totals, "de_rate": totals["de"] / totals["pairs"] if totals["pairs"] else 0.0, "by_split": by_split}
