"""Settings of trace generation: the teacher (what it is asked) and the judge (rubric and keep rule)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..answer import GOOD, RATINGS, canonical_class
from .client import ClientConfig, SamplingConfig
from .data import SubsampleConfig

OFFLINE_TEACHER_MODES = ("evidence", "evidence_blind")  # the offline evidence heuristic: no API, no key, no cost


class TeacherConfig(ClientConfig):
    """The teacher: where it runs (ClientConfig fields) and what it is asked."""

    mode: Literal["rationalise", "predict", "evidence", "evidence_blind"] = Field(
        "rationalise", description="rationalise: told the label; predict: label-blind with rejection sampling; "
        "evidence: the OFFLINE evidence heuristic, told the label (no API, no cost); evidence_blind: the same "
        "heuristic label-blind — it answers from the evidence alone (sample 0 its best guess, later samples drawn "
        "from its class probabilities) and answers that miss the label are rejected, as in predict mode")
    samples: int = Field(1, ge=1, le=64, description="samples per triple (predict mode: e.g. 4)")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_completion_tokens=2048))
    split: str = Field("train", description="split of the built dataset to write traces for")
    subsample: SubsampleConfig | None = Field(None, description="which triples to send (seeded), e.g. n: 500")
    seed: int = 0
    evidence_context: bool = Field(False, description="show the teacher observed training evidence (leakage-safe)")
    system_prompt: str | None = Field("teacher_system.txt", description="system prompt file in prompts/ (null: none)")
    prompt: str | None = Field(None, description="user prompt template in prompts/ (default: per mode)")
    fewshot: str | None = Field(
        None, description="worked examples file in prompts/ (YAML: cell_line, perturbation, gene, label, reasoning), "
        "sent before the question as earlier turns of the same prompt; small local teachers need them to follow the "
        "answer format (e.g. teacher_fewshot.yaml)")

    @property
    def offline(self) -> bool:
        return self.mode in OFFLINE_TEACHER_MODES

    @model_validator(mode="after")
    def _batch_needs_an_api(self):
        if self.batch and self.offline:
            raise ValueError(f"teacher.batch applies to API teachers; mode {self.mode!r} is the offline evidence "
                             "heuristic, which sends no requests. Set teacher.batch=false or an API mode")
        return self


class JudgeConfig(ClientConfig):
    """The judge: where it runs (ClientConfig fields), the rubric and the keep rule."""

    kind: Literal["llm", "rules", "consistency"] = Field(
        "llm", description="llm: a model with the rubric; rules: the OFFLINE rules heuristic (no API, no cost); "
        "consistency: LABEL-FREE selection from k label-blind samples per triple (teacher mode predict or "
        "evidence_blind, samples >= 2): keep a triple's majority-answer traces when the majority's share >= "
        "agreement (no judge model, no cost)")
    agreement: float = Field(0.75, gt=0, le=1, description="consistency: the majority answer's share of a "
                             "triple's samples needed to keep it (unparseable samples count against it)")
    class_quota: dict[str, int] | None = Field(
        None, description="consistency: keep at most this many triples per majority class (up/down/not_de), the "
        "most consistent first, so filtering cannot erase a rare class by letting a common one dominate")
    rank_by: Literal["agreement", "cocoa"] = Field(
        "agreement", description="consistency: the order in which triples fill class_quota. agreement: the majority "
        "answer's share; cocoa: confidence x agreement (CoCoA), confidence = the mean over the majority-answer "
        "samples of exp(mean token log-probability); needs teacher.sampling.logprobs=true and a server that "
        "returns them (the offline teacher has none)")
    threshold: Literal[RATINGS] = Field(
        GOOD, description="keep traces rated at least this (SynthPert's main run kept only 'excellent')")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0,
                                                                            max_completion_tokens=512))
    system_prompt: str | None = Field("judge_system.txt", description="system prompt file in prompts/ (null: none)")
    prompt: str = Field("judge.j2", description="rubric template in prompts/")
    fewshot: str | None = Field(
        None, description="worked verdicts file in prompts/ (YAML: cell_line, perturbation, gene, reasoning, answer, "
        "rating, justification), sent before the trace as earlier turns; for small local judges (judge_fewshot.yaml)")
    judge_mismatched: bool = Field(False, description="also pay to judge traces whose answer != label (they "
                                   "cannot be kept; useful only to study the judge)")
    min_chars: int = Field(200, ge=0, description="rules judge: shortest acceptable reasoning")
    max_chars: int = Field(20000, ge=1, description="rules judge: longest acceptable reasoning")

    @model_validator(mode="after")
    def _batch_needs_an_api(self):
        if self.batch and self.kind == "rules":
            raise ValueError("judge.batch applies to an LLM judge; the rules judge is offline and sends no requests. "
                             "Set judge.batch=false or judge.kind=llm")
        return self

    @model_validator(mode="after")
    def _rules_threshold(self):
        unknown = sorted(k for k in (self.class_quota or {}) if canonical_class(k) is None)
        if unknown:
            raise ValueError(f"unknown class name(s) in judge.class_quota: {unknown}; use up, down, not_de")
        if self.rank_by != "agreement" and self.kind != "consistency":
            raise ValueError(f"judge.rank_by={self.rank_by} applies to judge.kind=consistency only")
        if self.class_quota and self.kind != "consistency":
            raise ValueError("judge.class_quota applies to judge.kind=consistency only")
        if self.kind == "rules" and RATINGS.index(self.threshold) < RATINGS.index(GOOD):
            raise ValueError(f"the rules judge rates at most 'good' (it checks form, not biology); threshold "
                             f"{self.threshold!r} would keep nothing. Use judge.threshold=good or an LLM judge")
        return self
