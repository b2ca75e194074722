"""The evidence lookup (``train.evidence_lookup``): one more line in the evidence block stating the ``combined``
baseline's class probabilities for the triple. A student then starts from the strongest model-free estimate
and can only be asked to add to it; the verdict compares such a student with ``combined`` first.

Leakage rule, as for the rest of the block (evidence.py): the features are ``baselines.evidence_features``,
out of fold for a training perturbation of its own line. The regression adds one more way for a label to
reach its own prompt — a fit on it — so it is CROSS-FITTED by perturbation fold (schema.perturbation_fold):

* a training row of fold f (its perturbation a training perturbation of its line, the test of
  ``TrainingStats._held_out``) is scored by a model fitted on the fit rows of the OTHER folds. Folds are by
  perturbation across lines, so the fit holds neither the row's label nor that of the same knockdown and gene
  in another line (which its own cross-cell features show it), and every example of a fold gets the same model.
* a test or unseen-line row is scored by ``combined`` itself (the seeded sample of all training rows, seed 0):
  the line then states exactly what the ``combined`` bar predicts, so "does the student beat combined" asks
  whether it adds anything to its own lookup (an evaluation of a lookup student fits its combined row on
  this same sample, whatever its seed: another sample moves a K562 pair's probabilities by 0.003 on average,
  up to 0.14). Averaging the fold models instead would
  state a predictor no report shows; each fold model sees 4/5 of the same rows, so training and test lines
  come from fits of nearly the same size, on the same features.

A label still reaches other rows' features as a count (another line's rows of the same gene pool it, the
global rate holds it), as it does in the evidence block itself; it is never a target of the fit that scores it.
"""

from __future__ import annotations

import weakref

import numpy as np
import pandas as pd

from .answer import DISPLAY, LABELS
from .baselines import combined_fit_keys, combined_model, evidence_features, fit_combined, model_probabilities
from .evidence import TrainingStats, evidence_text
from .runs import adapter_manifest
from .schema import perturbation_fold

# combined's fit sample: fixed, so a dataset's prompts (and their caches) never move with a run's seed
LOOKUP_SEED = 0
_FOLD_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fold_models(stats: TrainingStats) -> dict[int, object]:
    """{fold: combined's regression fitted on its fit rows outside that fold}, once per stats per process."""
    if stats not in _FOLD_MODELS:
        keys = combined_fit_keys(stats, LOOKUP_SEED)
        folds = np.array([perturbation_fold(p) for _, p, _ in keys])
        _FOLD_MODELS[stats] = {int(f): fit_combined(stats, [k for k, kf in zip(keys, folds) if kf != f])
                               for f in np.unique(folds)}
    return _FOLD_MODELS[stats]


def lookup_probabilities(stats: TrainingStats, rows: pd.DataFrame) -> np.ndarray:
    """(n, 3) probabilities (up, down, not DE) for rows (cell_line, perturbation, gene); never reads a label
    of ``rows``. A whole frame at once: the features are computed in one pass, each model applied once."""
    out = np.zeros((len(rows), 3))
    if not len(rows):
        return out
    cells, perts = rows["cell_line"].tolist(), rows["perturbation"].tolist()
    features = evidence_features(stats, rows)
    # a training row: its perturbation is one of its line's training perturbations (_held_out's test)
    fold = np.array([perturbation_fold(p) if (c, p) in stats.pert_counts else -1 for c, p in zip(cells, perts)])
    models = _fold_models(stats) if (fold >= 0).any() else {}
    for f in np.unique(fold):
        at = fold == f
        # a fold without fit rows of its own has no label of its own in any fit: combined scores it
        model = models.get(int(f)) if f >= 0 else None
        if model is None:
            model = combined_model(stats, LOOKUP_SEED)
        out[at] = model_probabilities(model, features[at])
    return out


def _percent(p: float) -> str:
    # "<1%", not "0%": most pairs are far from the rare classes, and a prompt should not state certainty
    return "<1%" if p < 0.01 else ">99%" if p > 0.99 else f"{100 * p:.0f}%"


def lookup_line(probs) -> str:
    """The block's lookup line; whole percents, so prompts (and their caches) are stable."""
    shares = ", ".join(f"{DISPLAY[lab]} {_percent(float(p))}" for lab, p in zip(LABELS, probs))
    return f"- Model-free estimate from these counts (logistic regression on the training screens): {shares}."


def evidence_blocks(stats: TrainingStats | None, rows: pd.DataFrame, lookup: bool = False) -> list[str | None]:
    """The evidence block of each row's student prompt (None without stats), with the lookup line when
    ``lookup``: what training, evaluation, prediction and serving all show the student."""
    if stats is None:
        return [None] * len(rows)
    blocks = [evidence_text(stats, c, p, g) for c, p, g in
              zip(rows["cell_line"].tolist(), rows["perturbation"].tolist(), rows["gene"].tolist())]
    if lookup:
        blocks = [f"{b}\n{lookup_line(p)}" for b, p in zip(blocks, lookup_probabilities(stats, rows))]
    return blocks


def adapter_lookup(adapter: str | None) -> bool:
    """Whether ``adapter`` was trained with the lookup line in its evidence block (its manifest says so)."""
    return bool(adapter_manifest(adapter).get("evidence_lookup"))


def evidence_block(stats: TrainingStats | None, cell: str, pert: str, gene: str, lookup: bool = False) -> str | None:
    """One triple's evidence block (a served request); the lookup's models are fitted on the first call."""
    rows = pd.DataFrame({"cell_line": [cell], "perturbation": [pert], "gene": [gene]})
    return evidence_blocks(stats, rows, lookup)[0]
