"""Typed configs: pydantic models that load from YAML with ``key.sub=value`` overrides.

Every config-driven command uses the same three steps: read YAML, apply dotted overrides, validate. A
misspelt key is an error that names it and suggests the nearest valid key, instead of being ignored.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SynthpertError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SubsampleConfig(StrictModel):
    """How many examples to keep from one split. Deterministic for a given seed."""

    genes: int | None = Field(None, ge=1, description="first keep every row of this many randomly chosen readout "
                              "genes (so per-gene AUROC is measurable on a sample)")
    n: int | None = Field(None, ge=1, description="keep this many examples (after balancing)")
    fraction: float | None = Field(None, gt=0, le=1, description="keep this fraction of the split")
    balance: bool = Field(False, description="equal numbers per class (as far as the rarest class allows)")
    per_class_cap: int | None = Field(None, ge=1, description="at most this many examples of each class")

    @model_validator(mode="after")
    def _one_size(self):
        if self.n is not None and self.fraction is not None:
            raise ValueError("give either n or fraction, not both")
        return self


class ExtraCellLine(StrictModel):
    """A user's own screen in PerturbQA's CSV format: {key}-de.csv and {key}-dir.csv in `source`."""

    name: str | None = None
    description: str
    source: str | None = Field(None, description="directory holding this line's CSVs (default: data.source)")


class DataConfig(StrictModel):
    source: str | None = Field(
        None, description="directory with PerturbQA CSVs; default $SYNTHPERT_DATA, else the download cache")
    train_cells: list[str] = Field(default_factory=lambda: ["k562"], description="lines whose train split trains")
    test_cells: list[str] = Field(default_factory=lambda: ["k562"], description="lines whose test split is scored")
    protocol: str = Field(
        "split", description="'split': PerturbQA's own train/test columns everywhere; 'published': for unseen "
        "cell lines, every row of the training lines trains and every row of the test line is scored")
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of training PERTURBATIONS held out")
    seed: int = 0
    train_subsample: SubsampleConfig | None = None
    val_subsample: SubsampleConfig | None = None
    test_subsample: SubsampleConfig | None = None
    extra_cell_lines: dict[str, ExtraCellLine] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _protocol(self):
        if self.protocol not in ("split", "published"):
            raise ValueError(f"protocol must be 'split' or 'published', got {self.protocol!r}")
        if self.protocol == "published" and set(self.train_cells) & set(self.test_cells):
            raise ValueError("protocol 'published' is for unseen cell lines: test_cells must not be in train_cells")
        return self


def default_data_dir() -> Path:
    env = os.environ.get("SYNTHPERT_DATA")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "synthpert" / "perturbqa"


# ---------------------------------------------------------------------------------------------------------
# Loading


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['train.lora.r=16', 'data.train_cells=[k562,rpe1]'] -> nested dict. Values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SynthpertError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise SynthpertError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SynthpertError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        from .resources import resource_dir

        shipped = resource_dir("configs") / path.name
        if path.parent == Path(".") and shipped.exists():
            path = shipped  # `synthpert run quickstart.yaml` finds the shipped config from anywhere
        else:
            raise SynthpertError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SynthpertError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SynthpertError(f"{path}: the top level of a config must be a mapping")
    return data


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Follow a validation-error location down nested models to find the model that owns the bad key."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            continue  # dict keys / list indices
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                current = cand
                break
            for inner in getattr(cand, "__args__", ()):  # dict[str, Model], list[Model]
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    current = inner
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_validation_error(err: ValidationError, model: type[BaseModel], origin: str = "config") -> str:
    lines = [f"invalid {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            owner = _model_at(model, e["loc"])
            valid = list(owner.model_fields) if owner else []
            key = str(e["loc"][-1])
            guess = difflib.get_close_matches(key, valid, n=1) or difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
            listing = f"valid keys: {', '.join(valid)}" if valid else ""
            hint = f" (did you mean '{guess[0]}'? {listing})" if guess else (f" ({listing})" if listing else "")
            lines.append(f"  - unknown key '{loc}'{hint}")
        else:
            lines.append(f"  - {loc or '(top level)'}: {e['msg']}")
    return "\n".join(lines)


def validate_config(model: type[T], data: dict, origin: str = "config") -> T:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SynthpertError(format_validation_error(e, model, origin)) from None


def load_config(model: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    return validate_config(model, data, origin=str(path) if path else "config")


RUN_SECTIONS = ("data", "teacher", "judge", "train", "eval", "eval_sets", "serve")


def load_section(model: type[T], section: str, path: str | Path | None = None, overrides: list[str] | None = None,
                 flags: dict[str, Any] | None = None) -> T:
    """One stage's settings for a stage command: the YAML's ``section:`` (a run config), or the whole file when
    it holds only this stage's keys; then CLI flags (None = not given); then ``key=value`` overrides, with or
    without the section prefix (``lora.r=16`` and ``train.lora.r=16`` are the same)."""
    raw = read_yaml(path) if path else {}
    if isinstance(raw.get(section), dict) or section in raw:
        data = raw.get(section) or {}
    elif raw and not set(raw) & set(RUN_SECTIONS):
        data = raw
    else:
        data = {}
    for item in overrides or []:
        head = item.split("=", 1)[0].strip().split(".", 1)[0]
        if head in RUN_SECTIONS and head != section:
            raise SynthpertError(f"override {item!r} is for the '{head}' section; this command takes "
                                 f"{section} settings (e.g. {section}.KEY=VALUE or KEY=VALUE)")
    data = deep_merge(data, {k: v for k, v in (flags or {}).items() if v is not None})
    ov = parse_overrides(overrides)
    data = deep_merge(deep_merge(data, ov.pop(section, {}) or {}), ov)
    origin = f"{path} ({section} section)" if path else f"{section} settings"
    return validate_config(model, data, origin=origin)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
