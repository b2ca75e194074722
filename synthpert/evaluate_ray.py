"""`eval.engine: ray`: the examples still to predict as a Ray Dataset, scored by a pool of actors.

Each actor builds synthpert's own backend once (``make_backend`` + ``Predictor``, exactly what the in-process
path runs) and turns a batch of rows into Prediction records; the records stream back to this process,
which appends them to the same ``predictions.jsonl`` as they arrive. A rerun skips what was written, so a
run whose workers died finishes only the missing pairs. On GPUs the same actors hold a vLLM (or
transformers) engine each, one per GPU (``eval.ray.gpus_per_worker: 1``): that is how
``inference.data_parallel_size`` runs, since vLLM's offline engine refuses data parallelism in one process.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd

from .config.evaluate import EvalConfig, InferenceConfig
from .errors import SynthpertError

log = logging.getLogger("synthpert.evaluate")

RAY_MISSING = ("eval.engine ray needs Ray: `pip install 'synthpert[ray]'` (or use eval.engine local, the "
               "default)")
COLUMNS = ["id", "cell_line", "perturbation", "gene", "label", "evidence"]


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data needs pandas/pyarrow, which synthpert already has)
    except ImportError:
        raise SynthpertError(RAY_MISSING) from None
    return ray


class Scorer:
    """The actor: one backend, built once, predicting each batch of rows as the in-process path does."""

    def __init__(self, inference: dict):
        from .backends import make_backend
        from .inference import Predictor

        # One engine per actor: the actor pool is the data parallelism.
        cfg = InferenceConfig.model_validate({**inference, "data_parallel_size": 1})
        self.predictor = Predictor(make_backend(cfg))
        self.pid = os.getpid()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from .inference import Triple

        triples = [Triple(r.id, r.cell_line, r.perturbation, r.gene, r.label, r.evidence or None)
                   for r in batch.itertuples()]
        start = time.time()  # wall clock: the driver compares batches of different actors
        records = self.predictor.predict(triples)
        n = len(records)
        return pd.DataFrame({"record": [r.model_dump_json() for r in records], "worker": [self.pid] * n,
                             "started": [start] * n, "ended": [time.time()] * n})


def start_ray(cfg: EvalConfig):
    """Connect to ``eval.ray.address``, or start a local instance sized for the pool. Returns (ray, started):
    a Ray this process did not start (a test's, a notebook's) is left running."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    # the CLI owns the terminal: Ray's start-up notices and its workers' output stay in Ray's log files
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, **quiet)
        else:
            workers = cfg.ray_workers()
            ray.init(num_cpus=max(1, round(workers * cfg.ray.cpus_per_worker)),
                     num_gpus=int(workers * cfg.ray.gpus_per_worker) or None, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = cfg.ray.address or "a local instance"
        raise SynthpertError(f"could not start Ray ({where}): {str(e).splitlines()[0] if str(e) else e}") from None
    return ray, True


def rows_of(todo: pd.DataFrame, evidence: list[str | None]) -> pd.DataFrame:
    """The Dataset's rows: what a Triple needs (the evidence text is built here, where the statistics are)."""
    rows = todo[COLUMNS[:-1]].reset_index(drop=True).copy()
    rows["evidence"] = [e or "" for e in evidence]
    return rows


def score_on_ray(cfg: EvalConfig, rows: pd.DataFrame, inference: InferenceConfig, on_records) -> dict:
    """Score ``rows`` on the actor pool; ``on_records(list[str])`` receives each finished block of JSON records
    as it arrives. Returns the engine's statistics (workers used, setup and scoring seconds)."""
    t0 = time.perf_counter()
    ray, started = start_ray(cfg)
    setup = time.perf_counter() - t0
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws the only progress bar
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    size = cfg.ray.batch_size or cfg.chunk_size
    # one block per batch: blocks are what the pool hands out, so a single block would keep one actor busy
    blocks = [rows.iloc[i:i + size] for i in range(0, len(rows), size)]
    workers = min(cfg.ray_workers(), len(blocks))  # an actor with no block would load the model for nothing
    ds = ray.data.from_pandas(blocks).map_batches(
        Scorer, fn_constructor_kwargs={"inference": inference.model_dump(mode="json")}, batch_format="pandas",
        batch_size=size, compute=ActorPoolStrategy(size=workers),
        num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker or None)
    pids: set[int] = set()
    n = 0
    t1 = time.perf_counter()
    first, first_rows, started, ended = None, 0, float("inf"), 0.0
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pandas"):
            if first is None:
                first, first_rows = time.perf_counter() - t1, len(block)
            on_records(list(block["record"]))
            pids |= set(int(p) for p in block["worker"])
            if len(block):
                started, ended = min(started, float(block["started"].min())), max(ended, float(block["ended"].max()))
            n += len(block)
    except ray.exceptions.RayError as e:
        raise SynthpertError(f"the Ray evaluation stopped: {_cause(e)}; the {n} predictions received are kept, "
                             "rerun to finish the rest") from None
    finally:
        if started:
            ray.shutdown()
    return {"engine": "ray", "workers": workers, "workers_used": len(pids), "predicted": n,
            "address": cfg.ray.address or "local", "setup_s": round(setup, 2),
            "scoring_s": round(time.perf_counter() - t1, 2), "first_result_s": round(first or 0.0, 2),
            "first_result_rows": first_rows,
            # from the first batch an actor began to the last it finished: scoring without start-up
            "scoring_span_s": round(ended - started, 2) if n else 0.0}


def _cause(e: Exception) -> str:
    """The user's error inside Ray's wrapping (a missing model folder raised in an actor, say)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, SynthpertError):
        return str(cause)
    text = str(cause or e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def check_local_paths(cfg: EvalConfig) -> None:
    """Fail before Ray starts when the model or adapter folder is missing. Only for a local instance: its
    actors see this machine's files; on a cluster the folders must exist at the same path on every node."""
    if cfg.ray.address:
        return
    for what, p in (("model", cfg.inference.model), ("adapter", cfg.inference.adapter)):
        if p and not Path(p).expanduser().is_dir():
            raise SynthpertError(f"{what} folder {p} does not exist")


def ray_backend_info(inf: InferenceConfig) -> dict:
    """What ``Backend.describe()`` records, without loading the model here (the actors load it)."""
    from .backends import adapter_version, model_folder
    from .resources import sha256_text
    from .tokenizer import load_tokenizer, tokenizer_dir

    info = {"backend": inf.backend, "model": inf.model, "adapter": inf.adapter,
            "adapter_version": adapter_version(inf.adapter) if inf.adapter else None, "engine": "ray"}
    try:
        model = model_folder(inf.model)
        tok = load_tokenizer(tokenizer_dir(model, Path(inf.adapter) if inf.adapter else None))
        template = getattr(tok, "chat_template", None)
        info["chat_template_sha256"] = sha256_text(template) if isinstance(template, str) else None
    except SynthpertError:  # a cluster path this machine cannot see
        info["chat_template_sha256"] = None
    return info
