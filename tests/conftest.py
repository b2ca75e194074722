"""Session-wide fixtures shared by the stage tests.

* ``perturbqa_dir``: the PerturbQA CSVs (env SYNTHPERT_TEST_DATA, default ../shared/data/perturbqa).
* ``tiny_model_dir``: the tiny offline model (`synthpert model tiny`), built once per session.
* ``tiny_adapter_dir``: a LoRA run folder written by `synthpert train`'s code path (adapter + tokenizer +
  chat template + manifest), trained for a few seconds on traces built from real PerturbQA rows.
* ``real_model_dir``: SmolLM2-135M-Instruct imported by `synthpert model import`, once per test run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _cell_line_registry():
    """A user's line registered by one test (process-global, as a config's extra_cell_lines is in a run)
    must not be seen by the next."""
    from synthpert import cells

    before = dict(cells._extra)
    yield
    cells._extra.clear()
    cells._extra.update(before)


@pytest.fixture(scope="session")
def perturbqa_dir() -> Path:
    path = Path(os.environ.get("SYNTHPERT_TEST_DATA",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "perturbqa"))
    if not (path / "k562-de.csv").exists():
        pytest.fail(f"PerturbQA CSVs not found in {path}; set SYNTHPERT_TEST_DATA to the folder holding them")
    return path


REAL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory) -> Path:
    """`synthpert model import smollm2-135m-instruct --out CACHE/smollm2-135m-instruct`, as a user runs it, into
    a cache made for this test run, which SYNTHPERT_MODEL_CACHE then names: the short name resolves to this
    import, nothing older. The real-model test files run on different xdist workers; they share the cache (the
    first imports under a lock, the other waits for it) rather than converting twice."""
    import json

    from filelock import FileLock

    from _procs import communicate, synthpert_process

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, shared by its workers (a serial run's parent outlives the run)
    cache = root / "real_model_cache"
    out = cache / REAL_MODEL
    before = os.environ.get("SYNTHPERT_MODEL_CACHE")
    with FileLock(str(root / "real_model_import.lock")):
        if not out.is_dir():
            proc = synthpert_process("model", "import", REAL_MODEL, "--out", out, "--json",
                                     env={"SYNTHPERT_MODEL_CACHE": str(cache)})
            stdout, stderr = communicate(proc, timeout=300)
            assert proc.returncode == 0, stderr[-3000:]
            assert json.loads(stdout)["shipped_name"] == REAL_MODEL
    os.environ["SYNTHPERT_MODEL_CACHE"] = str(cache)
    yield out
    if before is None:
        os.environ.pop("SYNTHPERT_MODEL_CACHE", None)
    else:
        os.environ["SYNTHPERT_MODEL_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, perturbqa_dir) -> Path:
    from synthpert.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", source=perturbqa_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_built_dataset(tmp_path_factory, perturbqa_dir) -> Path:
    """A small K562 dataset built by `synthpert data build`'s code path (balanced subsamples)."""
    from synthpert.config.data import DataConfig
    from synthpert.data import build

    cfg = DataConfig(source=str(perturbqa_dir), train_cells=["k562"], test_cells=["k562"], seed=0,
                     train_subsample={"n": 96, "balance": True}, val_subsample={"n": 24, "balance": True},
                     test_subsample={"n": 48, "balance": True})
    out = tmp_path_factory.mktemp("built") / "k562"
    build(cfg, out)
    return out


@pytest.fixture(scope="session")
def tiny_traces_path(tmp_path_factory, tiny_built_dataset) -> Path:
    """Kept traces (TraceRecord JSONL) for the built training rows, with a short templated reasoning."""
    from _traces import write_synthetic_traces

    return write_synthetic_traces(tiny_built_dataset, tmp_path_factory.mktemp("traces") / "kept.jsonl")


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory, tiny_model_dir, tiny_traces_path) -> Path:
    """Run folder of a short LoRA training on the tiny model; loads with PeftModel.from_pretrained(base, dir)."""
    from synthpert.config.train import TrainConfig
    from synthpert.train import run_train

    cfg = TrainConfig.model_validate({
        "base_model": str(tiny_model_dir), "max_length": 512, "seed": 0, "eval_fraction": 0.1,
        "max_examples": 48, "logging_steps": 3, "lora": {"r": 16, "alpha": 32},
        "optim": {"lr": 1e-2, "epochs": 3, "batch_size": 8, "grad_accum": 1, "warmup": 0.0},
    })
    out = tmp_path_factory.mktemp("adapter") / "run"
    run_train(cfg, tiny_traces_path, out)
    return out
