"""Observed evidence from the TRAINING split only (counts, their per-process cache, the prompt text): shared
by the baselines, the evidence teacher and the evidence context in teacher and student prompts.

Leakage rule (science.md, trap 6): a training example's evidence is computed with its whole perturbation
left out of its own cell line's counts, so training prompts look exactly like test prompts (where the
test perturbation is, by PerturbQA's split, absent from that line's training data). Other training lines
keep the perturbation: at test time those lines' data about it is legitimately available.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .answer import LABELS
from .config.data import DataConfig
from .data import built_config, line_csvs, resolve_source, training_rows

_IDX = {lab: i for i, lab in enumerate(LABELS)}


@dataclass(frozen=True)
class PairEvidence:
    """What the training data says about (cell line, perturbation, gene), leakage rule applied."""

    cell_line: str
    perturbation: str
    gene: str
    gene_counts_here: np.ndarray  # (up, down, not_de) of this gene over training knockdowns in this line
    gene_counts_other: dict[str, np.ndarray]  # same, per other training line
    pert_counts_other: dict[str, np.ndarray]  # this perturbation's effect over all genes, per other line
    pair_labels_other: dict[str, str]  # the same (pert, gene) pair's label in other lines


class TrainingStats:
    """Counts over training rows (columns cell_line, perturbation, gene, label) for fast lookups."""

    def __init__(self, train: pd.DataFrame):
        self.lines: list[str] = sorted(train["cell_line"].unique()) if len(train) else []
        codes = train["label"].map(_IDX).to_numpy()
        onehot = np.eye(3, dtype=np.int64)[codes] if len(train) else np.zeros((0, 3), np.int64)
        self.global_counts = onehot.sum(axis=0) if len(train) else np.zeros(3, np.int64)
        self.gene_counts: dict[tuple[str, str], np.ndarray] = {}
        self.pert_counts: dict[tuple[str, str], np.ndarray] = {}
        self.pair_label: dict[tuple[str, str, str], str] = {}
        self.pert_lines: dict[str, list[str]] = defaultdict(list)
        cells, perts, genes = (train[c].to_numpy() for c in ("cell_line", "perturbation", "gene"))
        labels = train["label"].to_numpy()
        frame = pd.DataFrame({"c": cells, "p": perts, "g": genes, "u": onehot[:, 0], "d": onehot[:, 1],
                              "n": onehot[:, 2]})
        for (c, g), row in frame.groupby(["c", "g"], sort=False)[["u", "d", "n"]].sum().iterrows():
            self.gene_counts[(c, g)] = row.to_numpy()
        for (c, p), row in frame.groupby(["c", "p"], sort=False)[["u", "d", "n"]].sum().iterrows():
            self.pert_counts[(c, p)] = row.to_numpy()
            self.pert_lines[p].append(c)
        self.pair_label = dict(zip(zip(cells, perts, genes), labels))
        self.line_counts: dict[str, np.ndarray] = {
            c: onehot[cells == c].sum(axis=0) for c in self.lines}
        self.gene_counts_pooled: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3, np.int64))
        for (_, g), v in self.gene_counts.items():
            self.gene_counts_pooled[g] = self.gene_counts_pooled[g] + v

    def counts_excluding(self, line: str) -> np.ndarray:
        """Class counts over the training rows of every line except ``line``."""
        return self.global_counts - self.line_counts.get(line, 0)

    @property
    def global_rate(self) -> np.ndarray:
        total = self.global_counts.sum()
        return self.global_counts / total if total else np.full(3, 1 / 3)

    def gene_counts_loo(self, cell: str, pert: str, gene: str) -> np.ndarray:
        """This gene's counts in ``cell`` with the perturbation's own row removed (if it is a training row)."""
        counts = self.gene_counts.get((cell, gene), np.zeros(3, np.int64)).copy()
        own = self.pair_label.get((cell, pert, gene))
        if own is not None:
            counts[_IDX[own]] -= 1
        return counts

    def gene_counts_pooled_loo(self, cell: str, pert: str, gene: str) -> np.ndarray:
        counts = self.gene_counts_pooled.get(gene, np.zeros(3, np.int64)).copy()
        own = self.pair_label.get((cell, pert, gene))
        if own is not None:
            counts[_IDX[own]] -= 1
        return counts

    def evidence(self, cell: str, pert: str, gene: str) -> PairEvidence:
        others = [c for c in self.lines if c != cell]
        return PairEvidence(
            cell_line=cell, perturbation=pert, gene=gene,
            gene_counts_here=self.gene_counts_loo(cell, pert, gene),
            gene_counts_other={c: self.gene_counts[(c, gene)] for c in others if (c, gene) in self.gene_counts},
            pert_counts_other={c: self.pert_counts[(c, pert)] for c in others if (c, pert) in self.pert_counts},
            pair_labels_other={c: self.pair_label[(c, pert, gene)] for c in others
                               if (c, pert, gene) in self.pair_label},
        )


def _rate_phrase(counts: np.ndarray) -> str:
    n = int(counts.sum())
    if n == 0:
        return "no training knockdowns measured it"
    up, down = int(counts[0]), int(counts[1])
    return (f"changed in {up + down} of {n} training knockdowns ({100 * (up + down) / n:.0f}%): "
            f"up {up}, down {down}")


def render_evidence(ev: PairEvidence, names: dict[str, str] | None = None) -> str:
    """Plain-text evidence block for prompts. Deterministic, so prompts (and caches) are stable."""
    names = names or {}
    nm = lambda c: names.get(c, c)
    lines = [f"- {ev.gene} in {nm(ev.cell_line)}: {_rate_phrase(ev.gene_counts_here)}."]
    for c, counts in sorted(ev.gene_counts_other.items()):
        lines.append(f"- {ev.gene} in {nm(c)}: {_rate_phrase(counts)}.")
    if ev.pert_counts_other:
        for c, counts in sorted(ev.pert_counts_other.items()):
            n = int(counts.sum())
            de = int(counts[0] + counts[1])
            lines.append(f"- Knockdown of {ev.perturbation} in {nm(c)} changed {de} of {n} measured genes "
                         f"({100 * de / max(n, 1):.0f}%; up {int(counts[0])}, down {int(counts[1])}).")
    else:
        lines.append(f"- Knockdown of {ev.perturbation} was not measured in another training cell line.")
    for c, lab in sorted(ev.pair_labels_other.items()):
        lines.append(f"- In {nm(c)}, knocking down {ev.perturbation} left {ev.gene} {lab}.")
    return "\n".join(lines)


def evidence_text(stats: TrainingStats, cell: str, pert: str, gene: str) -> str:
    """The evidence block a prompt shows for one triple (leakage rule applied), with display names."""
    from .cells import all_cell_lines

    names = {k: v.name for k, v in all_cell_lines().items()}
    return render_evidence(stats.evidence(cell, pert, gene), names)


# ---------------------------------------------------------------------------------------------------------
# Stats of a config's training lines, cached per process


def training_stats(cfg: DataConfig, lines=None) -> TrainingStats:
    """Stats over ALL training rows of the training lines (validation included, test never), so baselines
    use the same information a model designer has, however the training set was subsampled.

    Cached per process: the stages of one run and the evaluation sets of one run share training lines,
    and rebuilding the stats re-reads every CSV."""
    if lines is not None:
        return TrainingStats(training_rows(cfg, lines))
    key = _stats_key(cfg)
    if key not in _STATS_CACHE:
        if len(_STATS_CACHE) >= 4:
            _STATS_CACHE.pop(next(iter(_STATS_CACHE)))
        _STATS_CACHE[key] = TrainingStats(training_rows(cfg))
    return _STATS_CACHE[key]


def dataset_training_stats(dataset: Path | str) -> TrainingStats:
    """Training stats for a folder written by `synthpert data build` (evidence context, baselines)."""
    return training_stats(built_config(Path(dataset)))


def _stats_key(cfg: DataConfig) -> str:
    """What the training rows depend on: the lines, the protocol and the CSVs' identity on disk."""
    source = resolve_source(cfg.source)
    files = {}
    for key in cfg.train_cells:
        for f in line_csvs(cfg, key, source):
            files[str(f.resolve())] = [f.stat().st_size, f.stat().st_mtime_ns] if f.exists() else None
    return json.dumps({"cfg": cfg.model_dump(mode="json", include={"source", "train_cells", "protocol",
                                                                   "extra_cell_lines"}), "files": files},
                      sort_keys=True)


_STATS_CACHE: dict[str, TrainingStats] = {}
