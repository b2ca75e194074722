"""A Perturb-seq screen (.h5ad) to PerturbQA triples: planted truth recovered, streaming invariant, malformed
files refused in one line, the output usable as a cell line on its own, and the split-half ceiling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthpert.answer import UP, format_answer
from synthpert.backends import Backend, Generation
from synthpert.errors import SynthpertError
from synthpert.screen import ScreenOptions, from_anndata
from synthpert.screen_synth import ScreenSpec, write_synthetic_screen

# Same per-perturbation statistics as the screen (150 cells each, 1,200 controls, 2.5x up, 0.3x down,
# negative-binomial noise), fewer perturbations and genes so it runs in a second.
SPEC = ScreenSpec(perturbations=12, genes=300, cells_per_perturbation=150, control_cells=1200, seed=3)
OPTS = dict(perturbation_key="perturbation", control="non-targeting", cell_line="myscreen")


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    path = tmp_path_factory.mktemp("screen") / "screen.h5ad"
    truth = write_synthetic_screen(path, SPEC)
    return path, truth


@pytest.fixture(scope="module")
def called(screen, tmp_path_factory):
    path, truth = screen
    out = tmp_path_factory.mktemp("called")
    summary = from_anndata(path, out, ScreenOptions(**OPTS, split_half=True))
    return out, summary, truth


def _three_class(out: Path, key: str = "myscreen") -> pd.DataFrame:
    de = pd.read_csv(out / f"{key}-de.csv")
    d = pd.read_csv(out / f"{key}-dir.csv")
    m = de.merge(d, on=["pert", "gene"], how="left", suffixes=("", "_dir"))
    m["call"] = np.where(m.label == 0, "none", np.where(m.label_dir == 1, "up", "down"))
    return m


def test_planted_effects_are_recovered_with_direction_at_the_default_thresholds(called):
    out, summary, truth = called
    m = _three_class(out)
    m["truth"] = [truth.label(p, g) for p, g in zip(m.pert, m.gene)]
    planted = m[m.truth != "none"]
    null = m[m.truth == "none"]
    recall = float((planted.call == planted.truth).mean())
    fpr = float((null.call != "none").mean())
    assert len(planted) >= 0.9 * SPEC.perturbations * (SPEC.up_per_perturbation + SPEC.down_per_perturbation)
    assert recall >= 0.8, recall
    assert fpr <= 0.05, fpr
    assert summary["test"]["fdr"] == 0.05 and summary["de"]["de"] == int((m.call != "none").sum())


def test_output_follows_perturbqas_format_and_split_by_perturbation(called):
    out, summary, truth = called
    de, d = pd.read_csv(out / "myscreen-de.csv"), pd.read_csv(out / "myscreen-dir.csv")
    assert list(de.columns) == list(d.columns) == ["pert", "gene", "label", "split"]
    assert set(de.label) == {0, 1} and set(d.label) <= {0, 1}
    assert len(d) == int(de.label.sum())  # -dir holds exactly the DE pairs
    assert not (de.pert == de.gene).any()  # the knocked-down target is not a downstream readout
    assert summary["knockdown"] == {**summary["knockdown"], "measured": 12, "called_down": 12}
    splits = de.groupby("pert").split.nunique()
    assert (splits == 1).all()  # no perturbation on both sides
    assert set(de[de.split == "test"].pert) == set(summary["perturbations"]["test"])
    assert 1 <= summary["perturbations"]["n_test"] < summary["perturbations"]["n"]
    # every readout gene is read out for every perturbation, so each test gene occurs in train
    assert set(de[de.split == "test"].gene) <= set(de[de.split == "train"].gene)
    saved = json.loads((out / "myscreen-screen.json").read_text())
    assert saved["cells"]["control"] == 1200 and set(saved["cells"]["per_perturbation"].values()) == {150}


def test_calls_do_not_depend_on_chunking_or_on_dense_versus_sparse_storage(screen, called, tmp_path):
    """Streaming must be exact: other chunk sizes, a dense X and counts in a layer give the same triples."""
    import anndata as ad

    path, _ = screen
    ref, _, _ = called
    a = ad.read_h5ad(path)
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X.toarray())  # a normalised X, as screens are often shipped
    dense = tmp_path / "dense.h5ad"
    a.write_h5ad(dense)
    with pytest.raises(SynthpertError, match="non-integer.*--layer"):
        from_anndata(dense, tmp_path / "x", ScreenOptions(**OPTS))
    from_anndata(dense, tmp_path / "layer", ScreenOptions(**OPTS, layer="counts", chunk_cells=777))
    a.X = a.layers["counts"].toarray()
    del a.layers["counts"]
    a.write_h5ad(dense)
    from_anndata(dense, tmp_path / "dense", ScreenOptions(**OPTS, chunk_cells=1000))
    want = (ref / "myscreen-de.csv").read_text()
    assert (tmp_path / "layer" / "myscreen-de.csv").read_text() == want
    assert (tmp_path / "dense" / "myscreen-de.csv").read_text() == want
    assert (tmp_path / "dense" / "myscreen-dir.csv").read_text() == (ref / "myscreen-dir.csv").read_text()


def test_options_drop_small_perturbations_and_choose_readout_genes(screen, tmp_path):
    path, truth = screen
    s = from_anndata(path, tmp_path, ScreenOptions(**OPTS, min_mean_counts=5.0, test_fraction=0.0))
    base = np.array(truth.baseline)
    assert 0 < s["readout_genes"]["n"] < 0.5 * SPEC.genes
    assert s["dropped"]["genes_below_expression_threshold"] == SPEC.genes - s["readout_genes"]["n"]
    assert set(pd.read_csv(tmp_path / "myscreen-de.csv").split) == {"train"}
    assert pd.read_csv(tmp_path / "myscreen-de.csv").gene.isin(
        [g for g, b in zip(truth.genes, base) if b > 2]).mean() > 0.9
    genes = truth.genes[:5] + ["NOT_A_GENE"]
    s = from_anndata(path, tmp_path, ScreenOptions(**OPTS, genes=genes))
    assert s["readout_genes"]["n"] == 5 and s["dropped"]["readout_genes_not_in_screen"] == ["NOT_A_GENE"]
    with pytest.raises(SynthpertError, match="no perturbation has at least 151 cells"):
        from_anndata(path, tmp_path, ScreenOptions(**OPTS, min_cells=151))


def test_a_column_major_matrix_is_refused_with_the_fix(screen, tmp_path):
    """CSC cannot be read by cell chunks without loading it whole: say so rather than load it."""
    import anndata as ad

    a = ad.read_h5ad(screen[0])
    a.X = a.X.tocsc()
    a.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(SynthpertError, match=r"column-major \(CSC\).*tocsr"):
        from_anndata(tmp_path / "csc.h5ad", tmp_path / "o", ScreenOptions(**OPTS))


@pytest.mark.parametrize("change, message", [
    (dict(perturbation_key="guide_target"), "obs has no column 'guide_target'.*perturbation"),
    (dict(control="NTC"), "no control cells.*'NTC'"),
    (dict(gene_symbols="symbol"), "var has no column 'symbol'.*gene_symbol"),
    (dict(layer="raw"), "no layer 'raw'"),
    (dict(cell_line="my screen"), "invalid --cell-line"),
])
def test_malformed_input_is_one_named_error(screen, tmp_path, change, message):
    path, _ = screen
    with pytest.raises(SynthpertError, match=message):
        from_anndata(path, tmp_path, ScreenOptions(**{**OPTS, **change}))


def test_cli_reports_a_malformed_file_in_one_line_and_writes_a_usable_folder(screen, tmp_path):
    path, _ = screen
    base = [sys.executable, "-m", "synthpert.cli", "data", "from-anndata", str(path), "--control", "non-targeting",
            "--cell-line", "myscreen", "--out", str(tmp_path / "o")]
    bad = subprocess.run([*base, "--perturbation-key", "gene"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "obs has no column 'gene'" in bad.stderr
    ok = subprocess.run([*base, "--perturbation-key", "perturbation", "--min-cells", "50"], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert "12 perturbations" in ok.stdout and "on-target knockdown called in 12 of 12" in ok.stdout
    assert (tmp_path / "o" / "myscreen-de.csv").exists()


def test_split_half_ceiling_is_high_on_strong_effects_lower_on_weak_ones_and_grows_with_cells(called, tmp_path):
    """The generator fixes the ceiling's scale: planted 2.5x / 0.3x effects at 75 cells per half replicate
    almost perfectly; 1.25x / 0.8x effects do not; and fewer cells per half replicate worse."""
    _, summary, _ = called
    strong = summary["split_half"]
    c = strong["ceiling"]
    assert c["auroc_de_per_gene"] >= 0.9 and c["auroc_dir_per_gene"] >= 0.95 and c["agreement"] >= 0.95
    assert c["cells_per_perturbation_per_half"] == pytest.approx(75, abs=3)
    curve = strong["scaling"]
    assert [p["blocks_per_half"] for p in curve] == [1, 2, 3, 4]
    assert curve[-1]["auroc_de_per_gene"] > curve[0]["auroc_de_per_gene"]
    assert curve[-1]["de_replication"] > curve[0]["de_replication"]
    weak_path = tmp_path / "weak.h5ad"
    write_synthetic_screen(weak_path, ScreenSpec(**{**SPEC.__dict__, "up_factor": 1.25, "down_factor": 0.8}))
    weak = from_anndata(weak_path, tmp_path / "w", ScreenOptions(**OPTS, split_half=True))["split_half"]["ceiling"]
    assert weak["auroc_de_per_gene"] < c["auroc_de_per_gene"] - 0.05
    assert weak["de_replication"] < c["de_replication"]


def test_the_output_is_a_cell_line_that_builds_and_scores_baselines_with_no_perturbqa_folder(
        called, tmp_path, monkeypatch):
    """A user with only their own screen: data.source is the from-anndata folder, nothing else exists."""
    from synthpert.data import run_baselines
    from synthpert.config.data import DataConfig
    from synthpert.dataset import load_built
    from synthpert.data import build

    out, summary, _ = called
    monkeypatch.setenv("SYNTHPERT_DATA", str(tmp_path / "no-perturbqa-here"))
    cfg = DataConfig(source=str(out), train_cells=["myscreen"], test_cells=["myscreen"],
                     extra_cell_lines={"myscreen": {"name": "MyCells", "description": "A synthetic screen."}})
    build(cfg, tmp_path / "built")
    ds = load_built(tmp_path / "built")
    test_perts = set(summary["perturbations"]["test"])
    assert set(ds["test"]["perturbation"]) == test_perts
    assert not test_perts & (set(ds["train"]["perturbation"]) | set(ds["validation"]["perturbation"]))
    assert len(ds["train"]) + len(ds["validation"]) + len(ds["test"]) == summary["de"]["pairs"]
    result = run_baselines(cfg)
    assert result["setting"] == "within-cell" and result["n"] == summary["de"]["by_split"]["test"]["pairs"]
    # The planted effects are drawn per perturbation, so the screen has no gene-level signal to find: what
    # is pinned here is that every same-line baseline runs on it.
    for name in ("majority", "gene_prior"):
        assert 0 < result["baselines"][name]["macro_f1"] <= 1
    assert result["noise_ceiling"]["myscreen"] == summary["split_half"]["ceiling"]


class _Constant(Backend):
    """Answers "up" to everything: a predictor whose per-gene AUROC is 0.5, i.e. 0% of any ceiling."""

    name = "constant"

    def _generate(self, queries, n, *args, **kwargs):
        return [[Generation(format_answer(UP, "r"), 3, "stop")] * n for _ in queries]


def test_the_eval_report_on_a_screen_with_a_ceiling_shows_it_and_each_predictor_as_a_share(called, tmp_path):
    from synthpert.config.data import DataConfig
    from synthpert.config.evaluate import EvalConfig, InferenceConfig
    from synthpert.data import build
    from synthpert.evaluate import run_eval

    out, summary, _ = called
    cfg = DataConfig(source=str(out), train_cells=["myscreen"], test_cells=["myscreen"],
                     extra_cell_lines={"myscreen": {"description": "A synthetic screen."}})
    build(cfg, tmp_path / "built")
    backend = _Constant(InferenceConfig(backend="transformers", model="constant"))
    run_eval(EvalConfig(dataset=str(tmp_path / "built"), split="test", n_bootstrap=0, figures=False,
                        inference=backend.cfg), out_dir=tmp_path / "eval", backend=backend, progress=False)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    ceiling = summary["split_half"]["ceiling"]
    assert metrics["noise_ceiling"] == {"myscreen": ceiling}
    report = (tmp_path / "eval" / "report.md").read_text()
    section = report[report.index("## Noise ceiling"):]
    assert f"per-gene AUROC DE {ceiling['auroc_de_per_gene']:.3f}" in section
    assert "| constant (zero-shot) (generated answer, strict parse) | 0.500 | 0% |" in section
    assert "| majority | 0.500 | 0% |" in section


def test_cells_without_a_label_and_small_perturbations_are_dropped_and_reported(screen, tmp_path):
    import anndata as ad

    path, truth = screen
    a = ad.read_h5ad(path)
    labels = a.obs["perturbation"].astype(object).to_numpy()
    first = np.flatnonzero(labels == truth.perturbations[0])
    labels[first[:20]] = "TINY"
    labels[first[20:30]] = None
    a.obs["perturbation"] = pd.Categorical(labels)
    edited = tmp_path / "edited.h5ad"
    a.write_h5ad(edited)
    s = from_anndata(edited, tmp_path / "o", ScreenOptions(**OPTS))
    assert s["dropped"]["perturbations_below_min_cells"] == {"TINY": 20}
    assert s["dropped"]["cells_without_label"] == 10
    assert s["cells"]["per_perturbation"][truth.perturbations[0]] == 120
    assert "TINY" not in set(pd.read_csv(tmp_path / "o" / "myscreen-de.csv").pert)


@pytest.mark.slow
def test_synthpert_run_trains_and_evaluates_on_the_screen_alone(called, tmp_path):
    """The issue's bar: the from-anndata folder trains and predicts on its own line with no PerturbQA folder
    anywhere (SYNTHPERT_DATA points nowhere), through the same `synthpert run` as the quickstart."""
    import os

    import yaml

    out, summary, _ = called
    cfg = {"name": "screen", "seed": 0,
           "data": {"source": str(out), "train_cells": ["myscreen"], "test_cells": ["myscreen"],
                    "extra_cell_lines": {"myscreen": {"name": "MyCells", "description": "A synthetic screen."}},
                    "train_subsample": {"n": 60, "balance": True}},
           "eval_sets": {"own": {"test_cells": ["myscreen"], "n": 20}},
           "teacher": {"mode": "evidence"}, "judge": {"kind": "rules"},
           "train": {"base_model": "tiny", "mode": "label_only", "optim": {"epochs": 1, "batch_size": 8}},
           "eval": {"n_bootstrap": 0, "figures": False, "inference": {"max_new_tokens": 12}}}
    path = tmp_path / "screen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "SYNTHPERT_DATA": str(tmp_path / "no-perturbqa-here"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "run", str(path), "--runs-dir", str(tmp_path / "runs")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = tmp_path / "runs" / "screen" / "eval" / "own" / "result"
    metrics = json.loads((result / "metrics.json").read_text())
    assert metrics["n_predicted"] == 20 and metrics["noise_ceiling"]["myscreen"] == summary["split_half"]["ceiling"]
    assert (tmp_path / "runs" / "screen" / "train" / "adapter_config.json").exists()
    assert "## Noise ceiling" in (result / "report.md").read_text()
