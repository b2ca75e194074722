"""PerturbQA data: read and validate the CSVs, build three-class examples and splits, load built datasets.

Label rule: ``not differentially expressed`` when the ``-de`` label is 0, else ``upregulated`` /
``downregulated`` from the ``-dir`` label (1 = increase, 0 = decrease).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .answer import DOWN, LABELS, NOT_DE, UP
from .cells import get_cell_line, register_cell_line
from .config.data import DataConfig, SubsampleConfig, default_data_dir
from .errors import SynthpertError
from .sampling import subsample

REQUIRED_COLUMNS = ("pert", "gene", "label", "split")
CSV_KINDS = ("de", "dir")  # each line is two CSVs: differential expression, and direction of the DE pairs
PERTURBQA_LINES = ("k562", "rpe1", "hepg2", "jurkat")
EXAMPLE_COLUMNS = ["id", "cell_line", "perturbation", "gene", "label", "split",
                   "pert_seen_in_train_lines", "pair_seen_in_train_lines"]


def csv_name(key: str, kind: str) -> str:
    """PerturbQA's file naming rule: ``{line}-{kind}.csv`` with kind ``de`` or ``dir``."""
    return f"{key}-{kind}.csv"


def line_csvs(cfg: DataConfig, key: str, default: Path | None = None) -> list[Path]:
    """The -de and -dir CSVs of one line, in the folder that holds them (a user line's own ``source``, else
    ``default`` or the config's source)."""
    folder = _source_for(cfg, key, default)
    return [folder / csv_name(key, kind) for kind in CSV_KINDS]


def source_for_lines(cfg: DataConfig, keys) -> Path | None:
    """The config's CSV folder, resolved only when one of ``keys`` reads from it: a run on the user's own
    lines alone, each with its own ``source``, needs no PerturbQA folder anywhere."""
    if all(_own_source(cfg, k) for k in keys):
        return Path(cfg.source).expanduser() if cfg.source and Path(cfg.source).expanduser().is_dir() else None
    return resolve_source(cfg.source)


def _own_source(cfg: DataConfig, key: str) -> str | None:
    extra = cfg.extra_cell_lines.get(key) or cfg.extra_cell_lines.get(key.strip().lower())
    return extra.source if extra else None


def resolve_source(source: str | Path | None) -> Path:
    path = Path(source).expanduser() if source else default_data_dir()
    if not path.is_dir():
        raise SynthpertError(
            f"PerturbQA data directory {path} does not exist. Run `synthpert data fetch` (or "
            "`synthpert data fetch --from DIR` offline), set SYNTHPERT_DATA, or pass --source DIR")
    return path


# ---------------------------------------------------------------------------------------------------------
# Load and validate one cell line


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise SynthpertError(f"missing file {path}")
    try:
        # Only an empty cell is missing (pandas would read the symbols NA, NULL or None as missing), and a label
        # is read as text, so "true" is refused rather than read as 1.
        df = pd.read_csv(path, dtype={"pert": str, "gene": str, "label": str, "split": str}, keep_default_na=False,
                         na_values=[""])
    except Exception as e:  # pandas raises many parser error types
        raise SynthpertError(f"{path} is not a readable CSV: {e}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise SynthpertError(f"{path} lacks column(s) {missing}; expected columns {list(REQUIRED_COLUMNS)}, "
                             f"found {list(df.columns)}")
    df = df[list(REQUIRED_COLUMNS)]
    if df[["pert", "gene", "split"]].isna().any().any():
        bad = int(df[["pert", "gene", "split"]].isna().any(axis=1).idxmax()) + 2
        raise SynthpertError(f"{path}: empty pert/gene/split value (first at line {bad})")
    labels = pd.to_numeric(df["label"], errors="coerce")
    bad = ~labels.isin([0, 1])
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise SynthpertError(f"{path}: label must be 0 or 1, found {df['label'].iloc[i]!r} at line {i + 2}")
    df["label"] = labels.astype(int)
    splits = set(df["split"].unique())
    if not splits <= {"train", "test"}:
        raise SynthpertError(f"{path}: split must be 'train' or 'test', found {sorted(splits - {'train', 'test'})}")
    dup = df.duplicated(["pert", "gene"])
    if dup.any():
        row = df[dup].iloc[0]
        raise SynthpertError(f"{path}: pair ({row.pert}, {row.gene}) appears more than once")
    return df


@dataclass
class CellData:
    key: str
    rows: pd.DataFrame  # pert, gene, label (three-class string), split


def load_cell_line(source: Path, key: str) -> CellData:
    """Read ``{key}-de.csv`` and ``{key}-dir.csv`` and join them into three-class labels."""
    key = get_cell_line(key).key
    de_name, dir_name = csv_name(key, "de"), csv_name(key, "dir")
    de = _read_csv(source / de_name)
    d = _read_csv(source / dir_name)
    merged = de.merge(d[["pert", "gene", "label", "split"]], on=["pert", "gene"], how="left",
                      suffixes=("", "_dir"), indicator=True)
    positives = merged["label"] == 1
    missing_dir = positives & (merged["_merge"] == "left_only")
    if missing_dir.any():
        r = merged[missing_dir].iloc[0]
        raise SynthpertError(f"{key}: ({r.pert}, {r.gene}) is DE in {de_name} but has no row in {dir_name} "
                             f"({int(missing_dir.sum())} such pairs)")
    orphan = d.merge(de[de.label == 1][["pert", "gene"]], on=["pert", "gene"], how="left", indicator=True)
    orphan = orphan[orphan["_merge"] == "left_only"]
    if len(orphan):
        r = orphan.iloc[0]
        raise SynthpertError(f"{key}: ({r.pert}, {r.gene}) has a direction in {dir_name} but is not DE in "
                             f"{de_name} ({len(orphan)} such pairs)")
    split_mismatch = positives & (merged["split_dir"] != merged["split"])
    if split_mismatch.any():
        r = merged[split_mismatch].iloc[0]
        raise SynthpertError(f"{key}: ({r.pert}, {r.gene}) has split {r.split!r} in -de but {r.split_dir!r} in -dir")
    label = np.where(~positives, NOT_DE, np.where(merged["label_dir"] == 1, UP, DOWN))
    rows = pd.DataFrame({"pert": merged["pert"], "gene": merged["gene"], "label": label, "split": merged["split"]})
    return CellData(key, rows)


