"""The offline heuristics, as engines' local backends: the evidence teacher and the rules judge.

Both answer through the same ChatEngine (cache, records) as an API model, so later stages cannot tell the
difference; both are named as heuristics wherever their output is reported.
"""

from __future__ import annotations

import re

from .answer import BAD, GOOD, LABELS, STRICT, TERRIBLE, format_answer, parse_answer
from .config.generate import JudgeConfig
from .errors import SynthpertError
from .schema import TraceRecord

OFFLINE_EVIDENCE_MODEL = "offline-evidence-teacher"  # engine model name of the offline heuristic
EVIDENCE_TEMPLATE = "teacher_evidence.j2"
RULES_JUDGE_MODEL = "offline-rules-judge"


def _counts_phrase(counts, subject: str) -> tuple[str, float, str | None]:
    n = int(counts.sum())
    if n == 0:
        return f"no training knockdown measured {subject}", 0.0, None
    up, down = int(counts[0]), int(counts[1])
    share = (up + down) / n
    direction = None if up + down == 0 else (LABELS[0] if up >= down else LABELS[1])
    return (f"{subject} changed in {up + down} of {n} training knockdowns ({100 * share:.0f}%; up {up}, down {down})",
            share, direction)


def evidence_reasoning(stats, row, names: dict[str, str]) -> str:
    """Render prompts/teacher_evidence.j2 for one training triple (label-conditioned, leakage-safe)."""
    from .prompting import load_template

    ev = stats.evidence(row.cell_line, row.perturbation, row.gene)
    here, share, direction = _counts_phrase(ev.gene_counts_here, row.gene)
    other = "; ".join(f"in {names.get(c, c)}, {_counts_phrase(v, row.gene)[0]}"
                      for c, v in sorted(ev.gene_counts_other.items()))
    if ev.pert_counts_other:
        parts = []
        for c, v in sorted(ev.pert_counts_other.items()):
            n, de = int(v.sum()), int(v[0] + v[1])
            parts.append(f"in {names.get(c, c)} its knockdown changed {de} of {n} measured genes "
                         f"({100 * de / max(n, 1):.0f}%; up {int(v[0])}, down {int(v[1])})")
        pert_other = "; ".join(parts)
        breadth = max(float((v[0] + v[1]) / max(v.sum(), 1)) for v in ev.pert_counts_other.values())
        breadth_phrase = (f"{row.perturbation} knockdown has broad effects elsewhere, changing up to "
                          f"{100 * breadth:.0f}% of measured genes" if breadth >= 0.1 else
                          f"{row.perturbation} knockdown has narrow effects in the other lines measured")
    else:
        pert_other = f"{row.perturbation} knockdown was not measured in another training cell line"
        breadth_phrase = f"there is no measurement of {row.perturbation} knockdown in another line to go by"
    pair_other = "; ".join(f"in {names.get(c, c)}, {row.gene} was {lab}"
                           for c, lab in sorted(ev.pair_labels_other.items()))
    variables = {"perturbation": row.perturbation, "gene": row.gene,
                 "cell_name": names.get(row.cell_line, row.cell_line),
                 "label": row.label, "gene_here": here, "gene_other": other, "pert_other": pert_other,
                 "pair_other": pair_other, "pert_breadth_phrase": breadth_phrase, "gene_responsive": share >= 0.05,
                 "direction_agrees": direction == row.label}
    return format_answer(row.label, load_template(EVIDENCE_TEMPLATE).render(**variables))


def blind_answer(stats, row, sample_index: int) -> str:
    """The label-blind evidence teacher's answer: what the evidence alone suggests, never the label.

    Class probabilities = the mean of the gene prior and the cross-cell transfer score, divided by the global
    class rates (the balanced Bayes decision: rare changes are not drowned by "not DE"). Sample 0 takes the
    most likely class; later samples draw from these probabilities, seeded by the triple and sample index."""
    import hashlib

    import numpy as np
    import pandas as pd

    from .baselines import crosscell_probabilities, gene_prior_probabilities

    one = pd.DataFrame({"cell_line": [row.cell_line], "perturbation": [row.perturbation], "gene": [row.gene]})
    q = 0.5 * gene_prior_probabilities(stats, one)[0] + 0.5 * crosscell_probabilities(stats, one)[0][0]
    b = q / np.clip(stats.global_rate, 1e-9, None)
    b = b / b.sum()
    if sample_index == 0:
        return LABELS[int(np.argmax(b))]
    seed = int.from_bytes(hashlib.sha256(f"{row.id}#{sample_index}".encode()).digest()[:8], "little")
    return LABELS[int(np.random.default_rng(seed).choice(3, p=b))]


def evidence_backend(evidence, label_blind: bool = False):
    """The evidence teacher as a local backend; ``evidence.stats`` (built lazily) are the training counts.
    ``label_blind``: it reasons towards ``blind_answer`` instead of the observed label."""
    from .cells import all_cell_lines

    names = {k: v.name for k, v in all_cell_lines().items()}
    if not label_blind:
        return lambda req, i: evidence_reasoning(evidence.stats, req.context, names)

    def blind(req, i):
        row = req.context
        return evidence_reasoning(evidence.stats, row._replace(label=blind_answer(evidence.stats, row, i)), names)

    return blind


def rules_verdict(trace: TraceRecord, cfg: JudgeConfig) -> str:
    """A verdict in the LLM judge's reply format, so both go through the same parser and outputs."""
    from .cells import get_cell_line

    strict = parse_answer(trace.raw_text, STRICT)
    failures, soft = [], []
    if not strict.ok or not strict.has_reasoning:
        failures.append(f"format: {strict.error or 'no reasoning block'}")
    if trace.parsed_label != trace.label:
        failures.append(f"answer {trace.parsed_label or 'unparseable'} != label {trace.label}")
    reasoning = trace.reasoning or ""
    try:
        cell_names = {trace.cell_line.lower(), get_cell_line(trace.cell_line).name.lower()}
    except SynthpertError:
        cell_names = {trace.cell_line.lower()}
    low = reasoning.lower()
    for what, names in (("perturbation", {trace.perturbation.lower()}), ("gene", {trace.gene.lower()}),
                        ("cell line", cell_names)):
        if not any(re.search(rf"(?<![a-z0-9]){re.escape(n)}(?![a-z0-9])", low) for n in names):
            soft.append(f"does not mention the {what}")
    if len(reasoning) < cfg.min_chars:
        soft.append(f"reasoning shorter than {cfg.min_chars} characters ({len(reasoning)})")
    if len(reasoning) > cfg.max_chars:
        soft.append(f"reasoning longer than {cfg.max_chars} characters ({len(reasoning)})")
    if failures:
        return f"Rating: {TERRIBLE}\nJustification: " + "; ".join(failures + soft)
    if soft:
        return f"Rating: {BAD}\nJustification: " + "; ".join(soft)
    return (f"Rating: {GOOD}\nJustification: format ok, answer equals label, mentions both genes and the cell line, "
            f"{len(reasoning)} characters (rules heuristic: form only, not biology)")


def rules_backend(cfg: JudgeConfig):
    return lambda req, i: rules_verdict(req.context, cfg)
