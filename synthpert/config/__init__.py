"""Loading configs: one ``load_section`` reads YAML, applies flags and ``key.sub=value`` overrides, validates.

Every config-driven command uses the same three steps: read YAML, apply dotted overrides, validate. A
misspelt key is an error that names it and suggests the nearest valid key, instead of being ignored.
Each stage's settings are a pydantic model in this package (``config.data``, ``config.client``,
``config.teacher``, ``config.train``, ``config.evaluate``, ``config.serve``, ``config.run``), so cross-field
checks run when a config loads, before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ..errors import SynthpertError
from .base import (StrictModel, T, _model_at, _nested_models, all_keys, describe_problems,  # noqa: F401
                   format_validation_error, validate_config)


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


REPLACE_KEY = "_replace"  # in a mapping of a config file: `_replace: true` replaces the mapping below it


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` on top of ``base``, mappings merged key by key, except a mapping marked ``_replace: true``,
    which replaces the one below it (e.g. a --merge file's eval_sets instead of the base config's)."""
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and v.get(REPLACE_KEY) is True:
            merged[k] = {kk: vv for kk, vv in v.items() if kk != REPLACE_KEY}
        elif isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def find_config(path: str | Path) -> Path:
    """The config file ``path`` names: as given (relative to the working directory), else the shipped one of
    that name in the repository's configs/ folder, so ``-c configs/x.yaml`` and ``x.yaml`` work from anywhere."""
    path = Path(path).expanduser()
    if path.exists():
        return path
    from ..resources import resource_dir

    shipped_root = resource_dir("configs")
    rel = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    if not path.is_absolute() and (shipped_root / rel).is_file():
        return shipped_root / rel
    raise SynthpertError(f"config file not found: {path} (looked in the working directory and in "
                         f"{shipped_root})")


