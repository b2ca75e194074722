"""Typed records passed between stages as plain JSONL lines.

* ``Example``: one (cell line, perturbation, gene) triple with its three-class label, as ``data build``
  writes it (also the columns of the saved ``datasets.DatasetDict``).
* ``TraceRecord``: what the teacher writes, the judge annotates and training reads. The raw model output
  is always kept next to the parsed fields, so nothing paid for is ever thrown away.
* ``Prediction``: what evaluation and serving produce for one triple (strict and lenient labels, samples).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .answer import LABELS, RATINGS, SHORT, STRICT, check_label, format_answer
from .errors import SynthpertError

log = logging.getLogger("synthpert.schema")

JUDGE_RATINGS: tuple[str, ...] = RATINGS  # the rating vocabulary, owned by answer.py


class Example(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    cell_line: str
    perturbation: str
    gene: str
    label: str
    split: str  # PerturbQA's own split of the row ("train" / "test")
    pert_seen_in_train_lines: list[str] = Field(default_factory=list)
    pair_seen_in_train_lines: list[str] = Field(default_factory=list)

    _v_label = field_validator("label")(classmethod(lambda cls, v: check_label(v)))

    @staticmethod
    def make_id(cell_line: str, perturbation: str, gene: str) -> str:
        return f"{cell_line}:{perturbation}:{gene}"


# Gene symbols and cell-line keys: letters, digits and . _ - (HLA-A, MT-ND1, RP11-34P13.7, C5orf24); no
# whitespace inside, no control characters, nothing a model prompt should not carry.
SYMBOL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]*$"

# Training evidence is computed out of fold: a training row sees its own line's counts without the
# perturbations of its fold (see evidence.py). Folds are a stable hash of the symbol, so every stage and every
# run agree on them without storing anything.
EVIDENCE_FOLDS = 5
# With data.disjoint_evidence, training and validation examples come only from the perturbations of these
# folds, and same-line evidence only from the others, so every example of one (line, gene) sees the same
# counts: no example's label reaches another's evidence (evidence.py says why out-of-fold alone leaks).
EXAMPLE_FOLDS = frozenset({0, 1})


def perturbation_fold(perturbation: str, folds: int = EVIDENCE_FOLDS) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha1(perturbation.encode()).digest()[:4], "big") % folds


class Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{k: getattr(self, k) + getattr(other, k) for k in type(self).model_fields})


class JudgeVerdict(BaseModel):
    model_config = ConfigDict(extra="ignore")

    judge: str  # model name, or "rules" for the offline rules judge
    rating: str | None  # one of JUDGE_RATINGS, None when the judge's output could not be parsed
    justification: str = ""
    raw_text: str = ""
    parse_error: str | None = None
    prompt_hash: str | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0


class TraceRecord(BaseModel):
    """One teacher output for one training triple (one sample when several are drawn)."""

    model_config = ConfigDict(extra="ignore")

    id: str  # f"{example_id}#{sample_index}"
    example_id: str
    cell_line: str
    perturbation: str
    gene: str
    label: str
    mode: Literal["rationalise", "predict", "evidence", "evidence_blind"] = "rationalise"
    sample_index: int = 0
    teacher: str  # model name, or "evidence" for the offline evidence teacher
    prompt_name: str = ""
    prompt_hash: str = ""
    messages: list[dict] = Field(default_factory=list)
    sampling: dict = Field(default_factory=dict)
    raw_text: str = ""
    reasoning: str | None = None
    parsed_label: str | None = None
    parse_error: str | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    cache_key: str | None = None
    confidence: float | None = None  # exp(mean token logprob) of the completion, where the server sent them
    finish_reason: str | None = None  # as the server sent it: "length" means the token cap cut the output
    strict_ok: bool | None = None  # the strict parser read an answer (parsed_label is the lenient one)
    problems: list[str] = Field(default_factory=list)  # answer.output_problems of raw_text, for counting
    judge: JudgeVerdict | None = None
    kept: bool | None = None
    reject_reason: str | None = None

    _v_label = field_validator("label")(classmethod(lambda cls, v: check_label(v)))

    def assistant_text(self, label_only: bool = False) -> str:
        """Canonical training target: the trace's reasoning and the OBSERVED label, in the answer format.

        Only traces whose parsed answer equals the label are kept, so this never rewrites an answer.
        """
        if label_only:
            return format_answer(self.label)
        if not self.reasoning:
            raise SynthpertError(f"trace {self.id} has no reasoning to train on")
        return format_answer(self.label, self.reasoning)


# Values of Prediction.probability_method: how the class probabilities were obtained.
ANSWER_LOGPROB = "answer_logprob"
VOTES = "votes"
HARD_LABEL = "hard_label"


class Sample(BaseModel):
    raw_text: str
    label_strict: str | None
    label_lenient: str | None
    error_strict: str | None = None
    error_lenient: str | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None


class Prediction(BaseModel):
    """One example's prediction; every backend writes exactly these fields."""

    id: str
    cell_line: str
    perturbation: str
    gene: str
    gold: str | None = None  # None when serving
    raw_text: str  # first sample's output
    reasoning: str | None = None
    # multitask students: the label their explanation (written after the answer, on request) concluded
    explanation_label: str | None = None
    label_strict: str | None
    label_lenient: str | None
    unparseable_reason_strict: str | None = None
    unparseable_reason_lenient: str | None = None
    probabilities: dict[str, float] | None = None  # keys up / down / not_de
    probability_method: str | None = None  # answer_logprob | votes | hard_label | None (nothing parsed)
    answer_logprobs: dict[str, float] | None = None  # raw sums, before normalisation
    samples: list[Sample] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    backend: str = ""
    model: str = ""
    adapter: str | None = None
    seconds: float = 0.0

    def label(self, mode: str = STRICT) -> str | None:
        return self.label_strict if mode == STRICT else self.label_lenient

    def prob_vector(self) -> list[float] | None:
        if self.probabilities is None:
            return None
        return [self.probabilities[SHORT[lab]] for lab in LABELS]


