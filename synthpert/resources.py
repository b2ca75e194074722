"""Find the files the package ships (prompts/, data/, configs/) and hash texts and files.

They live at the repository top level so they are easy to read and diff. A wheel carries copies under
``synthpert/_resources`` (see pyproject.toml); an editable install or a checkout reads the originals.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from .errors import SynthpertError

_PKG = Path(__file__).resolve().parent


@cache
def resource_dir(kind: str) -> Path:
    """Directory of a shipped resource kind: 'prompts', 'data' or 'configs'."""
    for candidate in (_PKG / "_resources" / kind, _PKG.parent / kind):
        if candidate.is_dir():
            return candidate
    raise SynthpertError(f"shipped resource folder '{kind}' not found next to the synthpert package at {_PKG}")


def resource_path(kind: str, name: str) -> Path:
    path = resource_dir(kind) / name
    if not path.exists():
        available = sorted(p.name for p in resource_dir(kind).iterdir())
        raise SynthpertError(f"no {kind} file named '{name}' (available: {', '.join(available)})")
    return path


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_file_into(h, path: Path, chunk: int = 1 << 20) -> None:
    """Feed a file to a hashlib object in chunks (the one place files are read for hashing)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()
