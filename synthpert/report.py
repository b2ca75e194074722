"""Baseline runs and the tables that put every model beside them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .baselines import baseline_report
from .config import DataConfig
from .data import build_frames, built_config, load_lines, resolve_source, setting_name, training_rows
from .evidence import TrainingStats

SHORT_HEADERS = {"accuracy": "acc", "macro_f1": "macroF1", "balanced_accuracy": "balAcc",
                 "auroc_de_per_gene": "AUROC DE", "auroc_dir_per_gene": "AUROC dir", "f1_up": "F1 up",
                 "f1_down": "F1 down", "f1_not_de": "F1 notDE"}
TABLE_METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "auroc_de_per_gene", "auroc_dir_per_gene")


def training_stats(cfg: DataConfig, lines=None) -> TrainingStats:
    """Stats over ALL training rows of the training lines (validation included, test never), so baselines
    use the same information a model designer has, however the training set was subsampled.

    Cached per process: the stages of one run and the evaluation sets of one run share training lines,
    and rebuilding the stats re-reads every CSV."""
    if lines is not None:
        return TrainingStats(training_rows(cfg, lines))
    key = _stats_key(cfg)
    if key not in _STATS_CACHE:
        if len(_STATS_CACHE) >= 4:
            _STATS_CACHE.pop(next(iter(_STATS_CACHE)))
        _STATS_CACHE[key] = TrainingStats(training_rows(cfg))
    return _STATS_CACHE[key]


def dataset_training_stats(dataset: Path | str) -> TrainingStats:
    """Training stats for a folder written by `synthpert data build` (evidence context, baselines)."""
    return training_stats(built_config(Path(dataset)))


def _stats_key(cfg: DataConfig) -> str:
    """What the training rows depend on: the lines, the protocol and the CSVs' identity on disk."""
    source = resolve_source(cfg.source)
    files = {}
    for key in cfg.train_cells:
        extra = cfg.extra_cell_lines.get(key)
        folder = resolve_source(extra.source) if extra and extra.source else source
        for kind in ("de", "dir"):
            f = folder / f"{key}-{kind}.csv"
            files[str(f.resolve())] = [f.stat().st_size, f.stat().st_mtime_ns] if f.exists() else None
    return json.dumps({"cfg": cfg.model_dump(mode="json", include={"source", "train_cells", "protocol",
                                                                   "extra_cell_lines"}), "files": files},
                      sort_keys=True)


_STATS_CACHE: dict[str, TrainingStats] = {}


def run_baselines(cfg: DataConfig, n_bootstrap: int = 0) -> dict:
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
            "class_counts": test["label"].value_counts().to_dict(), "baselines": flat}


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.3f}"


def metrics_rows(results: dict[str, dict], stratum: str = "overall") -> pd.DataFrame:
    """One row per predictor; ``results`` maps name -> flat metrics (with optional 'strata')."""
    rows = []
    for name, m in results.items():
        if "unavailable" in m:
            rows.append({"predictor": name, **{k: None for k in TABLE_METRICS}, "note": m["unavailable"]})
            continue
        src = m if stratum == "overall" else m.get("strata", {}).get(stratum)
        if src is None:
            continue
        rows.append({"predictor": name, "n": src["n"], **{k: src.get(k) for k in TABLE_METRICS},
                     **{f"f1_{c}": src["per_class"][c]["f1"] for c in ("up", "down", "not_de")}, "note": ""})
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    cols = [c for c in df.columns if c != "note" or df["note"].astype(bool).any()]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for _, r in df.iterrows():
        cells = [(_fmt(r[c]) if isinstance(r[c], float) or r[c] is None else str(r[c])) for c in cols]
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def baseline_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    console.print(f"[bold]{result['setting']}[/]: train {','.join(result['train_cells'])} → test "
                  f"{','.join(result['test_cells'])}; n={result['n']:,} test pairs "
                  f"({result['n_pert_seen_in_train_lines']:,} with the perturbation seen in another training line)")
    strata = ["overall"] + (["seen", "unseen"] if result["n_pert_seen_in_train_lines"] else [])
    for stratum in strata:
        df = metrics_rows(result["baselines"], stratum)
        table = Table(title=f"baselines — {stratum}", show_lines=False)
        table.add_column("predictor", no_wrap=True)
        for col in ["n", *TABLE_METRICS, "f1_up", "f1_down", "f1_not_de"]:
            table.add_column(SHORT_HEADERS.get(col, col), justify="right", no_wrap=True)
        for _, r in df.iterrows():
            if r.get("note"):
                table.add_row(r["predictor"], "", *["—"] * 8)
                continue
            table.add_row(r["predictor"], f"{int(r['n']):,}",
                          *[_fmt(r[c]) for c in (*TABLE_METRICS, "f1_up", "f1_down", "f1_not_de")])
        console.print(table)
    notes = [f"{k}: {v['unavailable']}" for k, v in result["baselines"].items() if "unavailable" in v]
    for n in dict.fromkeys(notes):
        console.print(f"[dim]{n}[/]")
    console.print("[dim]Per-gene AUROC of the gene priors is 0.5 by construction (one score per gene).[/]")
