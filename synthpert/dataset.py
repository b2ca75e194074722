"""PerturbQA data as every stage reads it: the CSVs read and validated, cell lines loaded, training rows as
three-class examples, and datasets that `synthpert data build` wrote (data.py, the stage, builds them).

Label rule: ``not differentially expressed`` when the ``-de`` label is 0, else ``upregulated`` /
``downregulated`` from the ``-dir`` label (1 = increase, 0 = decrease).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .answer import DOWN, NOT_DE, UP
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


def _rows_of(line: CellData, split: str, protocol: str) -> pd.DataFrame:
    rows = line.rows if protocol == "published" else line.rows[line.rows.split == split]
    return _to_examples(line.key, rows)


def training_rows(cfg: DataConfig, lines: dict[str, CellData] | None = None) -> pd.DataFrame:
    """Every training row of the training lines (before validation hold-out and subsampling); the published
    protocol trains on all rows of those lines."""
    lines = lines or load_lines(cfg)
    return pd.concat([_rows_of(lines[get_cell_line(k).key], "train", cfg.protocol) for k in cfg.train_cells],
                     ignore_index=True)


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
