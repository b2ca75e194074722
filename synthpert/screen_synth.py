"""A synthetic Perturb-seq screen with planted effects, written to .h5ad chunk by chunk (tests, docs, benchmark).

Counts are negative binomial around a per-gene baseline; each perturbation knocks down its own target gene
and changes a known set of other genes by a stated factor up or down. The truth is returned (and can be
saved beside the file) so DE calls can be scored against it. Writing appends CSR row chunks, so a screen of
any size is generated without its whole matrix in memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import SynthpertError


@dataclass
class ScreenSpec:
    perturbations: int = 20
    genes: int = 400
    cells_per_perturbation: int = 150
    control_cells: int = 1200
    up_per_perturbation: int = 10
    down_per_perturbation: int = 10
    up_factor: float = 2.5
    down_factor: float = 0.3
    knockdown_factor: float = 0.1  # CRISPRi leaves ~10% of the target's mRNA
    dispersion: float = 0.2  # NB variance = mu + dispersion * mu^2
    baseline_log_mean: float = float(np.log(1.0))  # gene baselines ~ lognormal (UMI per cell)
    baseline_log_sd: float = 1.2
    effect_min_mean: float = 1.0  # planted effects (and targets) go to genes with at least this baseline
    size_factor_sd: float = 0.25  # per-cell library size, lognormal
    control_label: str = "non-targeting"
    seed: int = 0


@dataclass
class ScreenTruth:
    genes: list[str]
    perturbations: list[str]  # each is the symbol of its target gene
    up: dict[str, list[str]]
    down: dict[str, list[str]]
    baseline: list[float]

    def label(self, pert: str, gene: str) -> str:
        """'up', 'down' or 'none' (the knocked-down target itself is 'down')."""
        if gene in self.up.get(pert, ()):
            return "up"
        if gene == pert or gene in self.down.get(pert, ()):
            return "down"
        return "none"


def _plan(spec: ScreenSpec, rng: np.random.Generator) -> tuple[ScreenTruth, np.ndarray]:
    """Baselines, targets and planted effects; returns the truth and a (perturbations + 1, genes) factor matrix
    whose last row (the controls) is all ones."""
    genes = [f"GENE{i:05d}" for i in range(spec.genes)]
    base = np.exp(rng.normal(spec.baseline_log_mean, spec.baseline_log_sd, spec.genes))
    strong = np.flatnonzero(base >= spec.effect_min_mean)
    need = spec.perturbations + spec.up_per_perturbation + spec.down_per_perturbation
    if len(strong) < need:
        raise SynthpertError(f"only {len(strong)} genes have a baseline >= {spec.effect_min_mean} UMI; a screen "
                             f"with these effects needs {need}: add genes or raise baseline_log_mean")
    targets = rng.choice(strong, spec.perturbations, replace=False)
    factors = np.ones((spec.perturbations + 1, spec.genes))
    up, down = {}, {}
    for i, t in enumerate(targets):
        others = rng.permutation(strong[strong != t])
        u = others[:spec.up_per_perturbation]
        d = others[spec.up_per_perturbation:spec.up_per_perturbation + spec.down_per_perturbation]
        factors[i, u], factors[i, d], factors[i, t] = spec.up_factor, spec.down_factor, spec.knockdown_factor
        up[genes[t]], down[genes[t]] = [genes[j] for j in u], [genes[j] for j in d]
    truth = ScreenTruth(genes, [genes[t] for t in targets], up, down, base.tolist())
    return truth, factors * base[None, :]


def write_synthetic_screen(path: str | Path, spec: ScreenSpec | None = None, chunk_cells: int = 2000,
                           truth_json: bool = True) -> ScreenTruth:
    """Write the screen to ``path`` (.h5ad: raw counts in X as CSR, the target in obs['perturbation'], gene
    symbols in var['gene_symbol'] and as var_names); with ``truth_json`` also ``path``.truth.json."""
    from .screen import require_anndata

    require_anndata()
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    spec = spec or ScreenSpec()
    rng = np.random.default_rng(spec.seed)
    truth, mu = _plan(spec, rng)
    labels = np.repeat(np.arange(spec.perturbations + 1),
                       [spec.cells_per_perturbation] * spec.perturbations + [spec.control_cells])
    labels = rng.permutation(labels)  # cells arrive in random order, as from a sequencer
    names = np.array([*truth.perturbations, spec.control_label], dtype=object)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    r = 1.0 / spec.dispersion
    with h5py.File(path, "w") as f:
        for start in range(0, len(labels), chunk_cells):
            lab = labels[start:start + chunk_cells]
            m = mu[lab] * np.exp(rng.normal(0, spec.size_factor_sd, len(lab)))[:, None]
            counts = rng.negative_binomial(r, r / (r + m)).astype(np.float32)
            block = sp.csr_matrix(counts)
            if start == 0:
                write_elem(f, "X", block)
            else:
                sparse_dataset(f["X"]).append(block)
        obs = pd.DataFrame({"perturbation": pd.Categorical(names[labels])},
                           index=[f"cell{i}" for i in range(len(labels))])
        var = pd.DataFrame({"gene_symbol": truth.genes}, index=truth.genes)
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
    if truth_json:
        Path(str(path) + ".truth.json").write_text(json.dumps({"spec": asdict(spec), **asdict(truth)}))
    return truth
