"""Settings of the data stage: which PerturbQA lines train and test, subsampling, the user's own screens."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from .base import StrictModel


class SubsampleConfig(StrictModel):
    """How many examples to keep from one split. Deterministic for a given seed."""

    genes: int | None = Field(None, ge=1, description="first keep every row of this many randomly chosen readout "
                              "genes (so per-gene AUROC is measurable on a sample)")
    n: int | None = Field(None, ge=1, description="keep this many examples (after balancing)")
    fraction: float | None = Field(None, gt=0, le=1, description="keep this fraction of the split")
    balance: bool = Field(False, description="equal numbers per class (as far as the rarest class allows)")
    per_class_cap: int | None = Field(None, ge=1, description="at most this many examples of each class")
    gene_matched: float = Field(
        0.0, ge=0, le=1, description="with balance: the share of 'not DE' examples drawn from the readout gene (and "
        "cell line) of a drawn DE example, knocked down by a perturbation of the same evidence fold (true = 1.0). "
        "Those pairs show knockdowns of one gene that did and did not change it, with identical gene-level "
        "evidence: only the knockdown's own evidence tells them apart, which is what per-gene AUROC measures. "
        "The rest are drawn at random, so the gene's overall rate (most of macro-F1) is still learned")
    seed: int | None = Field(None, description="seed of this draw (default: the data seed); an evaluation set "
                             "fixes it to stay the same pairs in runs of every seed")

    @model_validator(mode="after")
    def _one_size(self):
        if self.n is not None and self.fraction is not None:
            raise ValueError("give either n or fraction, not both")
        if self.gene_matched > 0 and not self.balance:
            raise ValueError("gene_matched pairs 'not DE' examples with DE ones: it needs balance: true")
        return self


class ExtraCellLine(StrictModel):
    """A user's own screen in PerturbQA's CSV format: {key}-de.csv and {key}-dir.csv in `source`."""

    name: str | None = None
    description: str
    source: str | None = Field(None, description="directory holding this line's CSVs (default: data.source)",
                               json_schema_extra={"path": "dir"})


class DataConfig(StrictModel):
    source: str | None = Field(
        None, description="directory with PerturbQA CSVs; default $SYNTHPERT_DATA, else the download cache",
        json_schema_extra={"path": "dir"})
    train_cells: list[str] = Field(default_factory=lambda: ["k562"], description="lines whose train split trains")
    test_cells: list[str] = Field(default_factory=lambda: ["k562"], description="lines whose test split is scored")
    protocol: str = Field(
        "split", description="'split': PerturbQA's own train/test columns everywhere; 'published': for unseen "
        "cell lines, every row of the training lines trains and every row of the test line is scored")
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of training PERTURBATIONS held out")
    seed: int = 0
    disjoint_evidence: bool = Field(
        False, description="draw training and validation examples only from the perturbations of the example "
        "folds (2 of 5, a stable hash of the symbol), whose labels never enter any example's same-line "
        "evidence. Turn it on when the student reads the evidence block (train.evidence): otherwise examples of "
        "one gene from different folds see counts that differ by their own labels, a shortcut absent at test")
    train_subsample: SubsampleConfig | None = None
    val_subsample: SubsampleConfig | None = None
    test_subsample: SubsampleConfig | None = None
    extra_cell_lines: dict[str, ExtraCellLine] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _protocol(self):
        if self.protocol not in ("split", "published"):
            raise ValueError(f"protocol must be 'split' or 'published', got {self.protocol!r}")
        if self.protocol == "published" and set(self.train_cells) & set(self.test_cells):
            raise ValueError("protocol 'published' is for unseen cell lines: test_cells must not be in train_cells")
        return self


def default_data_dir() -> Path:
    env = os.environ.get("SYNTHPERT_DATA")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "synthpert" / "perturbqa"
