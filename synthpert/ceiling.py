"""A screen's split-half noise ceiling, read from the summary `data from-anndata --split-half` wrote beside
its CSVs, so reports can show every predictor as a share of what a replicate of the screen reaches."""

from __future__ import annotations

import json

from .config.data import DataConfig
from .errors import SynthpertError

TASKS = ("de", "dir")


def screen_json_name(key: str) -> str:
    return f"{key}-screen.json"


def noise_ceilings(cfg: DataConfig) -> dict[str, dict]:
    """{test line: its split-half ceiling} for the test lines whose folder holds one (none for PerturbQA's)."""
    from .dataset import line_csvs

    out = {}
    for key in cfg.test_cells:
        try:
            folder = line_csvs(cfg, key)[0].parent
        except SynthpertError:  # no folder for this line at all: then it has no ceiling either
            continue
        path = folder / screen_json_name(key)
        if not path.is_file():
            continue
        try:
            half = json.loads(path.read_text()).get("split_half")
        except (OSError, ValueError):
            continue
        if half and half.get("ceiling"):
            out[key] = half["ceiling"]
    return out


def share_of_ceiling(value: float | None, ceiling: float | None) -> float | None:
    """How much of the above-chance range up to the ceiling a per-gene AUROC covers: (x - 0.5) / (c - 0.5)."""
    if value is None or ceiling is None or ceiling <= 0.5 or value != value:
        return None
    return (value - 0.5) / (ceiling - 0.5)


def ceiling_lines(ceilings: dict[str, dict], predictors: dict[str, dict]) -> list[str]:
    """Markdown lines: each line's ceiling, then each predictor's per-gene AUROC as a share of it.
    ``predictors`` maps a name to flat metrics (``auroc_de_per_gene``, ``auroc_dir_per_gene``)."""
    lines = []
    for key, c in ceilings.items():
        lines.append(f"Split-half noise ceiling of `{key}` (~{c['cells_per_perturbation_per_half']:.0f} cells per "
                     f"perturbation per half): per-gene AUROC DE {c['auroc_de_per_gene']:.3f}, direction "
                     f"{c['auroc_dir_per_gene']:.3f}; the two halves' calls agree on {c['agreement']:.1%} of pairs. "
                     "Share of ceiling = (AUROC − 0.5) / (ceiling − 0.5).")
        lines += ["", "| predictor | AUROC DE | share of ceiling | AUROC dir | share of ceiling |",
                  "|---|---|---|---|---|"]
        for name, m in predictors.items():
            cells = []
            for task in TASKS:
                x = m.get(f"auroc_{task}_per_gene")
                share = share_of_ceiling(x, c[f"auroc_{task}_per_gene"])
                cells += ["—" if x is None or x != x else f"{x:.3f}", "—" if share is None else f"{share:.0%}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
