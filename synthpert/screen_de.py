"""Streaming differential expression for a Perturb-seq screen: per-group moments in one pass, then Welch + BH.

Why moments: a genome-wide screen (~2M cells x 8k genes) does not fit in memory, but Welch's t-test needs
only each group's cell count, mean and variance. One pass over row chunks accumulates, per group and gene,
the sum and the sum of squares of log-normalised expression (each cell scaled to ``TARGET_SUM`` counts,
then log1p, as scanpy's ``normalize_total`` + ``log1p``). Memory is O(groups x genes), whatever the number
of cells. The statistics themselves are scipy's (``ttest_ind_from_stats``, ``false_discovery_control``).

A group is (label, block): each cell is dealt at random to one of ``blocks`` blocks, so that the split-half
ceiling (screen.py) can call DE on half the blocks against the other half from the same single pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SynthpertError

TARGET_SUM = 1e4  # counts per cell after library-size normalisation (scanpy's customary value)
DEFAULT_FDR = 0.05
CHUNK_CELLS = 10_000


@dataclass
class Moments:
    """Per (label, block) and gene: number of cells, sum and sum of squares of log-normalised expression."""

    n: np.ndarray  # (labels, blocks)
    s1: np.ndarray  # (labels, blocks, genes)
    s2: np.ndarray  # (labels, blocks, genes)
    control_counts: np.ndarray  # (genes,) raw counts summed over the control cells
    n_cells_read: int = 0

    def pooled(self, blocks: slice | list[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, s1, s2) of each label over the chosen blocks (default: all)."""
        sel = slice(None) if blocks is None else blocks
        return self.n[:, sel].sum(1), self.s1[:, sel].sum(1), self.s2[:, sel].sum(1)


def _check_counts(values: np.ndarray, first_row: int, where: str) -> None:
    bad = (values < 0) | (values != np.floor(values))
    if bad.any():
        v = values[np.flatnonzero(bad)[0]]
        raise SynthpertError(f"{where} holds non-integer or negative values (e.g. {v!r} near cell {first_row}): "
                             "from-anndata normalises raw counts itself; pass --layer with the raw-count layer")


def _log_normalised(chunk, first_row: int, where: str):
    """The chunk's cells scaled to TARGET_SUM counts and log1p-transformed (sparse stays sparse), and the
    raw chunk as float (for the control count sums)."""
    import scipy.sparse as sp

    if sp.issparse(chunk):
        chunk = sp.csr_matrix(chunk, dtype=np.float64)
        _check_counts(chunk.data, first_row, where)
        lib = np.asarray(chunk.sum(axis=1)).ravel()
        scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
        y = chunk.copy()
        y.data = np.log1p(y.data * np.repeat(scale, np.diff(y.indptr)))
        return y, chunk
    chunk = np.asarray(chunk, dtype=np.float64)
    _check_counts(chunk.ravel(), first_row, where)
    lib = chunk.sum(axis=1)
    scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(chunk * scale[:, None]), chunk


def _add_by_group(acc: np.ndarray, codes: np.ndarray, values) -> None:
    """acc[code] += the rows of ``values`` with that code, without a dense (groups x genes) temporary per
    chunk when ``values`` is sparse (a genome-wide screen has ~10k groups)."""
    import scipy.sparse as sp

    uniq, inv = np.unique(codes, return_inverse=True)
    ind = sp.csr_matrix((np.ones(len(codes)), (inv, np.arange(len(codes)))), shape=(len(uniq), len(codes)))
    summed = ind @ values
    if sp.issparse(summed):
        coo = summed.tocoo()
        acc[uniq[coo.row], coo.col] += coo.data  # (row, col) pairs are unique in a summed sparse product
    else:
        acc[uniq] += summed


