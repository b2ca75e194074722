"""Loading configs: one ``load_section`` reads YAML, applies flags and ``key.sub=value`` overrides, validates.

Every config-driven command uses the same three steps: read YAML, apply dotted overrides, validate. A
misspelt key is an error that names it and suggests the nearest valid key, instead of being ignored.
Each stage's settings are a pydantic model in this package (``config.data``, ``config.client``,
``config.teacher``, ``config.train``, ``config.evaluate``, ``config.serve``, ``config.run``), so cross-field
checks run when a config loads, before any work starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import SynthpertError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
        from ..resources import resource_dir

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


# Top-level sections of a run config (config.run.RunConfig) that hold one stage's settings.
RUN_SECTIONS = ("data", "teacher", "judge", "train", "eval", "eval_sets")


def nest(flags: dict[str, Any]) -> dict[str, Any]:
    """{'inference.model': 'm', 'n': 3} -> {'inference': {'model': 'm'}, 'n': 3}; None values (a flag not
    given) are dropped."""
    out: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_section(model: type[T], section: str | None, path: str | Path | None = None,
                 overrides: list[str] | None = None, flags: dict[str, Any] | None = None,
                 merge: list[str | Path] | None = None) -> T:
    """One config for a command: the YAML's ``section:`` (a run config), or the whole file when it holds only
    this stage's keys; then CLI flags (dotted keys allowed; None = not given); then ``key=value`` overrides,
    with or without the section prefix (``lora.r=16`` and ``train.lora.r=16`` are the same).

    ``section=None``: the whole file is the model (a run config); each ``merge`` file's sections go on top of
    it (e.g. teacher_openai.yaml's teacher and judge), then the flags and overrides at its top level."""
    raw = read_yaml(path) if path else {}
    if section is None:
        origin = str(path) if path else "config"
        for extra in merge or []:
            raw = deep_merge(raw, read_yaml(extra))
            origin += f" + {extra}"
        data = deep_merge(deep_merge(raw, nest(flags or {})), parse_overrides(overrides))
        return validate_config(model, data, origin=origin)
    if section in raw:
        data = raw[section] if raw[section] is not None else {}
        if not isinstance(data, dict):
            raise SynthpertError(f"{path}: the '{section}' section must be a mapping of settings, found "
                                 f"{type(data).__name__} {data!r:.60}")
    elif raw and not set(raw) & set(RUN_SECTIONS):
        data = raw
    else:
        data = {}
    for item in overrides or []:
        head = item.split("=", 1)[0].strip().split(".", 1)[0]
        if head in RUN_SECTIONS and head != section:
            raise SynthpertError(f"override {item!r} is for the '{head}' section; this command takes "
                                 f"{section} settings (e.g. {section}.KEY=VALUE or KEY=VALUE)")
    data = deep_merge(data, nest(flags or {}))
    ov = parse_overrides(overrides)
    data = deep_merge(deep_merge(data, ov.pop(section, {}) or {}), ov)
    origin = f"{path} ({section} section)" if path else f"{section} settings"
    return validate_config(model, data, origin=origin)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