def read_yaml(path: str | Path) -> dict:
    path = find_config(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SynthpertError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SynthpertError(f"{path}: the top level of a config must be a mapping")
    return data


# ---------------------------------------------------------------------------------------------------------
# Paths inside configs
#
# A field declared with ``json_schema_extra={"path": KIND}`` holds a path. Written in a YAML file, a relative
# one means "next to this file" (a config is moved together with what it points to); given on the command
# line, it means "from the working directory", as every shell argument does. KIND "model" may also be a hub
# id (org/name), so it is resolved only when it looks local (see looks_local).


def _path_kind(model: type[BaseModel], key: str) -> str | None:
    field = model.model_fields.get(key)
    extra = field.json_schema_extra if field is not None else None
    return extra.get("path") if isinstance(extra, dict) else None


def looks_local(value: str, *roots: Path) -> bool:
    """Whether a model name is a folder rather than a hub id. Hub ids are ``name`` or ``org/name``; anything
    starting with ``.``, ``/`` or ``~``, with two or more ``/`` or a backslash, or whose first component is a
    folder in one of ``roots`` (``runs/`` exists, so ``runs/tiny_model`` is a path) is local."""
    if value.startswith((".", "/", "~")) or value.count("/") >= 2 or "\\" in value or value.endswith("/"):
        return True
    head = value.split("/", 1)[0]
    return "/" in value and any((root / head).is_dir() for root in roots)


def resolve_paths(model: type[BaseModel], data: dict, base: Path) -> dict:
    """``data`` (read from a file in folder ``base``) with its relative path fields made relative to ``base``."""
    out = dict(data)
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        kind = _path_kind(model, key)
        if kind and isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            if kind not in ("model", "name_or_path") or looks_local(value, base) or (base / value).exists():
                out[key] = str((base / value).resolve())
            continue
        sub, mapping = _nested_models(field.annotation)
        if sub is None or not isinstance(value, dict):
            continue
        if mapping:
            out[key] = {k: resolve_paths(sub, v, base) if isinstance(v, dict) else v for k, v in value.items()}
        else:
            out[key] = resolve_paths(sub, value, base)
    return out


def check_model_folders(cfg: BaseModel, where) -> None:
    """A local-looking model name that is not a folder is an error now, not after the hub's retries.
    ``where(dotted_key)`` says where the value came from."""
    def walk(obj: BaseModel, prefix: str) -> None:
        for key in type(obj).model_fields:
            value = getattr(obj, key)
            dotted = f"{prefix}{key}"
            if isinstance(value, BaseModel):
                walk(value, dotted + ".")
            # "tiny" is the run config's word for the model the pipeline builds inside the run (pipeline.TINY)
            elif _path_kind(type(obj), key) == "model" and isinstance(value, str) and value != "tiny":
                if getattr(obj, "backend", None) == "openai":
                    continue  # a model NAME at an API endpoint
                from ..models import check_shipped, shipped_model

                if shipped_model(value) is not None:
                    check_shipped(value)  # its package must be installed (the error gives the pip command)
                    continue
                folder = Path(value).expanduser()
                if folder.is_dir() or not looks_local(value, Path.cwd()):
                    continue
                raise SynthpertError(f"{dotted}: no folder {value} (set {where(dotted)}). Give an existing "
                                     "model folder (e.g. one written by `synthpert model tiny --out DIR`) or a "
                                     "hub id such as org/name")
    walk(cfg, "")


# ---------------------------------------------------------------------------------------------------------
# Validation errors in the toolkit's words


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


def _has(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split(".") if dotted else []:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _where(files: list[tuple[str, dict]], cli: dict):
    """``where(dotted_key)``: 'on the command line' when a flag or override set it, else the file that did.
    Problems of a whole section are put on the command line only when the file did not touch it."""
    def where(dotted: str) -> str:
        if dotted and _has(cli, dotted):
            return "on the command line"
        for name, tree in reversed(files):
            if _has(tree, dotted) and (dotted or tree):
                return f"in {name}"
        return "on the command line" if cli else (f"in {files[-1][0]}" if files else "by default")
    return where


def _run_keys() -> list[str]:
    from .run import RunConfig

    return all_keys(RunConfig)


def load_section(model: type[T], section: str | None, path: str | Path | None = None,
                 overrides: list[str] | None = None, flags: dict[str, Any] | None = None,
                 merge: list[str | Path] | None = None) -> T:
    """One config for a command: the YAML's ``section:`` (a run config), or the whole file when it holds only
    this stage's keys; then CLI flags (dotted keys allowed; None = not given); then ``key=value`` overrides,
    with or without the section prefix (``lora.r=16`` and ``train.lora.r=16`` are the same).

    ``section=None``: the whole file is the model (a run config); each ``merge`` file's sections go on top of
    it (e.g. teacher_openai.yaml's teacher and judge), then the flags and overrides at its top level.

    Relative paths written in a file are taken relative to that file's folder; those on the command line,
    relative to the working directory. Errors say which of the two set the bad value."""
    if section is None:
        files: list[tuple[str, dict]] = []
        for f in ([path] if path else []) + list(merge or []):
            found = find_config(f)
            files.append((str(f), resolve_paths(model, read_yaml(found), found.parent)))
        raw: dict = {}
        for _, tree in files:
            raw = deep_merge(raw, tree)
        cli = deep_merge(nest(flags or {}), parse_overrides(overrides))
        origin = " + ".join([name for name, _ in files] + (["the command line"] if cli else [])) or "the defaults"
        cfg = validate_config(model, deep_merge(raw, cli), origin=origin, where=_where(files, cli),
                              candidates=all_keys(model))
        check_model_folders(cfg, _where(files, cli))
        return cfg
    raw = {}
    if path:
        found = find_config(path)
        raw = read_yaml(found)
    if section in raw:
        data = raw[section] if raw[section] is not None else {}
        if not isinstance(data, dict):
            raise SynthpertError(f"{path}: the '{section}' section must be a mapping of settings, found "
                                 f"{type(data).__name__} {data!r:.60}")
    elif raw and not set(raw) & set(RUN_SECTIONS):
        data = raw
    else:
        data = {}
    if path and isinstance(data, dict):
        data = resolve_paths(model, data, found.parent)
    for item in overrides or []:
        head = item.split("=", 1)[0].strip().split(".", 1)[0]
        if head in RUN_SECTIONS and head != section:
            raise SynthpertError(f"override {item!r} is for the '{head}' section; this command takes "
                                 f"{section} settings (e.g. {section}.KEY=VALUE or KEY=VALUE)")
    ov = parse_overrides(overrides)
    cli = deep_merge(nest(flags or {}), deep_merge(ov.pop(section, {}) or {}, ov))
    files = [(f"{path}'s {section} section", data)] if path else []
    where = _where(files, cli)
    origin = " + ".join([name for name, _ in files] + (["the command line"] if cli else [])) or "the defaults"
    own = all_keys(model)
    others = [k for k in _run_keys() if not k.startswith(f"{section}.")]
    cfg = validate_config(model, deep_merge(data, cli), origin=origin, where=where, prefix=section,
                          candidates=own + [f"{section}.{k}" for k in own] + others)
    check_model_folders(cfg, lambda k: where(k))
    return cfg


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