# ---------------------------------------------------------------------------------------------------------
# Build examples


def register_extra_lines(cfg: DataConfig) -> None:
    for key, extra in cfg.extra_cell_lines.items():
        register_cell_line(key, extra.name, extra.description)


def _source_for(cfg: DataConfig, key: str, default: Path | None) -> Path:
    own = _own_source(cfg, key)
    if own:
        path = Path(own).expanduser()
        if not path.is_dir():  # the user's own screen: `data fetch` (PerturbQA) would not help
            raise SynthpertError(f"data.extra_cell_lines.{key}.source: folder {path} does not exist; it should "
                                 f"hold your screen as {csv_name(key, 'de')} and {csv_name(key, 'dir')} "
                                 "(PerturbQA's CSV format, see docs/configuration.md)")
        return path
    return default if default is not None else resolve_source(cfg.source)


def setting_name(cfg: DataConfig) -> str:
    train, test = set(cfg.train_cells), set(cfg.test_cells)
    if not test & train:
        return "unseen-cell" + ("-published" if cfg.protocol == "published" else "")
    if train == test and len(train) == 1:
        return "within-cell"
    if test <= train:
        return "multi-line"
    raise SynthpertError("test_cells must be either all among train_cells (within-cell / multi-line) or none of "
                         f"them (unseen-cell); got train={cfg.train_cells} test={cfg.test_cells}")


def load_lines(cfg: DataConfig) -> dict[str, CellData]:
    register_extra_lines(cfg)
    keys = [get_cell_line(k).key for k in dict.fromkeys([*cfg.train_cells, *cfg.test_cells])]
    source = source_for_lines(cfg, keys)
    return {k: load_cell_line(_source_for(cfg, k, source), k) for k in keys}


def _to_examples(cell: str, rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "id": cell + ":" + rows["pert"] + ":" + rows["gene"],
        "cell_line": cell,
        "perturbation": rows["pert"].to_numpy(),
        "gene": rows["gene"].to_numpy(),
        "label": rows["label"].to_numpy(),
        "split": rows["split"].to_numpy(),
    })


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


def _rows_of(line: CellData, split: str, protocol: str) -> pd.DataFrame:
    rows = line.rows if protocol == "published" else line.rows[line.rows.split == split]
    return _to_examples(line.key, rows)


def training_rows(cfg: DataConfig, lines: dict[str, CellData] | None = None) -> pd.DataFrame:
    """Every training row of the training lines (before validation hold-out and subsampling); the published
    protocol trains on all rows of those lines."""
    lines = lines or load_lines(cfg)
    return pd.concat([_rows_of(lines[get_cell_line(k).key], "train", cfg.protocol) for k in cfg.train_cells],
                     ignore_index=True)


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


def built_config(path: Path) -> DataConfig:
    """The DataConfig a dataset was built with: ``data_config.json`` in the ``data build --out`` folder (or
    beside the ``dataset/`` folder given). A user's own cell lines in it are registered, so prompts and
    evidence resolve them."""
    from .config import validate_config

    path = Path(path).expanduser()
    for folder in (path, path.parent):
        f = folder / "data_config.json"
        if f.exists():
            try:
                raw = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise SynthpertError(f"{f} is not valid JSON ({e.msg})") from None
            cfg = validate_config(DataConfig, raw, origin=str(f))
            register_extra_lines(cfg)
            return cfg
    raise SynthpertError(f"no data_config.json in {path}: pass a folder written by `synthpert data build --out`")


def load_built(path: Path, split: str | None = None):
    """Load a dataset written by ``build`` (the run folder or its ``dataset`` subfolder)."""
    from datasets import load_from_disk

    path = Path(path)
    target = path / "dataset" if (path / "dataset").is_dir() else path
    if not target.is_dir():
        raise SynthpertError(f"no built dataset at {path}; run `synthpert data build` first")
    try:
        dd = load_from_disk(str(target))
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise SynthpertError(f"could not read the built dataset at {target} ({type(e).__name__}: {e}); rebuild it "
                             "with `synthpert data build` (or rerun the data stage: --force data)") from None
    if split is None:
        return dd
    if split not in dd:
        raise SynthpertError(f"dataset at {path} has no split {split!r}; it has {list(dd)}")
    return dd[split]


def load_examples(dataset: Path | str, split: str, sample: SubsampleConfig | None = None,
                  seed: int = 0) -> pd.DataFrame:
    """One split of a built dataset as a DataFrame (seeded subsample); a user's own cell lines in its config
    are registered, so prompts resolve them."""
    dataset = Path(dataset)
    built_config(dataset)
    df = load_built(dataset, split).to_pandas()
    if df.empty:
        raise SynthpertError(f"split {split!r} of {dataset} has no examples")
    df = subsample(df, sample, seed)
    for col in ("pert_seen_in_train_lines", "pair_seen_in_train_lines"):
        df[col] = df[col].map(list)
    return df.reset_index(drop=True)
