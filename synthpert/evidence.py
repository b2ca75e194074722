"""Observed evidence from the TRAINING split only (counts, their per-process cache, the prompt text): shared
by the baselines, the evidence teacher and the evidence context in teacher and student prompts.

Leakage rule: a training example's evidence in its own cell line is computed OUT OF FOLD — without every
perturbation of its perturbation's fold (schema.perturbation_fold; 5 folds) — so training prompts look like
test prompts (where the test perturbation is, by PerturbQA's split, absent from that line's training data).
Leaving out only the example's own row (leave-one-out) would leak its label backwards: of two knockdowns of
one gene, the changed one would always show one "changed" count fewer, a shortcut a student learns instead
of the evidence. Out of fold, two knockdowns of the same fold see identical counts for the same gene.
Out of fold is not enough on its own. Two training examples of one gene from DIFFERENT folds still differ by
their own labels: the changed one's fold holds its change, so the counts it sees have about 0.8 changes fewer
than those a not-changed knockdown of another fold sees. Within a gene, in a class-balanced training sample,
"fewer changes here" then predicts "changed" (per-gene AUROC ~0.72), a shortcut that exists only in
training: every test knockdown of a gene sees the same full counts. So a training perturbation's same-line
counts also leave out every EXAMPLE fold (schema.EXAMPLE_FOLDS), and with data.disjoint_evidence the training
and validation examples come only from those folds: every example of one (line, gene) then sees the same
counts, taken from perturbations that are never examples.
Other training lines keep the perturbation: at test time those lines' data about it is legitimately
available.
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
from .dataset import built_config, line_csvs, source_for_lines, training_rows
from .schema import EXAMPLE_FOLDS, perturbation_fold

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
        fold_of = {q: perturbation_fold(q) for q in set(perts.tolist())}
        frame["f"] = [fold_of[q] for q in perts]
        by_fold = frame.groupby(["c", "g", "f"], sort=False)[["u", "d", "n"]].sum()
        self.fold_gene_counts: dict[tuple[str, str, int], np.ndarray] = {
            k: row.to_numpy() for k, row in by_fold.iterrows()}
        self._fold_of = fold_of
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

    def _held_out(self, cell: str, pert: str, gene: str) -> np.ndarray:
        """What the leakage rule removes from ``cell``'s counts of ``gene`` for this perturbation: the rows of
        its own fold and of every example fold when the perturbation is a training perturbation of ``cell``,
        nothing otherwise (test rows)."""
        if (cell, pert) not in self.pert_counts:
            return np.zeros(3, np.int64)
        zero = np.zeros(3, np.int64)
        folds = EXAMPLE_FOLDS | {self._fold_of[pert]}
        return sum((self.fold_gene_counts.get((cell, gene, f), zero) for f in folds), zero)

    def gene_counts_loo(self, cell: str, pert: str, gene: str) -> np.ndarray:
        """This gene's counts in ``cell``, out of fold for a training perturbation (module docstring)."""
        return self.gene_counts.get((cell, gene), np.zeros(3, np.int64)) - self._held_out(cell, pert, gene)

    def gene_counts_pooled_loo(self, cell: str, pert: str, gene: str) -> np.ndarray:
        return self.gene_counts_pooled.get(gene, np.zeros(3, np.int64)) - self._held_out(cell, pert, gene)

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


# Words beside the numbers: a small model learns a handful of words from a few thousand examples far sooner
# than the meaning of a hundred number tokens, and a large one reads them as a human would. Thresholds sit
# near the training data's quantiles (gene: 78% of (line, gene) cells never change; perturbation: the share
# of measured genes a knockdown changes has quartiles of about 10%, 15% and 17%).
GENE_WORDS = ((0.0, "never changed"), (0.1, "rarely changed"), (0.3, "sometimes changed"), (1.01, "often changed"))
PERT_WORDS = ((0.05, "no clear effect"), (0.10, "a weak effect"), (0.15, "a moderate effect"),
              (1.01, "a strong effect"))


def _word(share: float, words) -> str:
    for limit, word in words:
        if share <= limit if limit == 0.0 else share < limit:
            return word
    return words[-1][1]


def _direction_word(up: int, down: int) -> str:
    if up + down == 0:
        return ""
    if up >= 2 * down:
        return ", mostly up"
    if down >= 2 * up:
        return ", mostly down"
    return ", both ways"


def _rate_phrase(counts: np.ndarray) -> str:
    n = int(counts.sum())
    if n == 0:
        return "no training knockdowns measured it"
    up, down = int(counts[0]), int(counts[1])
    if up + down == 0:
        return f"never changed in {n} training knockdowns"
    share = (up + down) / n
    return (f"{_word(share, GENE_WORDS)}{_direction_word(up, down)}: in {up + down} of {n} training knockdowns "
            f"({100 * share:.0f}%), up {up}, down {down}")


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
            lines.append(f"- Knockdown of {ev.perturbation} in {nm(c)} had {_word(de / max(n, 1), PERT_WORDS)}"
                         f"{_direction_word(int(counts[0]), int(counts[1]))}: changed {de} of {n} measured genes "
                         f"({100 * de / max(n, 1):.0f}%), up {int(counts[0])}, down {int(counts[1])}.")
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
    source = source_for_lines(cfg, cfg.train_cells)
    files = {}
    for key in cfg.train_cells:
        for f in line_csvs(cfg, key, source):
            files[str(f.resolve())] = [f.stat().st_size, f.stat().st_mtime_ns] if f.exists() else None
    return json.dumps({"cfg": cfg.model_dump(mode="json", include={"source", "train_cells", "protocol",
                                                                   "extra_cell_lines"}), "files": files},
                      sort_keys=True)


_STATS_CACHE: dict[str, TrainingStats] = {}
