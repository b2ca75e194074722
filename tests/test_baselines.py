import json
import subprocess
import sys

import numpy as np
import pytest

from synthpert.answer import LABELS
from synthpert.baselines import baseline_predictions, baseline_report, crosscell_probabilities
from synthpert.data import run_baselines
from synthpert.config.data import DataConfig
from synthpert.dataset import load_lines
from synthpert.data import build_frames
from synthpert.evidence import TrainingStats, evidence_text

ALL = ["k562", "rpe1", "hepg2", "jurkat"]


@pytest.fixture(scope="module")
def multi(perturbqa_dir):
    cfg = DataConfig(source=str(perturbqa_dir), train_cells=ALL, test_cells=["k562"], val_fraction=0.0)
    fr = build_frames(cfg, load_lines(cfg))
    return fr["train"], fr["test"], TrainingStats(fr["train"])


def test_k562_within_cell_baselines_match_reference(perturbqa_dir):
    res = run_baselines(DataConfig(source=str(perturbqa_dir), train_cells=["k562"], test_cells=["k562"]))
    b = res["baselines"]
    assert res["n"] == 23212
    assert b["majority"]["accuracy"] == pytest.approx(0.866, abs=0.001)
    assert b["majority"]["macro_f1"] == pytest.approx(0.309, abs=0.001)
    assert b["gene_prior"]["accuracy"] == pytest.approx(0.92, abs=0.01)
    assert b["gene_prior"]["macro_f1"] == pytest.approx(0.64, abs=0.02)
    assert b["gene_prior"]["auroc_de_per_gene"] == pytest.approx(0.5)  # one score per gene
    assert "no cross-cell information" in b["crosscell"]["unavailable"]


def test_crosscell_cannot_see_test_labels(multi):
    train, test, stats = multi
    sub = test.sample(3000, random_state=0).reset_index(drop=True)
    before, _ = crosscell_probabilities(stats, sub)
    shuffled = sub.copy()
    shuffled["label"] = np.random.default_rng(0).permutation(shuffled["label"].to_numpy())
    after, _ = crosscell_probabilities(stats, shuffled)
    assert np.array_equal(before, after)
    preds = baseline_predictions(stats, shuffled, ALL)
    assert preds["crosscell"]["pred"] == baseline_predictions(stats, sub, ALL)["crosscell"]["pred"]


def test_crosscell_uses_only_other_lines(multi):
    train, test, stats = multi
    # Rows of the test line in the training stats must not change cross-cell scores.
    no_k562 = TrainingStats(train[train.cell_line != "k562"])
    sub = test.head(2000)
    assert np.allclose(crosscell_probabilities(stats, sub)[0], crosscell_probabilities(no_k562, sub)[0])


def test_crosscell_transfer_is_informative_and_strata_partition(multi):
    train, test, stats = multi
    rep = baseline_report(stats, test, ALL)
    cc = rep["crosscell"]
    assert cc["seen"]["n"] + cc["unseen"]["n"] == cc["overall"]["n"] == len(test)
    assert cc["overall"]["auroc_de_per_gene"] > 0.58  # close to SUMMER's 0.62 (science.md)
    assert cc["overall"]["auroc_dir_per_gene"] > 0.6
    assert cc["unseen"]["auroc_de_per_gene"] == pytest.approx(0.5)  # no cross-cell info there


def test_evidence_leaves_the_examples_perturbation_fold_out(multi):
    from synthpert.schema import EXAMPLE_FOLDS, perturbation_fold

    train, test, stats = multi
    row = train[(train.cell_line == "k562") & (train.label == LABELS[0])].iloc[0]
    ev = stats.evidence("k562", row.perturbation, row.gene)
    fold = perturbation_fold(row.perturbation)
    same_gene = train[(train.cell_line == "k562") & (train.gene == row.gene)]
    counted = ~same_gene.perturbation.map(perturbation_fold).isin(EXAMPLE_FOLDS | {fold})
    expected = [int((same_gene[counted].label == lab).sum()) for lab in LABELS]
    assert ev.gene_counts_here.tolist() == expected  # the own row, its fold and every example fold are out
    assert ev.gene_counts_here.sum() < stats.gene_counts[("k562", row.gene)].sum()
    # two knockdowns of the gene in the same fold, one changed and one not, see identical counts: no
    # label leaks backwards through the evidence (leave-one-out would show the changed one a count fewer)
    in_fold = same_gene[same_gene.perturbation.map(perturbation_fold) == fold]
    for other in in_fold.itertuples():
        assert stats.gene_counts_loo("k562", other.perturbation, row.gene).tolist() == expected
    # a test perturbation sees the full training counts
    t = test[test.cell_line == "k562"].iloc[0]
    assert (stats.gene_counts_loo("k562", t.perturbation, t.gene) ==
            stats.gene_counts.get(("k562", t.gene), np.zeros(3))).all()
    assert "k562" not in ev.pair_labels_other
    text = evidence_text(stats, "k562", row.perturbation, row.gene)
    assert row.gene in text and "K562" in text


def test_baselines_cli_json_and_bad_cell_line(perturbqa_dir):
    cmd = [sys.executable, "-m", "synthpert.cli", "baselines", "--source", str(perturbqa_dir),
           "--train-cells", "k562", "--test-cells", "k562", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    assert res["setting"] == "within-cell" and res["n"] == 23212
    assert {"accuracy", "macro_f1", "balanced_accuracy", "auroc_de_per_gene", "auroc_dir_per_gene"} <= set(
        res["baselines"]["majority"])
    bad = subprocess.run(cmd[:7] + ["hela"] + cmd[8:], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown cell line 'hela'" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_usage_errors_have_no_traceback():
    out = subprocess.run([sys.executable, "-m", "synthpert.cli", "baselines", "--no-such-flag"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no-such-flag" in out.stderr and "Traceback" not in out.stderr


def test_combined_baseline_reads_no_test_label_and_is_the_strongest_bar(multi):
    from synthpert.baselines import combined_probabilities

    train, test, stats = multi
    sub = test.sample(4000, random_state=1).reset_index(drop=True)
    before = combined_probabilities(stats, sub, max_fit_rows=20000)
    shuffled = sub.copy()
    shuffled["label"] = np.random.default_rng(1).permutation(shuffled["label"].to_numpy())
    assert np.array_equal(before, combined_probabilities(stats, shuffled, max_fit_rows=20000))
    assert np.allclose(before.sum(axis=1), 1.0)
    rep = baseline_report(stats, sub, ALL)
    comb, gp, cc = (rep[k]["overall"] for k in ("combined", "gene_prior", "crosscell"))
    # It uses both kinds of evidence: the gene prior's macro-F1 and the cross-cell ranking.
    assert comb["macro_f1"] > gp["macro_f1"] and comb["auroc_de_per_gene"] > 0.55