def accumulate(read_rows, n_cells: int, n_genes: int, label_codes: np.ndarray, n_labels: int, control: int,
               blocks: int = 1, seed: int = 0, chunk_cells: int = CHUNK_CELLS, where: str = "X") -> Moments:
    """One pass over the matrix: ``read_rows(start, stop)`` returns those cells' raw counts (dense or sparse).
    ``label_codes`` gives each cell's label index (-1: skip the cell)."""
    rng = np.random.default_rng(seed)
    block_of = rng.integers(0, blocks, size=n_cells) if blocks > 1 else np.zeros(n_cells, np.int64)
    flat = np.where(label_codes >= 0, label_codes * blocks + block_of, -1)
    n = np.bincount(flat[flat >= 0], minlength=n_labels * blocks).astype(np.int64)
    s1 = np.zeros((n_labels * blocks, n_genes))
    s2 = np.zeros((n_labels * blocks, n_genes))
    control_counts = np.zeros(n_genes)
    for start in range(0, n_cells, chunk_cells):
        stop = min(start + chunk_cells, n_cells)
        keep = np.flatnonzero(flat[start:stop] >= 0)
        if not len(keep):
            continue
        y, raw = _log_normalised(read_rows(start, stop), start, where)
        y, raw, codes = y[keep], raw[keep], flat[start:stop][keep]
        _add_by_group(s1, codes, y)
        _add_by_group(s2, codes, y.multiply(y) if hasattr(y, "multiply") else y * y)
        is_control = codes // blocks == control
        if is_control.any():
            control_counts += np.asarray(raw[is_control].sum(axis=0)).ravel()
    return Moments(n.reshape(n_labels, blocks), s1.reshape(n_labels, blocks, n_genes),
                   s2.reshape(n_labels, blocks, n_genes), control_counts, n_cells)


@dataclass
class Calls:
    """Welch's test of every (perturbation, readout gene) against the controls."""

    t: np.ndarray  # (perturbations, genes), float32; 0 where both groups are constant
    lfc: np.ndarray  # difference of mean log1p-normalised expression (natural log), float32: the direction
    de: np.ndarray  # bool: BH-adjusted p below the FDR (over every tested pair of the screen) and |lfc| enough


def welch_pairs(n: np.ndarray, s1: np.ndarray, s2: np.ndarray, rows, cols, control: int):
    """Welch's t, p and mean difference for (row, col) index arrays that broadcast together, against the
    control row, from pooled moments."""
    from scipy.stats import ttest_ind_from_stats

    def mean_sd(r, c):
        k = n[r].astype(float)
        m = s1[r, c] / k
        var = (s2[r, c] - k * m * m) / np.maximum(k - 1, 1)
        return m, np.sqrt(np.clip(var, 0, None)), k

    mp, sdp, kp = mean_sd(rows, cols)
    mc, sdc, kc = mean_sd(control, cols)
    with np.errstate(divide="ignore", invalid="ignore"):
        t, p = ttest_ind_from_stats(mp, sdp, kp, mc, sdc, kc, equal_var=False)
    # Both groups constant (a gene never detected in either): no evidence of a difference.
    return np.nan_to_num(t, nan=0.0), np.nan_to_num(p, nan=1.0), mp - mc


def welch_calls(n: np.ndarray, s1: np.ndarray, s2: np.ndarray, perts: np.ndarray, control: int,
                genes: np.ndarray, fdr: float = DEFAULT_FDR, min_lfc: float = 0.0,
                exclude: np.ndarray | None = None, block: int = 256) -> Calls:
    """Call DE for the rows ``perts`` of pooled moments against row ``control``, on the columns ``genes``.
    ``exclude`` (perturbations x genes, bool) marks pairs left out of the test and of the BH family. Tests
    run in blocks of perturbations so that only the outputs (~18 bytes a pair) scale with the screen."""
    from scipy.stats import false_discovery_control

    shape = (len(perts), len(genes))
    t, lfc, p = np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape)
    for i in range(0, len(perts), block):
        rows = np.asarray(perts[i:i + block])[:, None]
        t[i:i + block], p[i:i + block], lfc[i:i + block] = welch_pairs(n, s1, s2, rows, genes[None, :], control)
    tested = np.ones(shape, bool) if exclude is None else ~exclude
    de = np.zeros(shape, bool)
    if tested.any():
        de[tested] = false_discovery_control(p[tested], method="bh") < fdr
    del p
    de &= np.abs(lfc) >= min_lfc
    return Calls(t=t, lfc=lfc, de=de)


def check_control(n: np.ndarray, control: int, label: str) -> None:
    if n[control] < 2:
        raise SynthpertError(f"the control label {label!r} has {int(n[control])} cell(s); Welch's test needs at "
                             "least 2 control cells")
