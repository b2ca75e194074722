"""Cell-line registry: the four PerturbQA lines ship in data/cell_lines.yaml; users add their own screens."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import yaml

from .errors import SynthpertError
from .resources import resource_path


@dataclass(frozen=True)
class CellLine:
    key: str  # lower-case identifier used in file names and ids ("k562")
    name: str  # display name used in prompts ("K562")
    description: str
    source: str = ""


@lru_cache(maxsize=1)
def builtin_cell_lines() -> dict[str, CellLine]:
    raw = yaml.safe_load(resource_path("data", "cell_lines.yaml").read_text())
    return {k: CellLine(key=k, **v) for k, v in raw.items()}


_extra: dict[str, CellLine] = {}


def register_cell_line(key: str, name: str | None = None, description: str = "", source: str = "") -> CellLine:
    """Add a user's own screen (e.g. from config). Its CSVs must follow the PerturbQA format."""
    key = key.strip().lower()
    if not key or not key.replace("_", "").replace("-", "").isalnum():
        raise SynthpertError(f"invalid cell-line key {key!r}: use letters, digits, '-' or '_'")
    if not description.strip():
        raise SynthpertError(f"cell line '{key}' needs a description (it is what the prompts tell the model)")
    line = CellLine(key=key, name=name or key, description=description.strip(), source=source)
    _extra[key] = line
    return line


def all_cell_lines() -> dict[str, CellLine]:
    return {**builtin_cell_lines(), **_extra}


def get_cell_line(key: str) -> CellLine:
    lines = all_cell_lines()
    k = key.strip().lower()
    if k not in lines:
        raise SynthpertError(f"unknown cell line {key!r}; available: {', '.join(sorted(lines))} (your own "
                             "screen: add it under data.extra_cell_lines in the config and train on it; predict "
                             "and serve then know it from --run RUN_DIR, or from the adapter trained on it)")
    return lines[k]


def parse_cell_list(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """'k562, RPE1' -> ['k562', 'rpe1'], each checked against the registry."""
    items = value.split(",") if isinstance(value, str) else list(value)
    keys = [get_cell_line(v).key for v in (i.strip() for i in items) if v]
    if not keys:
        raise SynthpertError("empty list of cell lines")
    if len(set(keys)) != len(keys):
        raise SynthpertError(f"cell line listed twice in {items}")
    return keys
