"""The teacher: reasoning traces for training triples, written through the response engine (client.py).

Modes:

* ``rationalise`` (SynthPert's recipe): the teacher is told the observed outcome and writes the
  mechanistic reasoning that leads to it (prompts/teacher_rationalise.j2);
* ``predict``: the label-blind question, ``samples`` samples per triple; only samples whose parsed answer
  equals the observed label are usable (rejection sampling; the others are kept, marked rejected);
* ``evidence``: the OFFLINE evidence teacher, a heuristic for machines without an API. It writes the
  reasoning from the training data itself (synthpert.evidence; leakage rule applied) through
  prompts/teacher_evidence.j2. It runs through the same engine, cache and records as an API teacher, so
  the judge, training and evaluation cannot tell the difference.

Output: ``<out>/traces.jsonl`` (one synthpert.schema.TraceRecord per sample, raw text always kept, parse
failures kept and counted), ``<out>/summary.json``, ``<out>/cache.sqlite`` (every response, so a rerun
resumes and never pays twice).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .answer import LABELS, LENIENT, OUTPUT_PROBLEMS, STRICT, format_answer, output_problems, parse_answer
from .chat import ChatRequest, ChatResult, choice_logprobs, sequence_confidence
from .chat.client import engine_for
from .config.generate import TeacherConfig
from .dataset import load_examples
from .evidence import dataset_training_stats, evidence_text
from .offline import EVIDENCE_TEMPLATE, OFFLINE_EVIDENCE_MODEL, evidence_backend
from .runs import write_json_atomic, write_jsonl_atomic
from .schema import TraceRecord, Usage

log = logging.getLogger("synthpert.generate")

PROMPTS = {"rationalise": "teacher_rationalise.j2", "predict": "teacher_predict.j2",
           "evidence": "teacher_rationalise.j2", "evidence_blind": "teacher_predict.j2"}


# ---------------------------------------------------------------------------------------------------------
# Dataset and evidence


class EvidenceSource:
    """TrainingStats of the dataset's training lines, built lazily (it reads every training row)."""

    def __init__(self, dataset_path: Path):
        self.dataset_path = Path(dataset_path)
        self._stats = None

    @property
    def stats(self):
        if self._stats is None:
            self._stats = dataset_training_stats(self.dataset_path)
        return self._stats

    def text(self, cell: str, pert: str, gene: str) -> str:
        return evidence_text(self.stats, cell, pert, gene)


# ---------------------------------------------------------------------------------------------------------
# Requests


def _messages(cfg: TeacherConfig, row, evidence: str | None) -> tuple[list[dict], str, str]:
    from .prompting import load_fewshot, load_template, triple_variables
    from .resources import sha256_text

    name = cfg.prompt or PROMPTS[cfg.mode]
    variables = triple_variables(row.cell_line, row.perturbation, row.gene, evidence)
    variables["label"] = row.label if cfg.mode not in ("predict", "evidence_blind") else None
    user = load_template(name)
    messages = []
    prompt_hash = user.sha256
    if cfg.system_prompt:
        system = load_template(cfg.system_prompt)
        messages.append({"role": "system", "content": system.render(**variables)})
        prompt_hash = sha256_text(system.sha256 + user.sha256)
    if cfg.fewshot:
        demos, demo_hash = load_fewshot(cfg.fewshot)
        messages += _demo_turns(cfg, user, demos)
        prompt_hash = sha256_text(prompt_hash + demo_hash)
    messages.append({"role": "user", "content": user.render(**variables)})
    return messages, name, prompt_hash


def _demo_turns(cfg: TeacherConfig, user, demos) -> list[dict]:
    """Each worked example as the same question (this run's template) and a well-formed answer to it."""
    from .prompting import fewshot_field, fewshot_label, fewshot_triple

    turns = []
    for d in demos:
        variables = fewshot_triple(d, cfg.fewshot)
        label = fewshot_label(d, "label", cfg.fewshot)
        variables["label"] = label if cfg.mode not in ("predict", "evidence_blind") else None
        turns += [{"role": "user", "content": user.render(**variables)},
                  {"role": "assistant", "content": format_answer(label, fewshot_field(d, "reasoning", cfg.fewshot))}]
    return turns


