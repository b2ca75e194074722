"""`synthpert predict`: your own triples through a trained model, without a server (the endpoint's answer as rows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from synthpert.answer import LABELS


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "synthpert.cli", "predict", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=timeout)


@pytest.mark.slow
def test_predict_a_csv_of_triples_and_one_triple(tiny_model_dir, tiny_adapter_dir, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\ufeffcell_line,perturbation,gene\nK562,MYC,GAPDH\nrpe1 , TP53 ,CDKN1A\nk562,MYC,RP11-34P13.7\n")
    out = tmp_path / "out" / "pred.csv"
    r = _cli("--model", tiny_model_dir, "--adapter", tiny_adapter_dir, "--input", pairs, "--out", out,
             "inference.max_new_tokens=8")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 predictions written" in r.stdout
    df = pd.read_csv(out, keep_default_na=False)
    assert df[["cell_line", "perturbation", "gene"]].values.tolist() == [
        ["k562", "MYC", "GAPDH"], ["rpe1", "TP53", "CDKN1A"], ["k562", "MYC", "RP11-34P13.7"]]
    assert set(df["label"]) <= set(LABELS)  # every triple gets a label, from its probabilities if need be
    assert ((df["p_up"] + df["p_down"] + df["p_not_de"]) - 1).abs().max() < 1e-6
    assert set(df["decision_rule"]) <= {"generated answer", "argmax"}

    r = _cli("--model", tiny_model_dir, "--adapter", tiny_adapter_dir, "--cell", "K562", "--perturbation", "MYC",
             "--gene", "GAPDH", "inference.max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    one = json.loads(r.stdout)
    assert one["label"] in LABELS and one["gene"] == "GAPDH" and "probabilities" in one


@pytest.mark.parametrize("content,message", [
    ("cell,perturbation,gene\nk562,MYC,GAPDH\n", "lacks column(s) ['cell_line']"),
    ("cell_line,perturbation,gene\nk562,MYC,GAPDH\nk562,MY C,GAPDH\n", "row 3: perturbation 'MY C' is not a symbol"),
    ("cell_line,perturbation,gene\nhela,MYC,GAPDH\n", "row 2: unknown cell line 'hela'"),
    ("cell_line,perturbation,gene\n", "holds no triples"),
])
def test_bad_input_files_are_named_errors_before_any_model_loads(tmp_path, content, message):
    from synthpert.errors import SynthpertError
    from synthpert.predict import read_triples

    path = tmp_path / "pairs.csv"
    path.write_text(content)
    with pytest.raises(SynthpertError) as e:
        read_triples(path)
    assert message in str(e.value)


def test_predict_arguments_are_checked(tmp_path):
    r = _cli("--model", tmp_path, "--cell", "k562", timeout=60)
    assert r.returncode == 2 and "one triple with --cell, --perturbation, --gene" in r.stderr
    r = _cli("--model", tmp_path, "--input", tmp_path / "x.csv", timeout=60)
    assert r.returncode == 2 and "--input needs --out" in r.stderr


def _stats():
    from synthpert.evidence import TrainingStats

    rows = [("k562", "MYC", "GAPDH", "upregulated"), ("k562", "TP53", "GAPDH", "not differentially expressed"),
            ("hepg2", "MYC", "CDKN1A", "downregulated"), ("hepg2", "ATF4", "CDKN1A", "upregulated"),
            ("hepg2", "ATF4", "GAPDH", "not differentially expressed")]
    return TrainingStats(pd.DataFrame(rows, columns=["cell_line", "perturbation", "gene", "label"]))


def test_warnings_know_the_cell_line():
    """CDKN1A was measured in HepG2 only: asked about K562, the answer says so (it used to say nothing)."""
    from synthpert.inference import triple_warnings

    stats = _stats()
    assert triple_warnings(stats, "k562", "MYC", "GAPDH") == []
    [w] = triple_warnings(stats, "k562", "MYC", "CDKN1A")
    assert w == ("gene CDKN1A was not measured in K562's training data; measured only in other lines: "
                 "HepG2 (2 knockdowns)")
    [w] = triple_warnings(stats, "k562", "ATF4", "GAPDH")
    assert w.startswith("perturbation ATF4 was not in K562's training data; measured only in other lines: HepG2")
    never = triple_warnings(stats, "k562", "NOTAGENE1", "RP11-34P13.7")
    assert never == ["gene RP11-34P13.7 was not measured in the training data",
                     "perturbation NOTAGENE1 was not in the training data"]
    assert triple_warnings(stats, "rpe1", "MYC", "GAPDH")[0].startswith("cell line RPE1 is not a training line")


@pytest.mark.parametrize("name", ["majority", "gene_prior", "crosscell", "combined"])
def test_baseline_predictions_for_own_triples_need_no_model(name, tiny_built_dataset):
    from synthpert.predict import predict_baseline

    triples = pd.DataFrame([{"cell_line": "k562", "perturbation": "MYC", "gene": "GAPDH"},
                            {"cell_line": "k562", "perturbation": "NOTAGENE1", "gene": "RP11-34P13.7"}])
    if name == "crosscell":  # the fixture's only training line is K562: nothing to go by, and it says so
        from synthpert.errors import SynthpertError

        with pytest.raises(SynthpertError, match="crosscell.*other training lines"):
            predict_baseline(str(tiny_built_dataset), triples, name)
        return
    records = predict_baseline(str(tiny_built_dataset), triples, name)
    assert [r["gene"] for r in records] == ["GAPDH", "RP11-34P13.7"]
    for r in records:
        assert r["label"] in LABELS and r["decision"]["rule"] == f"baseline {name}"
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-6 and r["probability_method"] == "baseline"
    assert "gene RP11-34P13.7 was not measured in the training data" in records[1]["warnings"]


def test_a_single_triples_error_names_the_options_not_a_row(tmp_path):
    r = _cli("--model", tmp_path, "--cell", "hela", "--perturbation", "MYC", "--gene", "GAPDH", timeout=120)
    assert r.returncode == 2 and "--cell/--perturbation/--gene: unknown cell line 'hela'" in r.stderr, r.stderr
    assert "row 2" not in r.stderr
