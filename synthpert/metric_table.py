"""The metrics an evaluation reports, in one table: what each is called, which way is better, how a table shows
it, whether the verdict judges it and whether a decision rule may be tuned to it.

The report, the command line's tables, the at-a-glance lines, experiment tracking, the model card, the verdict
and the decision rule's objectives all read this table at call time, so a new metric is one entry here (plus
the code in metrics.py that computes it). The per-class F1 columns have an entry of their own (``PER_CLASS``):
where it stands, each class's F1 is shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from .answer import DISPLAY, LABELS, SHORT

PER_CLASS = "per_class"  # the entry standing for the F1 of each class (metrics.json: per_class.<key>.f1)


@dataclass(frozen=True)
class Metric:
    key: str  # its key in metrics.json, in tracking and in a decision objective
    report: str  # the report's and the model card's column header
    cli: str | None = None  # the command line's column header; None: not in those tables
    higher_is_better: bool = True
    headline: bool = False  # the verdict compares the model with the best baseline on it
    objective: bool = False  # decision.objective may name it (the tuned rule maximises it on validation rows)
    interval: bool = True  # shown with its bootstrap interval where one was computed
    genes: str | None = None  # metrics.json key of the gene count a per-gene mean is shown with
    glance: str | None = None  # its name in the lines `synthpert run` ends with; None: not there
    card: bool = True  # a column of the model card's table


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "accuracy", "acc", objective=True),
    Metric("macro_f1", "macro-F1", "macroF1", headline=True, objective=True, glance="macro-F1"),
    Metric("balanced_accuracy", "balanced acc.", "balAcc", headline=True, objective=True),
    Metric(PER_CLASS, "F1", "F1", interval=False),
    Metric("auroc_de_per_gene", "AUROC DE (per gene)", "AUROC DE", headline=True, genes="auroc_de_genes",
           glance="per-gene AUROC DE"),
    Metric("auroc_dir_per_gene", "AUROC dir (per gene)", "AUROC dir", headline=True, genes="auroc_dir_genes"),
    Metric("ece", "ECE", higher_is_better=False, interval=False, card=False),
    Metric("unparseable_rate", "unparseable", higher_is_better=False, interval=False, card=False),
)


def metrics(where: str | None = None) -> list[Metric]:
    """The table's entries, all of them or those shown in ``where``: "cli", "card", "headline", "objective",
    "glance"."""
    rows = list(METRICS)
    if where is None:
        return rows
    if where not in ("cli", "card", "headline", "objective", "glance"):
        raise ValueError(f"no table column {where!r}")
    return [m for m in rows if getattr(m, where)]


def scalar_keys(where: str | None = None) -> list[str]:
    """The keys of the single-number metrics (not the per-class F1 entry) of ``metrics(where)``."""
    return [m.key for m in metrics(where) if m.key != PER_CLASS]


def headline_keys() -> list[str]:
    return scalar_keys("headline")


def objectives() -> list[str]:
    return scalar_keys("objective")


def class_headers(prefix: str) -> list[str]:
    """One header per class, in label order: "F1 up", "F1 down", "F1 not DE"."""
    return [f"{prefix} {DISPLAY[lab]}" for lab in LABELS]


def headers(m: Metric, which: str) -> list[str]:
    """The column header(s) of entry ``m`` in the report ("report") or a command-line table ("cli")."""
    name = m.report if which == "report" else m.cli
    return class_headers(name) if m.key == PER_CLASS else [name]


def class_f1s(row: dict) -> list:
    """The F1 of each class in label order (None where missing)."""
    per_class = row.get("per_class") or {}
    return [(per_class.get(SHORT[lab]) or {}).get("f1") for lab in LABELS]
