"""Fetching PerturbQA's CSVs: download (or copy) each file, verify its size and SHA-256, write atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .config.data import default_data_dir
from .errors import SynthpertError
from .resources import resource_path, sha256_file


def checksums() -> dict:
    return json.loads(resource_path("data", "perturbqa_checksums.json").read_text())


def _verify(path: Path, expected: dict) -> str | None:
    """None if the file matches size and SHA-256, else a description of the mismatch."""
    size = path.stat().st_size
    if size != expected["size"]:
        return f"size {size} != expected {expected['size']}"
    digest = sha256_file(path)
    if digest != expected["sha256"]:
        return f"sha256 {digest[:12]}… != expected {expected['sha256'][:12]}…"
    return None


def fetch(dest: Path | None = None, from_dir: Path | None = None, timeout: float = 60.0,
          log=lambda line: None, base_url: str | None = None) -> Path:
    """Download (or copy from ``from_dir``) the eight PerturbQA CSVs into ``dest``, verifying each.

    ``base_url`` replaces the recorded GitHub location (a mirror). Files already present and verified are
    not fetched again. Writes are atomic (temp file + rename),
    so an interrupted fetch never leaves a truncated CSV behind.
    """
    dest = Path(dest or default_data_dir()).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    meta = checksums()
    for name, expected in meta["files"].items():
        target = dest / name
        if target.exists() and _verify(target, expected) is None:
            log(f"ok       {name} (already present, verified)")
            continue
        with tempfile.NamedTemporaryFile(dir=dest, prefix=f".{name}.", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            if from_dir is not None:
                src = Path(from_dir).expanduser() / name
                if not src.exists():
                    raise SynthpertError(f"{src} not found (--from must be a folder holding PerturbQA's CSVs)")
                shutil.copyfile(src, tmp_path)
                how = f"copied from {src}"
            else:
                url = f"{(base_url or meta['base_url']).rstrip('/')}/{name}"
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp_path, "wb") as f:
                        shutil.copyfileobj(r, f)
                except (urllib.error.URLError, OSError, TimeoutError) as e:
                    raise SynthpertError(
                        f"could not download {url} ({getattr(e, 'reason', e)}). On a machine without network, "
                        "copy the CSVs from elsewhere with `synthpert data fetch --from DIR`") from None
                how = f"downloaded from {url}"
            problem = _verify(tmp_path, expected)
            if problem:
                raise SynthpertError(f"{name} {how} failed verification: {problem}")
            tmp_path.replace(target)
            log(f"ok       {name} ({how})")
        finally:
            tmp_path.unlink(missing_ok=True)
    return dest
