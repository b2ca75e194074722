"""`synthpert predict`: a trained model's answers for your own (cell line, perturbation, gene) triples, without
a server — the endpoint's /v1/predict answer (decided label, rule, class probabilities, warnings) as rows."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .answer import SHORT_KEYS
from .cells import get_cell_line
from .config.serve import ServeConfig
from .errors import SynthpertError
from .evidence import dataset_training_stats
from .inference import Triple, answer_record, load_student, triple_warnings
from .lookup import adapter_lookup, evidence_blocks
from .schema import SYMBOL_PATTERN, Example

COLUMNS = ("cell_line", "perturbation", "gene")
_SYMBOL = re.compile(SYMBOL_PATTERN)


def check_triples(df: pd.DataFrame, origin: str, rows: bool = True) -> pd.DataFrame:
    """Columns cell_line, perturbation, gene; every symbol well formed, every cell line known. Errors name the
    row (as a spreadsheet counts it: the header is row 1; ``rows=False`` for a triple given as options, which
    has no rows) and the value."""
    where = (lambda i: f"{origin} row {i + 2}") if rows else (lambda i: origin)  # noqa: E731
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise SynthpertError(f"{origin} lacks column(s) {missing}; expected {list(COLUMNS)}, found {list(df.columns)}")
    df = df[list(COLUMNS)].astype(str).apply(lambda col: col.str.strip())
    for col in COLUMNS:
        for i, value in enumerate(df[col].tolist()):
            if len(value) > 64 or not _SYMBOL.match(value):
                raise SynthpertError(f"{where(i)}: {col} {value!r} is not a symbol (letters, digits and "
                                     "._- only, at most 64 characters)")
    keys = {}
    for i, value in enumerate(df["cell_line"].tolist()):
        if value not in keys:
            try:
                keys[value] = get_cell_line(value).key
            except SynthpertError as e:
                raise SynthpertError(f"{where(i)}: {e}") from None
    df["cell_line"] = df["cell_line"].map(keys)
    if df.empty:
        raise SynthpertError(f"{origin} holds no triples")
    return df.reset_index(drop=True)


def read_triples(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise SynthpertError(f"input file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as e:  # pandas raises many parser error types
        raise SynthpertError(f"{path} is not a readable CSV: {e}") from None
    return check_triples(df, str(path))


def predict_triples(cfg: ServeConfig, triples: pd.DataFrame, return_reasoning: bool = False,
                    chunk: int = 64) -> list[dict]:
    """One answer record per triple, in input order, through the same predictor and decision as the endpoint."""
    student = load_student(cfg)
    predictor, stats, decision = student.predictor, student.stats, student.decision
    # the whole file at once: the lookup's fit
    evidence = evidence_blocks(stats, triples, adapter_lookup(cfg.inference.adapter))
    out = []
    try:
        for start in range(0, len(triples), chunk):
            part = triples.iloc[start:start + chunk]
            batch = [Triple(Example.make_id(r.cell_line, r.perturbation, r.gene), r.cell_line, r.perturbation, r.gene,
                            None, e) for r, e in zip(part.itertuples(), evidence[start:start + chunk])]
            out += [answer_record(p, decision, stats, return_reasoning)
                    for p in predictor.predict(batch, explain=return_reasoning)]
    finally:
        predictor.backend.close()
    return out


BASELINES = ("majority", "gene_prior", "gene_prior_balanced", "crosscell", "combined")


def predict_baseline(dataset: str | Path, triples: pd.DataFrame, name: str, seed: int = 0) -> list[dict]:
    """Model-free answers for one's own triples from a built dataset's training rows (the report's baselines,
    applied to new triples): records shaped like the model's, so the same CSV and JSON come out."""
    from .baselines import baseline_predictions
    from .dataset import built_config

    if name not in BASELINES:
        raise SynthpertError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    if not Path(dataset).exists():
        raise SynthpertError(f"--evidence-from {dataset}: folder does not exist")
    train_cells = list(built_config(Path(dataset)).train_cells)
    stats = dataset_training_stats(dataset)
    test = triples.reset_index(drop=True)
    if name == "crosscell" and not any(set(train_cells) - {line} for line in set(test.cell_line)):
        raise SynthpertError(f"the crosscell baseline reads other training lines, and this data's only training "
                             f"line is {train_cells[0]}: use combined or gene_prior")
    res = baseline_predictions(stats, test, train_cells, seed=seed, only=name)[name]
    return [{"cell_line": r.cell_line, "perturbation": r.perturbation, "gene": r.gene,
             "warnings": triple_warnings(stats, r.cell_line, r.perturbation, r.gene), "label": label,
             "label_generated": None, "label_strict": None,
             "decision": {"rule": f"baseline {name}", "description": f"the {name} baseline (no language model) "
                          f"from the training rows of {dataset}"},
             "unparseable_reason": None, "probabilities": dict(zip(SHORT_KEYS, map(float, probs))),
             "probability_method": "baseline", "reasoning": None, "completion_tokens": 0}
            for r, label, probs in zip(test.itertuples(), res["pred"], res["probs"])]


def to_frame(records: list[dict]) -> pd.DataFrame:
    """Flat rows for a CSV: probabilities as p_up / p_down / p_not_de, warnings joined."""
    rows = []
    for r in records:
        probs = r.get("probabilities") or {}
        rows.append({"cell_line": r["cell_line"], "perturbation": r["perturbation"], "gene": r["gene"],
                     "label": r["label"], "decision_rule": r["decision"]["rule"],
                     **{f"p_{k}": probs.get(k) for k in SHORT_KEYS},
                     "label_generated": r["label_generated"], "unparseable_reason": r["unparseable_reason"],
                     "warnings": "; ".join(r["warnings"]), "reasoning": r["reasoning"]})
    return pd.DataFrame(rows)


def write_predictions(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    to_frame(records).to_csv(tmp, index=False)
    tmp.replace(path)  # never a half-written file under the name asked for
    return path
