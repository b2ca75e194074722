"""Seeded subsamples of example tables: by readout genes, class-balanced (with gene-matched contrasts), by count
or fraction. Deterministic for a seed, and the input's row order is kept."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .answer import LABELS, NOT_DE
from .config.data import SubsampleConfig


def _gene_matched(df: pd.DataFrame, de_idx: np.ndarray, not_de_idx: np.ndarray, cap: int, rng) -> np.ndarray:
    """Up to ``cap`` 'not DE' rows, each sharing (cell line, gene, perturbation fold) with a drawn DE row,
    cycling over the DE rows in random order; topped up at random when partners run out."""
    from .schema import perturbation_fold

    folds = {p: perturbation_fold(p) for p in df["perturbation"].unique().tolist()}
    key = lambda i: (df["cell_line"].iat[i], df["gene"].iat[i], folds[df["perturbation"].iat[i]])  # noqa: E731
    pool: dict[tuple, list[int]] = {}
    for i in rng.permutation(not_de_idx).tolist():
        pool.setdefault(key(i), []).append(i)
    chosen: list[int] = []
    order = rng.permutation(de_idx).tolist()
    while len(chosen) < cap and order:
        left = []
        for i in order:
            partners = pool.get(key(i))
            if partners:
                chosen.append(partners.pop())
                left.append(i)
                if len(chosen) == cap:
                    break
        order = left
    if len(chosen) < cap:
        rest = np.setdiff1d(not_de_idx, chosen)
        chosen += rng.choice(rest, size=min(cap - len(chosen), len(rest)), replace=False).tolist()
    return np.asarray(chosen, dtype=np.int64)


def subsample(df: pd.DataFrame, cfg: SubsampleConfig | None, seed: int) -> pd.DataFrame:
    """Seeded, deterministic subsample; the result keeps the input's row order."""
    if cfg is None or df.empty:
        return df
    rng = np.random.default_rng(seed if cfg.seed is None else cfg.seed)
    parts = []
    if cfg.genes is not None:
        genes = np.array(sorted(df["gene"].unique()))
        if cfg.genes < len(genes):
            chosen = rng.choice(genes, size=cfg.genes, replace=False)
            df = df[df["gene"].isin(set(chosen.tolist()))]
    if cfg.balance or cfg.per_class_cap:
        counts = df["label"].value_counts()
        cap = int(counts.min()) if cfg.balance else None
        if cfg.per_class_cap:
            cap = min(cap, cfg.per_class_cap) if cap is not None else cfg.per_class_cap
        if cfg.balance and cfg.n is not None:
            cap = min(cap, -(-cfg.n // len(counts)))
        for label in LABELS:
            idx = np.flatnonzero(df["label"].to_numpy() == label)
            if cfg.gene_matched > 0 and label == NOT_DE:
                k = min(cap, len(idx))
                matched = _gene_matched(df, np.concatenate(parts), idx, round(cfg.gene_matched * k), rng)
                rest = np.setdiff1d(idx, matched)
                idx = np.concatenate([matched, rng.choice(rest, size=min(k - len(matched), len(rest)), replace=False)])
            elif len(idx) > cap:
                idx = rng.choice(idx, size=cap, replace=False)
            parts.append(idx)
        keep = np.sort(np.concatenate(parts))
        df = df.iloc[keep]
    size = None
    if cfg.n is not None:
        size = min(cfg.n, len(df))
    elif cfg.fraction is not None:
        size = max(1, round(cfg.fraction * len(df)))
    if size is not None and size < len(df):
        keep = np.sort(rng.choice(len(df), size=size, replace=False))
        df = df.iloc[keep]
    return df.reset_index(drop=True)
