"""What a `synthpert run` folder supplies to predict, serve, eval and decide: the base model, the adapter, the
training data (evidence context, priors, baselines, the validation split) and the run's own cell lines.

The folder knows all of them (``runs/NAME/{base_model,train,rl,data/train}`` and the manifests), so a user
who ran the quickstart never has to learn the three paths."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SynthpertError
from .runs import ADAPTER_MANIFEST, adapter_manifest, is_full_model


@dataclass(frozen=True)
class RunFolder:
    path: Path
    model: str  # base model folder (the run's tiny model) or hub id
    adapter: str  # the run's last adapter: rl/ when the run had an RL stage, else train/
    dataset: str | None  # the built training data: evidence context, priors, the validation split
    evidence: bool  # the adapter was trained with the evidence block in its prompt
    extra_cell_lines: dict = field(default_factory=dict)  # key -> {name, description, source}


def _existing(*candidates) -> str | None:
    """The first candidate that is an existing folder: the run folder's own copy first, since a manifest's
    paths are relative to wherever the run was started."""
    for c in candidates:
        if c and Path(c).is_dir():
            return str(c)
    return None


def read_run_folder(run_dir: str | Path) -> RunFolder:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SynthpertError(f"--run {run_dir}: folder does not exist")
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise SynthpertError(f"--run {run_dir}: no manifest.json, so not a folder `synthpert run` wrote "
                             "(for a single `synthpert train` folder use --model and --adapter)")
    try:
        config = json.loads(manifest_path.read_text()).get("config") or {}
    except json.JSONDecodeError as e:
        raise SynthpertError(f"{manifest_path} is not valid JSON ({e.msg})") from None
    rl = run_dir / "rl"
    adapter = rl if config.get("rl") is not None and (rl / ADAPTER_MANIFEST).exists() else run_dir / "train"
    if not (adapter / ADAPTER_MANIFEST).exists():
        raise SynthpertError(f"--run {run_dir}: no trained adapter yet ({adapter / ADAPTER_MANIFEST} is missing); "
                             "finish the run first (rerun `synthpert run` with its config: finished stages are "
                             "skipped)")
    am = adapter_manifest(adapter)
    recorded = am.get("base_model") or (config.get("train") or {}).get("base_model")
    model = _existing(run_dir / "base_model" if (run_dir / "base_model" / "config.json").exists() else None,
                      recorded) or recorded
    if not model:
        raise SynthpertError(f"--run {run_dir}: its manifests name no base model")
    dataset = _existing(run_dir / "data" / "train", (am.get("config") or {}).get("dataset_dir"))
    extra = (config.get("data") or {}).get("extra_cell_lines") or {}
    return RunFolder(run_dir, str(model), str(adapter), dataset, bool(am.get("evidence")), dict(extra))


def register_run_cell_lines(run: RunFolder) -> list[str]:
    """Make the run's own cell lines known in this process (so triples naming them parse); their keys."""
    from .cells import register_cell_line

    return [register_cell_line(k, v.get("name"), v.get("description") or "", v.get("source") or "").key
            for k, v in run.extra_cell_lines.items()]


def register_cell_lines_for(adapter: str | None = None, dataset: str | None = None) -> None:
    """Make known the own cell lines an adapter was trained on (its manifest) and those of the dataset that
    gives the evidence (its data_config.json), so predict and serve accept them."""
    from .cells import register_cell_line
    from .dataset import built_config

    for key, line in (adapter_manifest(adapter).get("extra_cell_lines") or {}).items():
        register_cell_line(key, line.get("name"), line.get("description") or "", line.get("source") or "")
    if dataset and any((f / "data_config.json").exists() for f in (Path(dataset), Path(dataset).parent)):
        built_config(Path(dataset))  # registers the lines it names; a missing one is reported where it is read


def resolve_model_paths(run: str | Path | None, model: str | None, adapter: str | None,
                        evidence_from: str | None) -> tuple[str, str | None, str | None, RunFolder | None]:
    """(model, adapter, evidence dataset, run) for predict / serve / eval / decide: what the command line
    names wins; ``--run`` fills the rest (the evidence dataset only for an adapter trained with it)."""
    folder = read_run_folder(run) if run is not None else None
    if folder is not None:
        register_run_cell_lines(folder)
        model = model or folder.model
        if adapter is None:
            adapter = folder.adapter
            if evidence_from is None and folder.evidence:
                evidence_from = folder.dataset
    if not model and is_full_model(adapter):
        model = adapter  # a train.method=full folder is the whole model: no base needed
    if not model:
        raise SynthpertError("give --model MODEL_DIR (with --adapter ADAPTER_DIR), or --run RUN_DIR (a folder "
                             "`synthpert run` wrote, e.g. runs/quickstart)")
    if evidence_from and not Path(evidence_from).exists():
        raise SynthpertError(f"--evidence-from {evidence_from}: folder does not exist")
    register_cell_lines_for(adapter, evidence_from)
    return model, adapter, evidence_from, folder


def own_cell_lines(dataset: str | None) -> dict:
    """The user's own cell lines of a built dataset, for the adapter's manifest: each with its prompt text and
    the folder its CSVs (and so its evidence) come from. {} without a dataset or own lines."""
    from .dataset import built_config

    if not dataset or not any((f / "data_config.json").exists() for f in (Path(dataset), Path(dataset).parent)):
        return {}
    cfg = built_config(Path(dataset))
    # never resolved against the disk here: this runs as training ends, and must not fail then
    source = lambda s: str(Path(s).expanduser().resolve()) if s else None  # noqa: E731
    return {key: {"name": line.name, "description": line.description,
                  "source": source(line.source or cfg.source), "evidence_dataset": str(Path(dataset).resolve())}
            for key, line in cfg.extra_cell_lines.items()}
