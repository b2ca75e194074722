"""Kept TraceRecords built from real PerturbQA rows, with a short templated reasoning (no teacher needed)."""

from __future__ import annotations

from pathlib import Path

from synthpert.dataset import load_built
from synthpert.schema import JudgeVerdict, TraceRecord, write_jsonl

REASONING = ("Knocking down {pert} in {cell} cells changes the programmes it controls. "
             "{gene} is the readout gene; its response follows from that.")


def synthetic_traces(built_dir: Path, split: str = "train") -> list[TraceRecord]:
    rows = load_built(built_dir, split).to_list()
    return [TraceRecord(
        id=f"{r['id']}#0", example_id=r["id"], cell_line=r["cell_line"], perturbation=r["perturbation"],
        gene=r["gene"], label=r["label"], teacher="synthetic",
        reasoning=REASONING.format(pert=r["perturbation"], cell=r["cell_line"].upper(), gene=r["gene"]),
        parsed_label=r["label"], judge=JudgeVerdict(judge="rules", rating="good"), kept=True,
    ) for r in rows]


def write_synthetic_traces(built_dir: Path, out: Path, split: str = "train") -> Path:
    write_jsonl(out, synthetic_traces(built_dir, split))
    return out