def build_requests(cfg: TeacherConfig, df: pd.DataFrame,
                   evidence: EvidenceSource | None) -> tuple[list[ChatRequest], dict]:
    """One request per triple (n samples each). Returns the requests and {request id: prompt info}."""
    sampling = cfg.sampling.to_dict()
    if cfg.samples > 1:
        sampling["n"] = cfg.samples
    key_extra = None
    if cfg.offline:
        from .prompting import load_template

        sampling = {"n": cfg.samples} if cfg.samples > 1 else {}
        key_extra = {"evidence_template": load_template(EVIDENCE_TEMPLATE).sha256,
                     **({"label_blind": "v1"} if cfg.mode == "evidence_blind" else {})}
    reqs, info = [], {}
    use_evidence = cfg.evidence_context or cfg.offline
    for row in df.itertuples(index=False):
        ev_text = evidence.text(row.cell_line, row.perturbation, row.gene) if use_evidence else None
        messages, name, phash = _messages(cfg, row, ev_text)
        model = OFFLINE_EVIDENCE_MODEL if cfg.offline else None
        reqs.append(ChatRequest(id=row.id, messages=messages, sampling=sampling, model=model, key_extra=key_extra,
                                context=row))
        info[row.id] = {"prompt_name": name, "prompt_hash": phash}
    return reqs, info


# ---------------------------------------------------------------------------------------------------------
# Records and the run


