"""One metric table (synthpert/metric_table.py): the report, the command line, tracking, the model card, the
verdict and the decision objectives all read it, so a new metric is one entry."""

from __future__ import annotations

import pytest

from synthpert import metric_table
from synthpert.metric_table import Metric


def _overall(**extra) -> dict:
    return {"n": 40, "accuracy": 0.8, "macro_f1": 0.5, "balanced_accuracy": 0.55, "unparseable_rate": 0.0,
            "auroc_de_per_gene": 0.61, "auroc_de_genes": 12, "auroc_dir_per_gene": 0.7, "auroc_dir_genes": 3,
            "ece": 0.05, "ci": {"macro_f1": [0.4, 0.6], "knockdown_recall": [0.2, 0.5]},
            "per_class": {"up": {"f1": 0.3}, "down": {"f1": 0.2}, "not_de": {"f1": 0.9}}, **extra}


@pytest.fixture
def with_dummy(monkeypatch):
    dummy = Metric("knockdown_recall", "knockdown recall", "kdRecall", headline=True, objective=False)
    monkeypatch.setattr(metric_table, "METRICS", (*metric_table.METRICS, dummy))
    return dummy


def test_a_metric_added_to_the_table_appears_in_the_report_the_cli_tracking_and_the_verdict(with_dummy, capsys):
    from synthpert.cli.data import baseline_table
    from synthpert.report import metrics_table
    from synthpert.tracking import flat_eval_metrics
    from synthpert.verdict import verdict

    row = _overall(knockdown_recall=0.345)
    metrics = {"model": {"strict": {"overall": row}},
               "baselines": {"majority": {"overall": _overall(knockdown_recall=0.1)}}}
    table = metrics_table(metrics, "student", "overall")
    head, _, first = table.splitlines()[:3]
    assert head.endswith("| knockdown recall |") and "| 0.345 [0.20, 0.50] |" in first
    assert "| 0.610 [" not in first and "| 0.610 (12 genes) |" in first  # no interval computed: none shown

    result = {"setting": "s", "train_cells": ["k562"], "test_cells": ["k562"], "n": 40,
              "n_pert_seen_in_train_lines": 0, "baselines": {"gene_prior": row}}
    baseline_table(result)
    out = capsys.readouterr().out
    assert "kdRecall" in out and "0.345" in out

    assert flat_eval_metrics(metrics)["model_strict/knockdown_recall"] == 0.345
    assert "knockdown_recall" in verdict(metrics)


def test_the_table_drives_the_decision_objectives_and_the_model_card():
    from synthpert.decision import ValidationRows, fit_tuned
    from synthpert.errors import SynthpertError
    from synthpert.publish import _metrics_table

    assert metric_table.objectives() == ["accuracy", "macro_f1", "balanced_accuracy"]
    assert metric_table.headline_keys() == ["macro_f1", "balanced_accuracy", "auroc_de_per_gene",
                                            "auroc_dir_per_gene"]
    with pytest.raises(SynthpertError, match="did you mean 'macro_f1'"):
        fit_tuned(ValidationRows.from_rows([[0.2, 0.2, 0.6]], ["upregulated"], ["validation"]), objective="macro_f")
    card = _metrics_table({"model": {"strict": {"overall": _overall()}}, "baselines": {}})
    assert card[0] == ("| predictor | accuracy | macro-F1 [95% CI] | balanced acc. [95% CI] | F1 up / down / not DE "
                       "| AUROC DE (per gene) [95% CI] | AUROC dir (per gene) [95% CI] |")
    assert "| 0.300 / 0.200 / 0.900 |" in card[2]


def test_the_report_table_keeps_its_columns():
    from synthpert.report import table_head

    assert table_head().splitlines()[0] == (
        "| predictor | n | accuracy | macro-F1 | balanced acc. | F1 up | F1 down | F1 not DE | AUROC DE (per gene) "
        "| AUROC dir (per gene) | ECE | unparseable |")
    with pytest.raises(ValueError, match="no table column"):
        metric_table.metrics("plots")
