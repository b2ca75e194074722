"""The judge: rates each trace's reasoning and keeps a trace only if the rating meets the threshold AND
its parsed answer equals the observed label.

* ``llm``: any OpenAI-compatible model with the rubric in prompts/judge.j2 (reasoning only; five levels
  excellent / good / average / bad / terrible; a short justification). Use a different model family from
  the teacher where you can: a judge favours its own family's style (see README).
* ``rules``: the OFFLINE rules judge, a heuristic: strict answer format, answer equals label, mentions
  both genes and the cell line, length bounds. It can only certify form, so it rates at most "good".
* ``consistency``: LABEL-FREE selection (arXiv 2510.05871): from k label-blind samples per triple (teacher
  mode predict / evidence_blind), keep the traces that give the majority answer when the majority's share
  reaches ``agreement``; optional per-class quotas, filled in order of agreement or, with ``rank_by: cocoa``,
  of confidence x agreement (CoCoA; confidence from the teacher's token log-probabilities). No model is asked:
  the samples are already paid for.

Both go through the same engine (cache, accounting) and write the same outputs: ``kept.jsonl``,
``rejected.jsonl`` (TraceRecords with the verdict attached) and ``summary.json`` (keep rate overall, per
class and per rating, judge parse failures, cost).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from .answer import LABELS, canonical_class, strip_reasoning
from .chat import ChatRequest
from .chat.client import engine_for
from .config.generate import JudgeConfig
from .errors import SynthpertError
from .offline import RULES_JUDGE_MODEL, rules_backend
from .runs import write_json_atomic, write_jsonl_atomic
from .schema import JUDGE_RATINGS, JudgeVerdict, TraceRecord, read_jsonl

JUDGE_REPLY = "judge_reply.j2"  # how a worked example's verdict is written (the rubric asks for this form)
RANK = {r: i for i, r in enumerate(reversed(JUDGE_RATINGS))}  # terrible=0 ... excellent=4


# ---------------------------------------------------------------------------------------------------------
# Verdict parsing

_ANY_RATING = "|".join(JUDGE_RATINGS)
_RATING_LINE = re.compile(rf"rating\s*[\"']?\s*[:=\-]\s*[\"'*_\s]*({_ANY_RATING})\b", re.IGNORECASE)
_JUST_LINE = re.compile(r"justification\s*[\"']?\s*[:=\-]\s*[\"'*_\s]*(.+)", re.IGNORECASE | re.DOTALL)
_WORD = re.compile(rf"\b({_ANY_RATING})\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> tuple[str | None, str, str | None]:
    """(rating, justification, error). Accepts 'Rating: X' lines (markdown allowed), a JSON object with a
    'rating' field, or a reply that is just one rating word. Anything ambiguous is unparseable."""
    if not text or not text.strip():
        return None, "", "empty judge output"
    t = strip_reasoning(text).strip()
    obj = _json_object(t)
    if obj is not None and isinstance(obj.get("rating"), str) and obj["rating"].strip().lower() in JUDGE_RATINGS:
        return obj["rating"].strip().lower(), str(obj.get("justification", "")).strip(), None
    ratings = {m.lower() for m in _RATING_LINE.findall(t)}
    just = _JUST_LINE.search(t)
    justification = just.group(1).strip().splitlines()[0].strip(" *\"'") if just else ""
    if len(ratings) == 1:
        return ratings.pop(), justification, None
    if len(ratings) > 1:
        return None, justification, f"conflicting ratings {sorted(ratings)}"
    words = {w.lower() for w in _WORD.findall(t)}
    if len(t.split()) <= 3 and len(words) == 1:
        return words.pop(), justification, None
    return None, justification, "no 'Rating: <level>' line in the judge output"


def _json_object(text: str) -> dict | None:
    m = re.search(r"\{.*\}", text, re.DOTALL)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


# ---------------------------------------------------------------------------------------------------------
# The run


def _judge_messages(cfg: JudgeConfig, trace: TraceRecord) -> tuple[list[dict], str]:
    from .prompting import fewshot_field, fewshot_label, fewshot_triple, load_fewshot, load_template, triple_variables
    from .resources import sha256_text

    variables = triple_variables(trace.cell_line, trace.perturbation, trace.gene)
    variables.update(reasoning=trace.reasoning or "", answer=trace.parsed_label or "(no parseable answer)")
    user = load_template(cfg.prompt)
    messages, phash = [], user.sha256
    if cfg.system_prompt:
        system = load_template(cfg.system_prompt)
        messages.append({"role": "system", "content": system.render(**variables)})
        phash = sha256_text(system.sha256 + user.sha256)
    if cfg.fewshot:
        demos, demo_hash = load_fewshot(cfg.fewshot)
        reply = load_template(JUDGE_REPLY)
        for d in demos:
            v = fewshot_triple(d, cfg.fewshot)
            v.update({k: fewshot_field(d, k, cfg.fewshot) for k in ("reasoning", "rating", "justification")})
            v["answer"] = fewshot_label(d, "answer", cfg.fewshot)
            messages += [{"role": "user", "content": user.render(**v)},
                         {"role": "assistant", "content": reply.render(**v)}]
        phash = sha256_text(phash + demo_hash + reply.sha256)
    messages.append({"role": "user", "content": user.render(**variables)})
    return messages, phash


def _precheck(cfg: JudgeConfig, trace: TraceRecord) -> str | None:
    """Reasons to reject without paying a judge: the keep rule could never be met."""
    if trace.kept is False and trace.reject_reason:
        return trace.reject_reason  # e.g. rejection sampling in predict mode
    if not trace.reasoning:
        return f"no reasoning to judge ({trace.parse_error or 'empty'})"
    if trace.parsed_label != trace.label and not cfg.judge_mismatched:
        return f"answer {trace.parsed_label or 'unparseable'} != label {trace.label}"
    return None


def _rating_warnings(counts: Counter, at_least: int = 10) -> list[str]:
    """A judge that gives every trace the same rating is not discriminating: a small judge picking the first
    option of the rubric, or a rubric it cannot follow. The keep rule then keeps all or nothing."""
    rated = {r: n for r, n in counts.items() if r != "unparseable" and n}
    total = sum(rated.values())
    if total >= at_least and len(rated) == 1:
        (only,) = rated
        return [f"the judge rated all {total} judged traces '{only}': it does not tell good reasoning from bad "
                "(try a larger or different judge model; the keep rule now rests on the answer check alone)"]
    return []


# A rejection reason's opening words -> its kind, first match wins ("answer unparseable" before "answer ").
_REASON_KINDS = (("rejection sampling", "answer != label (rejection sampling)"),
                 ("no reasoning", "no reasoning to judge"), ("judge output unparseable", "judge gave no rating"),
                 ("rated ", "rated below threshold"), ("answer unparseable", "answer unparseable"),
                 ("answer ", "answer != label"))


def reason_kind(reason: str | None) -> str:
    """A rejection reason without its particulars, for counting (the full reason stays on the record)."""
    r = reason or ""
    return next((kind for prefix, kind in _REASON_KINDS if r.startswith(prefix)), r or "unknown")


def _engine(cfg: JudgeConfig, out_dir: Path):
    local = rules_backend(cfg) if cfg.kind == "rules" else None
    return engine_for(cfg, out_dir, local=local, description=f"judge ({cfg.kind})")


def _requests(cfg: JudgeConfig, traces: list[TraceRecord]) -> tuple[list[ChatRequest], str | None]:
    requests, phash = [], None
    model = RULES_JUDGE_MODEL if cfg.kind == "rules" else None
    sampling = {} if cfg.kind == "rules" else cfg.sampling.to_dict()
    key_extra = {"rules": [cfg.min_chars, cfg.max_chars, "v1"]} if cfg.kind == "rules" else None
    for t in traces:
        messages, phash = _judge_messages(cfg, t)
        requests.append(ChatRequest(id=t.id, messages=messages, sampling=sampling, model=model,
                                    key_extra=key_extra, context=t))
    return requests, phash


def estimate_judge(cfg: JudgeConfig, examples, samples: int, reasoning_tokens: int, out_dir: Path) -> dict:
    """Dry-run estimate before any trace exists: every trace judged (an upper bound; traces whose answer is
    not the label are rejected without a request), each with a reasoning of ``reasoning_tokens`` tokens."""
    if cfg.kind == "consistency":
        return {"dry_run": True, "traces": len(examples) * samples, "requests": 0, "cost_usd": 0.0,
                "note": "consistency selection asks no model"}
    filler = "x" * (3 * max(1, reasoning_tokens))  # accounting.estimate_prompt_tokens counts 3 characters a token
    traces = [TraceRecord(id=f"{r.id}#{i}", example_id=r.id, cell_line=r.cell_line, perturbation=r.perturbation,
                          gene=r.gene, label=r.label, teacher="estimate", reasoning=filler, parsed_label=r.label)
              for r in examples.itertuples(index=False) for i in range(samples)]
    requests, _ = _requests(cfg, traces)
    return {"dry_run": True, "traces": len(traces), "upper_bound": True, **_engine(cfg, out_dir).estimate(requests)}


def _write_outputs(cfg: JudgeConfig, out_dir: Path, kept: list, rejected: list, summary: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out_dir / "kept.jsonl", kept)
    write_jsonl_atomic(out_dir / "rejected.jsonl", rejected)
    summary.update(kept_path=str(out_dir / "kept.jsonl"), rejected_path=str(out_dir / "rejected.jsonl"))
    write_json_atomic(out_dir / "summary.json", summary)
    write_json_atomic(out_dir / "judge_config.json", cfg.model_dump(mode="json"))
    return summary


def _cocoa(group: list[TraceRecord], majority: str | None, agreement: float) -> float | None:
    """CoCoA-style score of a triple: the mean confidence of its majority-answer samples x the majority's
    agreement. A confident teacher that agrees with itself ranks first; one that agrees while unsure of its
    tokens, or is sure of one sample among disagreeing ones, ranks lower. None without log-probabilities."""
    conf = [t.confidence for t in group if t.parsed_label == majority and t.confidence is not None]
    if majority is None or not conf:
        return None
    return sum(conf) / len(conf) * agreement


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def consistency_select(cfg: JudgeConfig, traces: list[TraceRecord]) -> tuple[list, list, dict]:
    """(kept, rejected, summary) of label-free selection. The label is read only for the report: how often
    the kept majority answer equals it, i.e. what going label-free costs."""
    groups: dict[str, list[TraceRecord]] = {}
    for t in traces:
        groups.setdefault(t.example_id, []).append(t)
    small = [e for e, g in groups.items() if len(g) < 2]
    if small:
        raise SynthpertError(f"judge.kind=consistency needs >= 2 label-blind samples per triple; {len(small)} "
                             f"triples have one (e.g. {small[0]}): set teacher.samples >= 2 (e.g. 4)")
    blind = {t.mode for t in traces} - {"predict", "evidence_blind"}
    if blind:
        raise SynthpertError(f"judge.kind=consistency needs label-blind samples (teacher mode predict or "
                             f"evidence_blind); these traces were written in mode {sorted(blind)}, which tells "
                             "the teacher the label")
    if cfg.rank_by == "cocoa":
        bare = [t.id for t in traces if t.confidence is None and t.parsed_label is not None]
        if bare:
            raise SynthpertError(f"judge.rank_by=cocoa needs token log-probabilities, but {len(bare)} traces have "
                                 f"none (e.g. {bare[0]}): generate with teacher.sampling.logprobs=true from a server "
                                 "that returns them (the offline teacher has none), or use rank_by=agreement")
    scored = []
    for eid, g in groups.items():
        votes = Counter(t.parsed_label for t in g if t.parsed_label is not None)
        if votes:
            # ties broken by label order, never by the observed label
            majority, n = max(votes.items(), key=lambda kv: (kv[1], -LABELS.index(kv[0])))
        else:
            majority, n = None, 0
        scored.append((eid, majority, n / len(g), _cocoa(g, majority, n / len(g))))
    quota = {canonical_class(k): v for k, v in (cfg.class_quota or {}).items()}
    taken: Counter = Counter()
    keep: dict[str, str] = {}
    why: dict[str, str] = {}
    rank = 3 if cfg.rank_by == "cocoa" else 2
    for eid, majority, share, _ in sorted(scored, key=lambda x: (-(x[rank] or 0.0), x[0])):  # best first
        if majority is None:
            why[eid] = "no parseable sample"
        elif share < cfg.agreement:
            why[eid] = f"majority {majority} in {share:.2f} of samples < agreement {cfg.agreement}"
        elif majority in quota and taken[majority] >= quota[majority]:
            why[eid] = f"class quota for {majority} ({quota[majority]}) reached"
        else:
            taken[majority] += 1
            keep[eid] = majority
    share_of = {eid: share for eid, _, share, _ in scored}
    score_of = {eid: score for eid, _, _, score in scored}
    kept, rejected = [], []
    for t in traces:
        rec = t.model_copy(deep=True)
        majority = keep.get(t.example_id)
        rec.judge = JudgeVerdict(judge="consistency", rating=None,
                                 justification=f"majority agreement {share_of[t.example_id]:.2f}"
                                 + (f", CoCoA score {score_of[t.example_id]:.3f}"
                                    if score_of[t.example_id] is not None else ""))
        if majority is None:
            rec.kept, rec.reject_reason = False, why[t.example_id]
        elif t.parsed_label != majority:
            rec.kept, rec.reject_reason = False, f"answer {t.parsed_label or 'unparseable'} is not the majority"
        else:
            rec.kept, rec.reject_reason = True, None
        (kept if rec.kept else rejected).append(rec)
    label_of = {t.example_id: t.label for t in traces}
    per_class = {}
    for lab in LABELS:
        n = sum(1 for e in groups if label_of[e] == lab)
        k = sum(1 for e in keep if label_of[e] == lab)
        per_class[lab] = {"triples": n, "kept": k, "keep_rate": round(k / n, 4) if n else None,
                          "kept_as_majority": sum(1 for m in keep.values() if m == lab)}
    agree = sum(1 for e, m in keep.items() if m == label_of[e])
    summary = {
        "complete": True, "judge": "consistency", "kind": "consistency", "offline_heuristic": False,
        "agreement": cfg.agreement, "class_quota": cfg.class_quota, "rank_by": cfg.rank_by,
        "traces": len(traces), "triples": len(groups),
        "kept_triples": len(keep), "kept": len(kept), "rejected": len(rejected),
        "keep_rate": round(len(kept) / len(traces), 4), "triple_keep_rate": round(len(keep) / len(groups), 4),
        "per_class": per_class,
        "kept_majority_equals_label": round(agree / len(keep), 4) if keep else None,
        "kept_majority_differs_from_label": len(keep) - agree,
        "mean_cocoa_score_kept": _mean([score_of[e] for e in keep]),
        "mean_cocoa_score_rejected": _mean([score_of[e] for e, _, _, _ in scored if e not in keep]),
        "teacher_parse_failures": sum(1 for t in traces if t.parsed_label is None),
        "teacher_cost_usd": round(sum(t.cost_usd for t in traces), 6),
    }
    return kept, rejected, summary


def run_judge(cfg: JudgeConfig, traces_path: str | Path, out_dir: str | Path, dry_run: bool = False,
              export_batch: str | Path | None = None, import_batch: str | Path | None = None) -> dict:
    """Judge every trace; ``export_batch`` / ``import_batch`` as in run_generate (a Batch JSONL file out, or a
    Batch output file joined into the cache and nothing sent)."""
    out_dir = Path(out_dir)
    traces = list(read_jsonl(Path(traces_path), TraceRecord))
    if not traces:
        raise SynthpertError(f"{traces_path} holds no traces")
    ids = [t.id for t in traces]
    if len(set(ids)) != len(ids):
        raise SynthpertError(f"{traces_path}: trace id {next(i for i in ids if ids.count(i) > 1)!r} appears twice")
    if cfg.kind == "consistency":
        kept, rejected, summary = consistency_select(cfg, traces)
        if dry_run:
            return {"dry_run": True, "traces": len(traces), "to_judge": 0, "requests": 0}
        return _write_outputs(cfg, out_dir, kept, rejected, summary)
    by_id = {t.id: t for t in traces}
    pre = {t.id: _precheck(cfg, t) for t in traces}
    requests, phash = _requests(cfg, [t for t in traces if pre[t.id] is None])
    engine = _engine(cfg, out_dir)
    if dry_run:
        return {"dry_run": True, "traces": len(traces), "to_judge": len(requests),
                "rejected_without_judging": len(traces) - len(requests), **engine.estimate(requests)}
    if export_batch is not None:
        return {"export_batch": True, "traces": len(traces), **engine.export_batch(requests, export_batch)}
    out_dir.mkdir(parents=True, exist_ok=True)
    imported = engine.import_batch(requests, import_batch) if import_batch is not None else None
    run = engine.run(requests, send=imported is None)
    judge_name = "rules" if cfg.kind == "rules" else cfg.model
    kept, rejected, unjudged = [], [], 0
    rating_counts, rating_kept, parse_failures = Counter(), Counter(), 0
    for t in traces:
        rec = by_id[t.id].model_copy(deep=True)
        if pre[t.id] is not None:
            rec.kept, rec.reject_reason = False, pre[t.id]
            rejected.append(rec)
            continue
        res = run.results.get(t.id)
        if res is None:  # not judged (interrupted / budget / failed): reported, left for a rerun
            unjudged += 1
            continue
        text = res.texts[0] if res.texts else None
        rating, justification, error = parse_verdict(text)
        rec.judge = JudgeVerdict(judge=judge_name, rating=rating, justification=justification, raw_text=text or "",
                                 parse_error=error, prompt_hash=phash, usage=res.usage, cost_usd=res.cost_usd)
        rating_counts[rating or "unparseable"] += 1
        if rating is None:
            parse_failures += 1
            rec.kept, rec.reject_reason = False, f"judge output unparseable: {error}"
        elif RANK[rating] < RANK[cfg.threshold]:
            rec.kept, rec.reject_reason = False, f"rated {rating} (threshold {cfg.threshold})"
        elif rec.parsed_label != rec.label:
            rec.kept, rec.reject_reason = False, f"answer {rec.parsed_label or 'unparseable'} != label {rec.label}"
        else:
            rec.kept, rec.reject_reason = True, None
            rating_kept[rating] += 1
        (kept if rec.kept else rejected).append(rec)
    write_jsonl_atomic(out_dir / "kept.jsonl", kept)
    write_jsonl_atomic(out_dir / "rejected.jsonl", rejected)
    total = len(traces)
    per_class = {}
    for lab in LABELS:
        n = sum(1 for t in traces if t.label == lab)
        k = sum(1 for t in kept if t.label == lab)
        per_class[lab] = {"traces": n, "kept": k, "keep_rate": round(k / n, 4) if n else None}
    summary = {
        "complete": unjudged == 0 and run.stats.completed == len(requests),
        "judge": judge_name, "kind": cfg.kind, "offline_heuristic": cfg.kind == "rules",
        "base_url": None if cfg.kind == "rules" else cfg.base_url, "threshold": cfg.threshold,
        "prompt_hash": phash, "traces": total, "judged": sum(rating_counts.values()), "unjudged": unjudged,
        "kept": len(kept), "rejected": len(rejected), "keep_rate": round(len(kept) / total, 4),
        "per_class": per_class,
        "per_rating": {r: {"n": rating_counts.get(r, 0), "kept": rating_kept.get(r, 0)}
                       for r in (*JUDGE_RATINGS, "unparseable")},
        "rejected_without_judging": sum(1 for v in pre.values() if v is not None),
        "judge_parse_failures": parse_failures,
        "rejection_reasons": dict(Counter(reason_kind(r.reject_reason) for r in rejected).most_common()),
        "warnings": _rating_warnings(rating_counts),
        "teacher_parse_failures": sum(1 for t in traces if t.parsed_label is None),
        "answer_mismatch": sum(1 for t in traces if t.parsed_label != t.label),
        "engine": run.stats.to_dict(),
        "cost_usd_this_run": round(run.stats.cost_new, 6), "cost_usd_total": round(run.stats.cost_total, 6),
        "teacher_cost_usd": round(sum(t.cost_usd for t in traces), 6),
        "kept_path": str(out_dir / "kept.jsonl"), "rejected_path": str(out_dir / "rejected.jsonl"),
        **({"import_batch": imported} if imported is not None else {}),
    }
    write_json_atomic(out_dir / "summary.json", summary)
    write_json_atomic(out_dir / "judge_config.json", cfg.model_dump(mode="json"))
    return summary