def _split_usage(usage: Usage, n: int) -> list[Usage]:
    """Share one request's usage over its n samples so per-trace figures add up to the bill exactly."""
    parts = []
    for i in range(n):
        parts.append(Usage(**{k: v // n + (v % n if i == 0 else 0) for k, v in usage.model_dump().items()}))
    return parts


def to_records(cfg: TeacherConfig, req: ChatRequest, res: ChatResult, info: dict) -> list[TraceRecord]:
    row = req.context
    teacher = "evidence" if cfg.offline else res.model
    usages = _split_usage(res.usage, len(res.texts))
    logprobs = choice_logprobs(res.raw)
    out = []
    for i, text in enumerate(res.texts):
        parsed = parse_answer(text, LENIENT)
        finish = res.finish_reasons[i] if i < len(res.finish_reasons) else None
        rec = TraceRecord(
            id=f"{row.id}#{i}", example_id=row.id, cell_line=row.cell_line, perturbation=row.perturbation,
            gene=row.gene, label=row.label, mode=cfg.mode, sample_index=i, teacher=teacher,
            prompt_name=info["prompt_name"], prompt_hash=info["prompt_hash"], messages=req.messages,
            sampling=req.sampling, raw_text=text or "", reasoning=parsed.reasoning, parsed_label=parsed.label,
            parse_error=parsed.error, usage=usages[i], cost_usd=res.cost_usd / max(len(res.texts), 1),
            cache_key=res.keys[min(i, len(res.keys) - 1)],
            confidence=sequence_confidence(logprobs[i]) if i < len(logprobs) else None, finish_reason=finish,
            strict_ok=parse_answer(text, STRICT).ok, problems=output_problems(text, finish, row.label))
        if cfg.mode in ("predict", "evidence_blind") and parsed.label != row.label:
            rec.kept = False  # rejection sampling: the raw sample is kept, marked unusable
            rec.reject_reason = f"rejection sampling: answer {parsed.label or 'unparseable'} != label {row.label}"
        out.append(rec)
    return out


def _rate(n: int, total: int) -> float | None:
    return round(n / total, 4) if total else None


def _class_counts(records: list[TraceRecord], pred) -> dict:
    return {lab: sum(1 for r in records if r.label == lab and pred(r)) for lab in LABELS}


def run_generate(cfg: TeacherConfig, dataset_path: str | Path, out_dir: str | Path, dry_run: bool = False,
                 export_batch: str | Path | None = None, import_batch: str | Path | None = None) -> dict:
    """Write traces for the dataset's ``cfg.split``; returns the summary (also in <out>/summary.json).

    ``export_batch``: write the uncached requests as a Batch JSONL file and stop (nothing is sent);
    ``import_batch``: join a Batch output file into the cache, then write traces from the cache only."""
    out_dir = Path(out_dir)
    df = load_examples(dataset_path, cfg.split, cfg.subsample, cfg.seed)
    needs_evidence = cfg.evidence_context or cfg.offline
    evidence = EvidenceSource(Path(dataset_path)) if needs_evidence else None
    blind = cfg.mode == "evidence_blind"
    local = evidence_backend(evidence, label_blind=blind) if cfg.offline else None
    requests, info = build_requests(cfg, df, evidence)
    engine = engine_for(cfg, out_dir, local=local, description=f"teacher ({cfg.mode})")
    if dry_run:
        return {"dry_run": True, "mode": cfg.mode, "examples": len(df), **engine.estimate(requests)}
    if export_batch is not None:
        return {"export_batch": True, "examples": len(df), **engine.export_batch(requests, export_batch)}
    out_dir.mkdir(parents=True, exist_ok=True)
    imported = engine.import_batch(requests, import_batch) if import_batch is not None else None
    run = engine.run(requests, send=imported is None)
    records: list[TraceRecord] = []
    for req in requests:
        res = run.results.get(req.id)
        if res is not None:
            records.extend(to_records(cfg, req, res, info[req.id]))
    write_jsonl_atomic(out_dir / "traces.jsonl", records)
    parse_failures = sum(1 for r in records if r.parsed_label is None)
    matches = sum(1 for r in records if r.parsed_label == r.label)
    summary = {
        "complete": run.stats.completed == len(requests),
        "mode": cfg.mode, "offline_heuristic": cfg.offline,
        "teacher": "evidence" if cfg.offline else cfg.model,
        "base_url": None if cfg.offline else cfg.base_url,
        "prompt_name": (cfg.prompt or PROMPTS[cfg.mode]),
        "prompt_hash": next(iter(info.values()))["prompt_hash"] if info else None,
        "evidence_template_hash": (requests[0].key_extra["evidence_template"]
                                   if cfg.offline and requests else None),
        "evidence_context": needs_evidence, "sampling": requests[0].sampling if requests else {},
        "examples": len(df), "examples_done": run.stats.completed, "traces": len(records),
        "parse_failures": parse_failures, "answer_matches_label": matches,
        # a real model's output, read both ways: strict is the exact format a student is trained on, lenient
        # what the toolkit recovers (case, spacing, synonyms, an "Answer: X" line); every problem counted
        "parse_rates": {"strict": _rate(sum(1 for r in records if r.strict_ok), len(records)),
                        "lenient": _rate(len(records) - parse_failures, len(records))},
        "output_problems": {p: sum(1 for r in records if p in r.problems) for p in OUTPUT_PROBLEMS},
        "by_class": {"examples": {lab: int((df["label"] == lab).sum()) for lab in LABELS},
                     "traces": _class_counts(records, lambda r: True),
                     "answer_matches_label": _class_counts(records, lambda r: r.parsed_label == r.label)},
        "engine": run.stats.to_dict(),
        "cost_usd_this_run": round(run.stats.cost_new, 6), "cost_usd_total": round(run.stats.cost_total, 6),
        "traces_path": str(out_dir / "traces.jsonl"),
        **({"import_batch": imported} if imported is not None else {}),
    }
    write_json_atomic(out_dir / "summary.json", summary)
    write_json_atomic(out_dir / "teacher_config.json", cfg.model_dump(mode="json"))  # names the key's variable only
    return summary
