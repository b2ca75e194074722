"""The base of every config section and the wording of validation errors: what the config modules, records
(schema.py) and loaders share. Kept apart from the loader (config/__init__.py), which imports the run config,
so that no config module imports its own package back."""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import SynthpertError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _nested_models(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(model class, is a mapping of them) for a field annotation such as Model, Model | None, dict[str, Model]."""
    for cand in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand, False
        for inner in getattr(cand, "__args__", ()):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner, True
    return None, False


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a config model accepts (nested sections included; mapping entries are not keys)."""
    keys = []
    for name, field in model.model_fields.items():
        sub, mapping = _nested_models(field.annotation)
        keys.append(prefix + name)
        if sub is not None and not mapping:
            keys += all_keys(sub, f"{prefix}{name}.")
    return keys


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Follow a validation-error location down nested models to find the model that owns the bad key."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            continue  # dict keys / list indices
        sub, _ = _nested_models(field.annotation)
        if sub is not None:
            current = sub
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _typed_key(loc: str, value: Any) -> str:
    """The dotted key as typed: an unknown section's single leaf is shown with it (``techer.mode``)."""
    while isinstance(value, dict) and len(value) == 1:
        (k, value), = value.items()
        loc = f"{loc}.{k}"
    return loc


_OWN_WORDS = {
    "missing": "is required",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "string_type": "must be text",
    "list_type": "must be a list, e.g. [a, b]",
    "dict_type": "must be a mapping of keys to values",
    "model_type": "must be a mapping of keys to values",
    "model_attributes_type": "must be a mapping of keys to values",
}


def _in_own_words(e: dict) -> str:
    """One problem as the toolkit words it (pydantic's "Value error, " and "Input should be" never show)."""
    kind, msg, ctx = e["type"], e["msg"], e.get("ctx") or {}
    if kind in _OWN_WORDS:
        text = _OWN_WORDS[kind]
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "?")
        text = f"must be {op} {bound}"
    elif kind == "literal_error":
        text = f"must be one of {ctx.get('expected', '')}".replace("'", "")
    elif kind in ("value_error", "assertion_error"):
        text = msg.split(", ", 1)[1] if ", " in msg else msg
    else:
        text = msg[:1].lower() + msg[1:]
        text = text.replace("input should be", "must be")
    if kind not in ("missing", "value_error", "assertion_error") and "input" in e and not isinstance(
            e["input"], dict):
        text += f" (got {e['input']!r})"
    return text


def describe_problems(err: ValidationError) -> list[str]:
    """Each problem as ``key: what is wrong`` in the toolkit's words (for records and files, not configs)."""
    return [f"{'.'.join(str(p) for p in e['loc']) or 'the record'}: "
            + ("unknown key" if e["type"] == "extra_forbidden" else _in_own_words(e)) for e in err.errors()]


def format_validation_error(err: ValidationError, model: type[BaseModel], origin: str = "config",
                            where=None, prefix: str = "", candidates: list[str] | None = None) -> str:
    """Every problem on its own line, naming the key and, with ``where(dotted_key)``, where it was set.
    ``prefix`` is the section the model sits in (shown on section-level problems); an unknown key is matched
    against its siblings first, then against every key in ``candidates`` (all sections' dotted keys)."""
    problems = err.errors()
    head = f"invalid settings in {origin}" if where is not None else f"invalid {origin}"
    lines = [f"{head}:" if len(problems) == 1 else f"{head} ({len(problems)} problems):"]
    for e in problems:
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            owner = _model_at(model, e["loc"])
            valid = list(owner.model_fields) if owner else []
            key = str(e["loc"][-1])
            typed = _typed_key(loc, e.get("input"))
            # A misspelt section (techer.mode) is matched whole against every key; a misspelt leaf first
            # against its siblings, then against every key (a setting put in the wrong section).
            guess = [] if typed != loc else difflib.get_close_matches(key, valid, n=1)
            if not guess and candidates:
                guess = difflib.get_close_matches(typed, candidates, n=1, cutoff=0.7)
                parent = loc.rsplit(".", 1)[0] + "." if "." in loc else ""
                if guess and parent and guess[0].startswith(parent) and "." not in guess[0][len(parent):]:
                    guess = [guess[0][len(parent):]]
            if not guess:
                guess = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
            listing = f"valid keys: {', '.join(valid)}" if valid else ""
            hint = f" (did you mean '{guess[0]}'? {listing})" if guess else (f" ({listing})" if listing else "")
            line = f"  - unknown key '{typed}'{hint}"
        else:
            name = loc or prefix or "the settings"
            line = f"  - {name}: {_in_own_words(e)}"
        if where is not None:
            line += f"; set {where(loc)}"
        lines.append(line)
    return "\n".join(lines)


def validate_config(model: type[T], data: dict, origin: str = "config", where=None, prefix: str = "",
                    candidates: list[str] | None = None) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SynthpertError(format_validation_error(e, model, origin, where, prefix, candidates)) from None
