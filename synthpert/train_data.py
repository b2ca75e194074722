"""Training examples: kept traces (or a built dataset) -> student conversations, a held-out eval share, a hash.

Each example is a chat conversation: the student prompt (``prompting.student_messages``, never the label)
and the assistant turn = the kept trace in the answer format (or just the answer, ``mode: label_only``).
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from .answer import format_answer
from .config.train import TrainConfig
from .dataset import load_built
from .errors import SynthpertError
from .evidence import dataset_training_stats
from .lookup import evidence_blocks
from .prompting import student_messages
from .schema import TraceRecord, read_jsonl, write_jsonl


def _student_prompts(rows: list[dict], stats, lookup: bool = False) -> list[list[dict]]:
    """Every row's student prompt; the evidence blocks of all rows at once (the lookup scores a frame)."""
    frame = pd.DataFrame([{k: r[k] for k in ("cell_line", "perturbation", "gene")} for r in rows],
                         columns=["cell_line", "perturbation", "gene"])
    blocks = evidence_blocks(stats, frame, lookup)
    return [student_messages(r["cell_line"], r["perturbation"], r["gene"], e, r.get("task"))
            for r, e in zip(rows, blocks)]


def _multitask(rows: list[dict], explain_fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """Each trace row as two tasks: the label at once ("answer") and the trace ("explain"); the explain task
    for a seeded ``explain_fraction`` of the rows only."""
    n_explain = round(explain_fraction * len(rows))
    explain = set(random.Random(seed).sample(range(len(rows)), n_explain)) if n_explain < len(rows) else None
    out = []
    for i, r in enumerate(rows):
        out.append({**r, "task": "answer", "assistant": format_answer(r["label"])})
        if explain is None or i in explain:
            out.append({**r, "task": "explain"})
    return out


def _evidence_stats(cfg: TrainConfig, source: Path | None):
    """TrainingStats over the training rows named by the dataset folder's data_config.json."""

    folder = cfg.dataset_dir or (str(source) if cfg.mode == "label_only" and source else None)
    if folder is None:
        raise SynthpertError("evidence=true needs the built dataset the traces came from: set dataset_dir to the "
                             "`synthpert data build --out` folder (its data_config.json names the training rows)")
    return dataset_training_stats(folder)


def _trace_rows(path: Path, cfg: TrainConfig, skipped: Counter) -> list[dict]:
    rows = []
    for t in read_jsonl(path, TraceRecord):
        if cfg.only_kept and t.kept is not True:
            skipped["not kept by the judge" if t.kept is False else "not judged (kept is null)"] += 1
            continue
        if t.parsed_label is not None and t.parsed_label != t.label:
            skipped["answer differs from the label"] += 1  # never train on a wrong answer, kept or not
            continue
        if not t.reasoning or not t.reasoning.strip():
            skipped["no reasoning"] += 1
            continue
        rows.append({"example_id": t.example_id, "cell_line": t.cell_line, "perturbation": t.perturbation,
                     "gene": t.gene, "label": t.label, "assistant": t.assistant_text()})
    return rows


def _dataset_rows(path: Path, split: str) -> list[dict]:
    ds = load_built(path, split)
    return [{"example_id": r["id"], "cell_line": r["cell_line"], "perturbation": r["perturbation"],
             "gene": r["gene"], "label": r["label"], "assistant": format_answer(r["label"])}
            for r in ds.to_list()]


def contrast_first(rows: list[dict], seed: int = 0) -> tuple[list[dict], int]:
    """Rows reordered for ``curriculum: contrast_first``: the contrast groups' rows, then the rest, each part
    in seeded random order. A contrast group is a (cell line, gene, evidence fold) with both a changed and an
    unchanged knockdown among ``rows``: with the leakage rule its rows see the same gene-level evidence, so
    only the knockdown's evidence separates them. Returns (rows, how many open the order)."""
    from .answer import NOT_DE
    from .schema import perturbation_fold

    key = lambda r: (r["cell_line"], r["gene"], perturbation_fold(r["perturbation"]))  # noqa: E731
    kinds: dict[tuple, set[bool]] = {}
    for r in rows:
        kinds.setdefault(key(r), set()).add(r["label"] == NOT_DE)
    first = [r for r in rows if len(kinds[key(r)]) == 2]
    rest = [r for r in rows if len(kinds[key(r)]) == 1]
    rng = random.Random(seed)
    rng.shuffle(first)
    rng.shuffle(rest)
    return first + rest, len(first)


def _split_eval(rows: list[dict], fraction: float, max_n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole (cell line, perturbation) groups, so eval loss measures unseen knockdowns."""
    if fraction <= 0:
        return rows, []
    groups = sorted({(r["cell_line"], r["perturbation"]) for r in rows})
    if len(groups) < 2:
        return rows, []
    rng = random.Random(seed)
    held = set(rng.sample(groups, max(1, round(fraction * len(groups)))))
    train = [r for r in rows if (r["cell_line"], r["perturbation"]) not in held]
    ev = [r for r in rows if (r["cell_line"], r["perturbation"]) in held]
    return train, ev[:max_n]


def training_examples(cfg: TrainConfig, source) -> dict[str, Any]:
    """Training / eval conversations from a traces JSONL, a built dataset folder, or a list of TraceRecords.

    Returns {'train': rows, 'eval': rows, 'skipped': Counter, 'source': str}; each row has the triple,
    'prompt' (system + user messages) and 'assistant' (the target text).
    """
    skipped: Counter = Counter()
    src_path: Path | None = None
    if isinstance(source, (list, tuple)):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / "traces.jsonl"
            write_jsonl(tmp, source)
            rows = _trace_rows(tmp, cfg, skipped)
        eval_rows = None
        origin = f"{len(source)} in-memory traces"
    else:
        src_path = Path(source).expanduser()
        if not src_path.exists():
            raise SynthpertError(f"training data not found: {src_path}")
        if cfg.mode == "label_only":
            if not src_path.is_dir():
                raise SynthpertError(f"mode=label_only trains on a built dataset folder (`synthpert data build "
                                     f"--out`), but {src_path} is a file")
            rows = _dataset_rows(src_path, "train")
            eval_rows = _dataset_rows(src_path, "validation") if cfg.eval_fraction > 0 else []
        else:
            if src_path.is_dir():
                raise SynthpertError(f"mode={cfg.mode} trains on a kept-traces JSONL file, but {src_path} is a "
                                     "folder (for answer-only training on a built dataset set mode=label_only)")
            rows = _trace_rows(src_path, cfg, skipped)
            eval_rows = None
        origin = str(src_path)
    if not rows:
        detail = ", ".join(f"{n} {why}" for why, n in skipped.items()) or "the file is empty"
        hint = ("; run the judge first, or set only_kept=false to train on every trace whose answer matches "
                "its label") if skipped.get("not judged (kept is null)") else ""
        raise SynthpertError(f"no training examples in {origin} ({detail}){hint}")
    if cfg.max_examples and len(rows) > cfg.max_examples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(rows)), cfg.max_examples))
        skipped[f"over max_examples={cfg.max_examples}"] += len(rows) - len(keep)
        rows = [rows[i] for i in keep]
    if eval_rows is None:
        rows, eval_rows = _split_eval(rows, cfg.eval_fraction, cfg.eval_max_examples, cfg.seed)
    else:
        eval_rows = eval_rows[: cfg.eval_max_examples]
    if cfg.mode == "multitask":  # after the split: both tasks of a triple stay on the same side
        rows = _multitask(rows, cfg.explain_fraction, cfg.seed)
        eval_rows = _multitask(eval_rows, cfg.explain_fraction, cfg.seed)
    n_contrast = None
    if cfg.curriculum == "contrast_first":  # after the multitask expansion: a triple's two tasks share a phase
        rows, n_contrast = contrast_first(rows, cfg.seed)
        if n_contrast == 0:
            raise SynthpertError("curriculum=contrast_first found no contrast: no (cell line, gene, evidence fold) "
                                 "has both a changed and an unchanged knockdown among the training examples; draw "
                                 "some with data.train_subsample.gene_matched (e.g. 0.5)")
    stats = _evidence_stats(cfg, src_path) if cfg.evidence else None
    every = [*rows, *eval_rows]
    for r, prompt in zip(every, _student_prompts(every, stats, cfg.evidence_lookup)):
        r["prompt"] = prompt
    return {"train": rows, "eval": eval_rows, "skipped": skipped, "source": origin, "n_contrast": n_contrast}


def data_hash(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["prompt"], r["assistant"]], sort_keys=True).encode())
    return h.hexdigest()