def write_jsonl(path: Path, records: Iterable[BaseModel | dict], append: bool = False) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for r in records:
            f.write((r.model_dump_json() if isinstance(r, BaseModel) else json.dumps(r)) + "\n")
            n += 1
    return n


def read_jsonl(path: Path, model: type[BaseModel] | None = None) -> Iterator:
    """Yield records. A torn last line (no newline and not a whole record: the writer was killed mid-line) is
    skipped with a warning naming it; any other bad line (not UTF-8, not JSON, not a ``model``) is an error
    naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise SynthpertError(f"file not found: {path}")
    lines = path.read_bytes().split(b"\n")  # bytes: a kill can cut a line inside a multi-byte character
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8-sig" if i == 1 else "utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == len(lines):  # only the last piece can lack its newline
                log.warning("%s:%d: torn last line (%d bytes without a newline, the writer was probably killed "
                            "mid-write): skipped; everything before it is intact", path, i, len(raw))
                return
            what = "not UTF-8" if isinstance(e, UnicodeDecodeError) else f"not valid JSON ({e.msg})"
            raise SynthpertError(f"{path}:{i}: {what}") from None
        if model is None:
            yield obj
        else:
            try:
                yield model.model_validate(obj)
            except ValidationError as e:
                from .config.base import describe_problems

                raise SynthpertError(f"{path}:{i}: not a valid {model.__name__} record: "
                                     + "; ".join(describe_problems(e))) from None


def jsonable(obj):
    """Plain JSON: numpy values to Python, NaN/inf to null, anything else JSON cannot hold to its str (so
    metrics.json and stage records load anywhere)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if obj is None or isinstance(obj, (str, int)):
        return obj
    return str(obj)
