"""Decision rules: turn a prediction's class probabilities into one label, the same way everywhere.

A student trained on class-balanced rows estimates p(c | x) under a uniform prior, but PerturbQA's test
sets are ~86% "not differentially expressed". Three named rules, each a vector of per-class log-offsets
added to log p(c | x) before the argmax (so eval, serve and the report apply one formula):

* ``argmax``: offsets 0 — the model's own answer;
* ``prior``: prior-shift correction (Saerens, Latinne & Decaestecker, Neural Computation 2002),
  p'(c|x) ∝ p(c|x) · π_target(c) / π_train(c), with π_train the class shares of the rows the model was
  trained on and π_target those of the full training split of the training lines (known without any test
  label), or estimated by EM from unlabelled evaluation inputs (``em_target_prior``);
* ``tuned``: offsets fitted on the perturbation-disjoint VALIDATION split to maximise macro-F1 (or another
  objective); ``fit_tuned`` accepts only a ``ValidationRows`` object, which refuses rows of any other split.

The fitted rule is saved as ``decision.json`` beside the adapter, with the data it was fitted on and the
adapter's hash, so a decision is never applied to a model it was not fitted for.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .answer import LABELS
from .errors import SynthpertError
from .metric_table import objectives

RULES = ("argmax", "prior", "tuned")
DECISION_FILE = "decision.json"
_EPS = 1e-12


class Decision(BaseModel):
    """A decision rule with its fitted numbers; what ``decision.json`` holds."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["argmax", "prior", "tuned"] = "argmax"
    log_offsets: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0],
                                     description="added to log p(c|x) per class, in LABELS order")
    pi_train: list[float] | None = Field(None, description="class shares of the rows the model was trained on")
    pi_target: list[float] | None = Field(None, description="class shares the decisions are meant for")
    objective: str | None = Field(None, description="tuned: what the offsets maximise on validation rows")
    fitted_on: dict = Field(default_factory=dict, description="where the numbers came from (split, n, dataset)")
    adapter_hash: str | None = Field(None, description="the adapter this was fitted for (refused on another)")
    labels: list[str] = Field(default_factory=lambda: list(LABELS))

    @field_validator("log_offsets")
    @classmethod
    def _three(cls, v):
        if len(v) != len(LABELS) or not all(np.isfinite(v)):
            raise ValueError(f"log_offsets needs {len(LABELS)} finite numbers (one per class), got {v}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        if list(v) != list(LABELS):
            raise ValueError(f"labels must be {list(LABELS)} in that order, got {v}")
        return v

    def apply(self, probs) -> np.ndarray:
        """Indices into LABELS, one per row of ``probs`` (n, 3)."""
        return decide(probs, self.log_offsets)

    def labels_for(self, probs) -> list[str]:
        return [LABELS[i] for i in self.apply(probs)]

    def adjusted(self, probs) -> np.ndarray:
        """The probabilities after the offsets, renormalised (what the decided label is the argmax of)."""
        logits = np.log(np.clip(np.asarray(probs, dtype=float), _EPS, None)) + np.asarray(self.log_offsets)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def describe(self) -> str:
        if self.rule == "argmax":
            return "argmax (the model's own probabilities)"
        offs = ", ".join(f"{lab.split()[0]} {o:+.2f}" for lab, o in zip(LABELS, self.log_offsets))
        what = "prior shift" if self.rule == "prior" else f"tuned for {self.objective} on validation rows"
        return f"{self.rule}: {what} (log-offsets {offs})"


def check_rule(name: str) -> str:
    if name not in RULES:
        guess = difflib.get_close_matches(name, RULES, n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        raise SynthpertError(f"unknown decision rule {name!r}{hint}; rules: {', '.join(RULES)}")
    return name


def _as_probs(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] != len(LABELS):
        raise SynthpertError(f"class probabilities must have shape (n, {len(LABELS)}), got {p.shape}")
    return p


def decide(probs, log_offsets) -> np.ndarray:
    p = _as_probs(probs)
    if len(p) == 0:
        return np.zeros(0, dtype=int)
    return np.argmax(np.log(np.clip(p, _EPS, None)) + np.asarray(log_offsets, dtype=float), axis=1)


def class_shares(labels) -> list[float]:
    """Shares of each class in LABELS order (unknown labels are an error, not silently dropped)."""
    labels = list(labels)
    unknown = sorted({lab for lab in labels if lab not in LABELS})
    if unknown:
        raise SynthpertError(f"unknown class label(s) {unknown}; labels: {list(LABELS)}")
    if not labels:
        raise SynthpertError("no labels to compute class shares from")
    counts = np.array([sum(lab == c for lab in labels) for c in LABELS], dtype=float)
    return (counts / counts.sum()).tolist()


def prior_shift(pi_train, pi_target) -> Decision:
    """The Bayes decision when only the class prior changes: offsets log π_target − log π_train."""
    tr, tg = np.asarray(pi_train, dtype=float), np.asarray(pi_target, dtype=float)
    for name, v in (("pi_train", tr), ("pi_target", tg)):
        if v.shape != (len(LABELS),) or (v < 0).any() or not np.isclose(v.sum(), 1.0, atol=1e-6):
            raise SynthpertError(f"{name} must be {len(LABELS)} non-negative shares summing to 1, got {v.tolist()}")
    offsets = np.log(np.clip(tg, _EPS, None)) - np.log(np.clip(tr, _EPS, None))
    return Decision(rule="prior", log_offsets=offsets.tolist(), pi_train=tr.tolist(), pi_target=tg.tolist())


def em_target_prior(probs, pi_train, max_iter: int = 200, tol: float = 1e-8) -> list[float]:
    """Saerens et al.'s EM: the class prior of unlabelled inputs, given p(c|x) under ``pi_train``."""
    p = _as_probs(probs)
    tr = np.clip(np.asarray(pi_train, dtype=float), _EPS, None)
    pi = tr.copy()
    for _ in range(max_iter):
        w = p * (pi / tr)
        w /= np.clip(w.sum(axis=1, keepdims=True), _EPS, None)
        new = w.mean(axis=0)
        if np.abs(new - pi).max() < tol:
            pi = new
            break
        pi = new
    return (pi / pi.sum()).tolist()


# ---------------------------------------------------------------------------------------------------------
# Tuned offsets: fitted on validation rows only


@dataclass(frozen=True)
class ValidationRows:
    """Class probabilities and labels of VALIDATION rows: the only thing ``fit_tuned`` accepts.

    Built from rows that carry their split; any row of another split (test above all) is refused, so a
    tuned rule cannot be fitted on the rows it will be scored on."""

    probs: np.ndarray
    labels: tuple[str, ...]
    source: str

    @classmethod
    def from_rows(cls, probs, labels, splits, source: str = "") -> ValidationRows:
        splits = list(splits)
        labels = tuple(labels)
        p = _as_probs(probs)
        if not (len(p) == len(labels) == len(splits)):
            raise SynthpertError(f"{len(p)} probability rows, {len(labels)} labels and {len(splits)} splits differ")
        bad = sorted({s for s in splits if s != "validation"})
        if bad:
            raise SynthpertError(f"a tuned decision rule is fitted on validation rows only; got rows of split(s) "
                                 f"{bad} (from {source or 'the input'})")
        if not splits:
            raise SynthpertError(f"no validation rows to fit a tuned decision rule on ({source or 'empty input'}); "
                                 "build the data with data.val_fraction > 0, or use decision rule 'prior'")
        class_shares(labels)  # validates the label names
        return cls(p, labels, source)


def objective_value(y_true: np.ndarray, y_pred: np.ndarray, objective: str) -> float:
    """The objective as the reports compute it (metrics.py), so a rule is tuned for the number it is judged by."""
    from .metrics import scores_of_codes

    return scores_of_codes(y_true, y_pred)[objective]


def fit_tuned(validation: ValidationRows, objective: str = "macro_f1", start: Decision | None = None,
              grid: np.ndarray | None = None, rounds: int = 4) -> Decision:
    """Per-class log-offsets maximising ``objective`` on the validation rows (coordinate ascent over a grid,
    "not DE" fixed at 0 since only differences matter). Starts from ``start`` (e.g. the prior-shift rule) and
    never returns something worse than it on these rows."""
    if not isinstance(validation, ValidationRows):
        raise SynthpertError("fit_tuned takes ValidationRows (validation split only), not raw arrays")
    known = objectives()  # the metric table's (metric_table.py)
    if objective not in known:
        guess = difflib.get_close_matches(objective, known, n=1)
        raise SynthpertError(f"unknown objective {objective!r}" + (f" (did you mean {guess[0]!r}?)" if guess else "")
                             + f"; objectives: {', '.join(known)}")
    grid = np.linspace(-6, 6, 121) if grid is None else np.asarray(grid, dtype=float)
    y = np.array([LABELS.index(lab) for lab in validation.labels])
    logp = np.log(np.clip(validation.probs, _EPS, None))
    base = np.asarray(start.log_offsets if start else [0.0, 0.0, 0.0], dtype=float)
    base = base - base[2]
    score = lambda off: objective_value(y, np.argmax(logp + off, axis=1), objective)  # noqa: E731
    best, best_score = base.copy(), score(base)
    for _ in range(rounds):
        improved = False
        for c in (0, 1):
            for v in grid:
                cand = best.copy()
                cand[c] = v
                s = score(cand)
                if s > best_score + 1e-12:
                    best, best_score, improved = cand, s, True
        if not improved:
            break
    return Decision(rule="tuned", log_offsets=best.tolist(), objective=objective,
                    pi_train=start.pi_train if start else None, pi_target=start.pi_target if start else None,
                    fitted_on={"split": "validation", "n": len(y), "source": validation.source,
                               "objective_value": round(best_score, 6),
                               "start_objective_value": round(score(base), 6)})


# ---------------------------------------------------------------------------------------------------------
# decision.json


def save_decision(decision: Decision, folder: str | Path) -> Path:
    path = Path(folder) / DECISION_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(decision.model_dump_json(indent=2))
    tmp.replace(path)
    return path


def load_decision(path: str | Path, adapter_hash: str | None = None) -> Decision:
    """Read ``decision.json`` (or the one in a folder); refuse one fitted for another adapter."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / DECISION_FILE
    refit = "refit it with `synthpert decide` (or rerun the pipeline's train stage)"
    if not path.exists():
        raise SynthpertError(f"no decision file {path}; {refit}")
    try:
        raw = json.loads(path.read_text())
        decision = Decision.model_validate(raw)
    except json.JSONDecodeError as e:
        raise SynthpertError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); {refit}") from None
    except ValidationError as e:
        from .config.base import describe_problems

        first = e.errors()[0]
        if first["type"] == "literal_error" and first["loc"] == ("rule",):
            check_rule(str(raw.get("rule")))
        raise SynthpertError(f"{path}: {describe_problems(e)[0]}; {refit}") from None
    if adapter_hash and decision.adapter_hash and decision.adapter_hash != adapter_hash:
        raise SynthpertError(f"{path} was fitted for adapter {decision.adapter_hash[:12]}…, not for this adapter "
                             f"{adapter_hash[:12]}…; {refit}")
    return decision


# ---------------------------------------------------------------------------------------------------------
# Which rule applies to an adapter


DECISION_SPECS = ("auto", "argmax", "prior", "tuned")


def resolve_decision(spec: str, adapter_dir: str | Path | None, adapter_hash: str | None,
                     pi_train: list[float] | None, pi_target: list[float] | None) -> Decision:
    """The decision an evaluation or the endpoint applies.

    ``spec``: ``argmax``; ``prior`` (π_train from the adapter's training manifest, π_target the class shares of
    the training lines' full training split); ``tuned`` (``decision.json`` in the adapter folder, fitted on
    validation rows by ``synthpert decide``); ``auto`` (``decision.json`` if the adapter has one, else
    ``prior`` when π_train is known, else ``argmax``); or a path to a ``decision.json``."""
    if spec.endswith(".json") or "/" in spec:
        return load_decision(spec, adapter_hash)
    if spec not in DECISION_SPECS:
        guess = difflib.get_close_matches(spec, DECISION_SPECS, n=1)
        raise SynthpertError(f"unknown decision {spec!r}" + (f" (did you mean {guess[0]!r}?)" if guess else "")
                             + f"; use one of {', '.join(DECISION_SPECS)} or a path to a {DECISION_FILE}")
    folder = Path(adapter_dir) if adapter_dir else None
    if spec == "tuned" or (spec == "auto" and folder is not None and (folder / DECISION_FILE).exists()):
        if folder is None:
            raise SynthpertError("decision 'tuned' needs an adapter folder holding decision.json")
        return load_decision(folder / DECISION_FILE, adapter_hash)
    if spec == "argmax" or (spec == "auto" and (pi_train is None or pi_target is None)):
        return Decision()
    if pi_train is None:
        raise SynthpertError("decision 'prior' needs the class shares the model was trained on (class_shares in "
                             "the adapter's manifest.json, written by `synthpert train`); use 'argmax' or 'tuned'")
    if pi_target is None:
        raise SynthpertError("decision 'prior' needs the class shares of the training data (none given)")
    d = prior_shift(pi_train, pi_target)
    return d.model_copy(update={"adapter_hash": adapter_hash,
                                "fitted_on": {"pi_train": "adapter manifest class_shares",
                                              "pi_target": "full training split of the training lines"}})


def decision_for(spec: str, adapter: str | None, stats) -> Decision:
    """The decision rule an evaluation or the endpoint applies to ``adapter`` (see ``resolve_decision``):
    π_train from the adapter's manifest, π_target = the class shares of the training lines' full training
    split (``stats``: evidence.TrainingStats, or None when no training data is at hand)."""
    from .backends import adapter_version
    from .runs import adapter_manifest

    manifest = adapter_manifest(adapter) if adapter else {}
    return resolve_decision(spec, adapter, adapter_version(adapter) if adapter else None,
                            manifest.get("class_shares"), stats.global_rate.tolist() if stats is not None else None)
