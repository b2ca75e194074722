"""The data stage: build three-class examples and splits from PerturbQA lines (read by dataset.py, which every
stage shares) and write the dataset folder.

Label rule: ``not differentially expressed`` when the ``-de`` label is 0, else ``upregulated`` /
``downregulated`` from the ``-dir`` label (1 = increase, 0 = decrease).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .answer import LABELS
from .baselines import baseline_report
from .ceiling import noise_ceilings
from .cells import get_cell_line
from .config.data import DataConfig
from .errors import SynthpertError
from .evidence import training_stats
from .sampling import subsample
from .dataset import (CellData, EXAMPLE_COLUMNS, _rows_of, load_lines, setting_name, source_for_lines, training_rows)


def _int_keys(frames: list[pd.DataFrame], keys: list[str]) -> list[np.ndarray]:
    """Encode the ``keys`` columns of several frames as one int64 per row, consistently across frames
    (np.isin on ints is orders of magnitude faster than isin on pandas' Arrow strings)."""
    code = [np.zeros(len(f), dtype=np.int64) for f in frames]
    for key in keys:
        values = np.concatenate([f[key].to_numpy(dtype=object) for f in frames])
        codes, uniques = pd.factorize(values)
        bounds = np.cumsum([0] + [len(f) for f in frames])
        code = [c * (len(uniques) + 1) + codes[bounds[i]:bounds[i + 1]] for i, c in enumerate(code)]
    return code


def _lines_where(df: pd.DataFrame, train_parts: dict[str, pd.DataFrame], keys: list[str]) -> list[list[str]]:
    """For each row, the training lines (other than its own) whose rows contain the row's ``keys`` values."""
    names = list(train_parts)
    row_keys, *part_keys = _int_keys([df, *train_parts.values()], keys)
    own = df["cell_line"].to_numpy(dtype=object)
    code = np.zeros(len(df), dtype=np.int64)
    for bit, (name, pk) in enumerate(zip(names, part_keys)):
        mask = np.isin(row_keys, pk) & (own != name)
        code |= mask.astype(np.int64) << bit
    patterns = {c: [n for b, n in enumerate(names) if c >> b & 1] for c in np.unique(code)}
    return [list(patterns[c]) for c in code]


def _annotate_seen(df: pd.DataFrame, train_parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Add the training lines (other than the example's own) where its perturbation / pair was measured."""
    df = df.copy()
    df["pert_seen_in_train_lines"] = _lines_where(df, train_parts, ["perturbation"])
    df["pair_seen_in_train_lines"] = _lines_where(df, train_parts, ["perturbation", "gene"])
    return df


def _val_perturbations(train: pd.DataFrame, fraction: float, seed: int) -> set[tuple[str, str]]:
    """Hold out whole perturbations (per cell line), as PerturbQA's test split does."""
    if fraction <= 0:
        return set()
    rng = np.random.default_rng(seed)
    held: set[tuple[str, str]] = set()
    for cell, part in train.groupby("cell_line", sort=True):
        perts = np.array(sorted(part["perturbation"].unique()))
        n = int(round(fraction * len(perts)))
        if n:
            held.update((cell, p) for p in rng.choice(perts, size=n, replace=False))
    return held


def _in_example_folds(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows whose perturbation lies in an example fold (data.disjoint_evidence; evidence.py says why)."""
    from .schema import EXAMPLE_FOLDS, perturbation_fold

    folds = {p: perturbation_fold(p) for p in rows["perturbation"].unique().tolist()}
    return rows[rows["perturbation"].map(folds).isin(EXAMPLE_FOLDS)]


def build_frames(cfg: DataConfig, lines: dict[str, CellData] | None = None) -> dict[str, pd.DataFrame]:
    """Return {'train', 'validation', 'test'} DataFrames of examples (columns EXAMPLE_COLUMNS)."""
    setting = setting_name(cfg)
    lines = lines or load_lines(cfg)
    test_cells = [get_cell_line(k).key for k in cfg.test_cells]
    train = training_rows(cfg, lines)
    test = pd.concat([_rows_of(lines[k], "test", cfg.protocol) for k in test_cells], ignore_index=True)
    if setting != "unseen-cell-published":
        test_key, train_key = _int_keys([test, train], ["cell_line", "perturbation"])
        clash = np.isin(test_key, train_key)
        overlap = set(zip(test.cell_line[clash], test.perturbation[clash]))
        if overlap:  # PerturbQA splits by perturbation; a user's CSV might not
            raise SynthpertError(f"{len(overlap)} test perturbation(s) also occur in training rows of the same "
                                 f"line, e.g. {sorted(overlap)[0]}: the split must be by perturbation")
    held = _val_perturbations(train, cfg.val_fraction, cfg.seed)
    held_frame = pd.DataFrame(sorted(held), columns=["cell_line", "perturbation"])
    train_key, held_key = _int_keys([train, held_frame], ["cell_line", "perturbation"])
    is_val = np.isin(train_key, held_key)
    val, train = train[is_val], train[~is_val]
    # "Seen" is measured against what a model actually trains on (train minus validation).
    seen_basis = {get_cell_line(k).key: train[train.cell_line == get_cell_line(k).key] for k in cfg.train_cells}
    if cfg.disjoint_evidence:
        train, val = _in_example_folds(train), _in_example_folds(val)
    frames = {
        "train": subsample(_annotate_seen(train, seen_basis), cfg.train_subsample, cfg.seed),
        "validation": subsample(_annotate_seen(val, seen_basis), cfg.val_subsample, cfg.seed + 1),
        "test": subsample(_annotate_seen(test, seen_basis), cfg.test_subsample, cfg.seed + 2),
    }
    return {k: v[EXAMPLE_COLUMNS].reset_index(drop=True) for k, v in frames.items()}


def summarise(frames: dict[str, pd.DataFrame], cfg: DataConfig) -> dict:
    out = {"setting": setting_name(cfg), "train_cells": cfg.train_cells, "test_cells": cfg.test_cells,
           "protocol": cfg.protocol, "seed": cfg.seed, "splits": {}}
    for name, df in frames.items():
        counts = df["label"].value_counts().to_dict()
        out["splits"][name] = {
            "n": len(df),
            "perturbations": int(df["perturbation"].nunique()) if len(df) else 0,
            "by_class": {lab: int(counts.get(lab, 0)) for lab in LABELS},
            "by_cell_line": {k: int(v) for k, v in df["cell_line"].value_counts().sort_index().items()},
            "pert_seen_in_train_lines": int((df["pert_seen_in_train_lines"].map(len) > 0).sum()) if len(df) else 0,
        }
    return out


def _features():
    from datasets import Features, List, Value

    return Features({**{c: Value("string") for c in EXAMPLE_COLUMNS[:6]},
                     "pert_seen_in_train_lines": List(Value("string")),
                     "pair_seen_in_train_lines": List(Value("string"))})


def build(cfg: DataConfig, out_dir: Path | None = None, lines: dict[str, CellData] | None = None):
    """Build the DatasetDict; save it (and summary.json) to ``out_dir`` when given.

    Empty validation / test splits are valid (``val_fraction: 0`` is the published recipe); an empty
    training split is not, and fails here rather than in the stage that would train on it."""
    from datasets import Dataset, DatasetDict
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # saving takes well under a second; its bars only clutter the run log
    frames = build_frames(cfg, lines)
    if frames["train"].empty:
        raise SynthpertError(f"no training rows for train_cells {cfg.train_cells} after the validation hold-out "
                             f"and train_subsample {cfg.train_subsample}: nothing could be trained on")
    # Explicit features: an empty split has no rows to infer the column types from.
    dd = DatasetDict({k: Dataset.from_pandas(v, features=_features(), preserve_index=False) if len(v)
                      else Dataset.from_dict({c: [] for c in EXAMPLE_COLUMNS}, features=_features())
                      for k, v in frames.items()})
    summary = summarise(frames, cfg)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # datasets writes no Arrow file for an empty split unless told to write one shard, and then cannot
        # load the folder back; one shard per empty split keeps it loadable.
        dd.save_to_disk(str(out_dir / "dataset"), num_shards={k: 1 for k, v in dd.items() if len(v) == 0} or None)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        # Record where the CSVs were actually read from, so later stages (evidence, baselines) find them
        # without the environment variable or default that located them here.
        source = source_for_lines(cfg, [*cfg.train_cells, *cfg.test_cells])
        resolved = cfg.model_copy(update={"source": str(source.resolve()) if source else None})
        (out_dir / "data_config.json").write_text(resolved.model_dump_json(indent=2))
    return dd, summary


def run_baselines(cfg: DataConfig, n_bootstrap: int = 0) -> dict:
    """`synthpert baselines`: the test split of ``cfg`` built as `synthpert data build` builds it, and every
    model-free baseline scored on it, overall and per seen/unseen stratum."""
    lines = load_lines(cfg)
    test = build_frames(cfg.model_copy(update={"val_fraction": 0.0}), lines)["test"]
    stats = training_stats(cfg, lines)
    rows = baseline_report(stats, test, list(cfg.train_cells), n_bootstrap=n_bootstrap, seed=cfg.seed)
    flat = {}
    for name, res in rows.items():
        if "unavailable" in res:
            flat[name] = res
            continue
        flat[name] = {**res["overall"], "strata": {k: v for k, v in res.items() if k != "overall"}}
    seen = int((test["pert_seen_in_train_lines"].map(len) > 0).sum())
    return {"setting": setting_name(cfg), "train_cells": list(cfg.train_cells), "test_cells": list(cfg.test_cells),
            "protocol": cfg.protocol, "n": len(test), "n_pert_seen_in_train_lines": seen,
            "class_counts": test["label"].value_counts().to_dict(), "baselines": flat,
            **({"noise_ceiling": c} if (c := noise_ceilings(cfg)) else {})}
