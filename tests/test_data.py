import json
import shutil

import pandas as pd
import pytest

from synthpert.answer import DOWN, NOT_DE, UP
from synthpert.config.data import DataConfig, SubsampleConfig
from synthpert.dataset import load_cell_line, load_lines, training_rows
from synthpert.data import build, build_frames
from synthpert.fetch import fetch
from synthpert.errors import SynthpertError

ALL = ["k562", "rpe1", "hepg2", "jurkat"]


@pytest.fixture(scope="module")
def lines(perturbqa_dir):
    return load_lines(DataConfig(source=str(perturbqa_dir), train_cells=ALL, test_cells=["k562"]))


@pytest.fixture
def cfg(perturbqa_dir):
    return lambda **kw: _cfg(perturbqa_dir, **kw)


def _cfg(perturbqa_dir, **kw):
    kw.setdefault("source", str(perturbqa_dir))
    return DataConfig(**kw)


def test_k562_three_class_counts_match_the_csvs(lines, cfg, perturbqa_dir):
    test = build_frames(cfg(val_fraction=0.0), lines)["test"]
    assert test["label"].value_counts().to_dict() == {NOT_DE: 20093, UP: 2530, DOWN: 589}
    de = pd.read_csv(perturbqa_dir / "k562-de.csv")
    d = pd.read_csv(perturbqa_dir / "k562-dir.csv")
    assert len(test) == (de.split == "test").sum()
    assert (test.label != NOT_DE).sum() == ((de.split == "test") & (de.label == 1)).sum()
    assert (test.label == UP).sum() == ((d.split == "test") & (d.label == 1)).sum()


def test_within_cell_split_is_by_perturbation_and_validation_too(lines, cfg):
    fr = build_frames(cfg(val_fraction=0.1, seed=3), lines)
    tr, va, te = (set(fr[k].perturbation) for k in ("train", "validation", "test"))
    assert not tr & te and not tr & va and not va & te
    assert len(va) == round(0.1 * (len(tr) + len(va)))
    assert fr["train"].pert_seen_in_train_lines.map(len).sum() == 0  # only one training line
    again = build_frames(cfg(val_fraction=0.1, seed=3), lines)
    assert again["validation"].id.tolist() == fr["validation"].id.tolist()


def test_multi_line_marks_perturbations_seen_elsewhere(lines, cfg):
    fr = build_frames(cfg(train_cells=ALL, test_cells=["k562"], val_fraction=0.0), lines)
    te = fr["test"]
    share = (te.pert_seen_in_train_lines.map(len) > 0).mean()
    assert 0.9 < share < 0.99  # science.md: ~95% of K562 test perturbations are trained elsewhere
    rpe1_train = set(fr["train"].query("cell_line == 'rpe1'").perturbation)
    for p, seen in zip(te.perturbation.tolist(), te.pert_seen_in_train_lines.tolist()):
        assert ("rpe1" in seen) == (p in rpe1_train)
        assert "k562" not in seen
    pairs = set(zip(fr["train"].cell_line, fr["train"].perturbation, fr["train"].gene))
    row = te[te.pair_seen_in_train_lines.map(len) > 0].iloc[0]
    assert all((c, row.perturbation, row.gene) in pairs for c in row.pair_seen_in_train_lines)


def test_unseen_cell_and_published_protocol(lines, cfg):
    split = build_frames(cfg(train_cells=["k562"], test_cells=["rpe1"], val_fraction=0.0), lines)
    assert set(split["test"].cell_line) == {"rpe1"} and set(split["test"].split) == {"test"}
    pub = build_frames(cfg(train_cells=["k562"], test_cells=["rpe1"], protocol="published", val_fraction=0.0), lines)
    assert len(pub["test"]) == len(lines["rpe1"].rows) and len(pub["train"]) == len(lines["k562"].rows)
    with pytest.raises(Exception, match="published"):
        cfg(train_cells=["k562"], test_cells=["k562"], protocol="published")


def test_subsample_is_seeded_balanced_and_capped(lines, cfg):
    fr = build_frames(cfg(train_subsample=SubsampleConfig(n=300, balance=True), seed=1), lines)
    counts = fr["train"].label.value_counts()
    assert counts.to_dict() == {UP: 100, DOWN: 100, NOT_DE: 100}
    fr2 = build_frames(cfg(train_subsample=SubsampleConfig(n=300, balance=True), seed=1), lines)
    assert fr["train"].id.tolist() == fr2["train"].id.tolist()
    fr3 = build_frames(cfg(train_subsample=SubsampleConfig(n=300, balance=True), seed=2), lines)
    assert fr["train"].id.tolist() != fr3["train"].id.tolist()
    capped = build_frames(cfg(test_subsample=SubsampleConfig(per_class_cap=50)), lines)["test"]
    assert capped.label.value_counts().max() == 50
    by_gene = build_frames(cfg(test_subsample=SubsampleConfig(genes=30)), lines)["test"]
    full = build_frames(cfg(), lines)["test"]
    assert by_gene.gene.nunique() == 30
    assert len(by_gene) == full.gene.isin(set(by_gene.gene)).sum()  # every pair of the chosen genes
    frac = build_frames(cfg(test_subsample=SubsampleConfig(fraction=0.1)), lines)["test"]
    assert len(frac) == round(0.1 * 23212)


def test_disjoint_evidence_shows_every_example_of_a_gene_the_same_counts_from_non_examples(lines, cfg):
    from synthpert.evidence import training_stats
    from synthpert.schema import EXAMPLE_FOLDS, perturbation_fold

    on = cfg(train_cells=["k562", "hepg2"], disjoint_evidence=True, train_subsample=SubsampleConfig(genes=60))
    fr = build_frames(on, lines)
    plain = build_frames(cfg(train_cells=["k562", "hepg2"], train_subsample=SubsampleConfig(genes=60)), lines)
    assert not plain["train"].perturbation.map(perturbation_fold).isin(EXAMPLE_FOLDS).all()
    for split in ("train", "validation"):
        assert len(fr[split]) and fr[split].perturbation.map(perturbation_fold).isin(EXAMPLE_FOLDS).all()
    stats = training_stats(on, lines)
    tr = fr["train"]
    here = {i: tuple(stats.gene_counts_loo(r.cell_line, r.perturbation, r.gene)) for i, r in enumerate(tr.itertuples())}
    contrasted = 0
    for _, group in tr.groupby(["cell_line", "gene"]):
        # a changed and an unchanged knockdown of one gene see the same counts: no label reaches the evidence
        assert len({here[i] for i in group.index}) == 1
        contrasted += group.label.nunique() > 1
    assert contrasted >= 10
    r = tr.iloc[0]
    rows = training_rows(on, lines)
    counted = rows[(rows.cell_line == r.cell_line) & (rows.gene == r.gene)
                   & ~rows.perturbation.map(perturbation_fold).isin(EXAMPLE_FOLDS)]
    assert list(here[0]) == [int((counted.label == lab).sum()) for lab in (UP, DOWN, NOT_DE)]


def test_gene_matched_subsample_pairs_each_not_de_row_with_a_changed_knockdown_of_its_gene(lines, cfg):
    from synthpert.evidence import TrainingStats
    from synthpert.schema import perturbation_fold

    sub = SubsampleConfig(n=300, balance=True, gene_matched=True)
    fr = build_frames(cfg(train_subsample=sub, seed=1), lines)
    tr = fr["train"]
    assert tr.label.value_counts().to_dict() == {UP: 100, DOWN: 100, NOT_DE: 100}
    fold = tr.perturbation.map(perturbation_fold)
    de = set(zip(tr.cell_line[tr.label != NOT_DE], tr.gene[tr.label != NOT_DE], fold[tr.label != NOT_DE]))
    nd = tr[tr.label == NOT_DE]
    assert all(k in de for k in zip(nd.cell_line, nd.gene, fold[tr.label == NOT_DE]))
    # the pair's gene-level evidence is identical, so only the knockdown's own evidence can tell them apart
    stats = TrainingStats(build_frames(cfg(), lines)["train"])
    r = nd.iloc[0]
    partner = tr[(tr.label != NOT_DE) & (tr.gene == r.gene) & (tr.cell_line == r.cell_line)
                 & (fold == perturbation_fold(r.perturbation))].iloc[0]
    assert (stats.gene_counts_loo(r.cell_line, r.perturbation, r.gene) ==
            stats.gene_counts_loo(r.cell_line, partner.perturbation, r.gene)).all()
    plain = build_frames(cfg(train_subsample=SubsampleConfig(n=300, balance=True), seed=1), lines)["train"]
    pnd = plain[plain.label == NOT_DE]
    pde = set(zip(plain.cell_line[plain.label != NOT_DE], plain.gene[plain.label != NOT_DE]))
    assert sum(k in pde for k in zip(pnd.cell_line, pnd.gene)) < 0.5 * len(pnd)  # without it, rarely paired
    # a share: that many 'not DE' rows are partners, the rest random; the classes stay balanced
    half = build_frames(cfg(train_subsample=SubsampleConfig(n=300, balance=True, gene_matched=0.5), seed=1),
                        lines)["train"]
    assert half.label.value_counts().to_dict() == {UP: 100, DOWN: 100, NOT_DE: 100}
    hfold = half.perturbation.map(perturbation_fold)
    hde = set(zip(half.cell_line[half.label != NOT_DE], half.gene[half.label != NOT_DE], hfold[half.label != NOT_DE]))
    hnd = half[half.label == NOT_DE]
    paired = sum(k in hde for k in zip(hnd.cell_line, hnd.gene, hfold[half.label == NOT_DE]))
    assert 50 <= paired < 75, paired  # 50 matched, a few random ones pair by chance
    with pytest.raises(Exception, match="needs balance"):
        SubsampleConfig(n=10, gene_matched=True)


def test_contrast_first_curriculum_opens_with_the_gene_matched_contrasts(lines, cfg, tmp_path):
    from synthpert.config.train import TrainConfig
    from synthpert.schema import perturbation_fold
    from synthpert.train import sft_config
    from synthpert.train_data import contrast_first

    tr = build_frames(cfg(train_subsample=SubsampleConfig(n=300, balance=True, gene_matched=0.5), seed=1),
                      lines)["train"]
    rows = tr[["cell_line", "perturbation", "gene", "label"]].to_dict("records")
    ordered, n_first = contrast_first(rows, seed=0)
    assert sorted(map(str, ordered)) == sorted(map(str, rows))  # a reordering: nothing lost or repeated
    key = lambda r: (r["cell_line"], r["gene"], perturbation_fold(r["perturbation"]))  # noqa: E731
    first, rest = ordered[:n_first], ordered[n_first:]
    # every opening row has a partner of the other kind with the same gene-level evidence; no later row has
    assert n_first >= 100  # 50 matched 'not DE' rows and their changed partners
    for part, contrasted in ((first, True), (rest, False)):
        for r in part:
            kinds = {o["label"] == NOT_DE for o in rows if key(o) == key(r)}
            assert (len(kinds) == 2) == contrasted
    assert contrast_first(rows, seed=0) == (ordered, n_first)  # seeded
    assert [r["gene"] for r in contrast_first(rows, seed=1)[0]] != [r["gene"] for r in ordered]
    # the trainer keeps the order: no up-front shuffle, a sequential sampler
    tc = TrainConfig(curriculum="contrast_first")
    args = sft_config(tc, tmp_path, "fp32", has_eval=False)
    assert args.train_sampling_strategy == "sequential" and not args.shuffle_dataset
    assert sft_config(TrainConfig(), tmp_path, "fp32", has_eval=False).train_sampling_strategy == "random"
    with pytest.raises(Exception, match="packing reorders"):
        TrainConfig(curriculum="contrast_first", packing=True)


def test_build_saves_datasetdict_and_summary(tmp_path, lines, cfg):
    dd, summary = build(cfg(train_subsample=SubsampleConfig(n=60, balance=True)), tmp_path, lines)
    assert set(dd) == {"train", "validation", "test"}
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["splits"]["test"]["by_class"] == {UP: 2530, DOWN: 589, NOT_DE: 20093}
    assert saved["splits"]["train"]["n"] == 60
    from synthpert.dataset import load_built
    back = load_built(tmp_path, "test")
    assert back[0]["id"].startswith("k562:") and isinstance(back[0]["pert_seen_in_train_lines"], list)


# --------------------------------------------------------------------------------------------- bad input

def _write_line(d, key, de_rows, dir_rows):
    pd.DataFrame(de_rows, columns=["pert", "gene", "label", "split"]).to_csv(d / f"{key}-de.csv", index=False)
    pd.DataFrame(dir_rows, columns=["pert", "gene", "label", "split"]).to_csv(d / f"{key}-dir.csv", index=False)


GOOD_DE = [("A", "X", 1, "train"), ("A", "Y", 0, "train"), ("B", "X", 0, "test"), ("B", "Y", 1, "test")]
GOOD_DIR = [("A", "X", 1, "train"), ("B", "Y", 0, "test")]


def test_unknown_cell_line_lists_available(cfg):
    with pytest.raises(SynthpertError, match="unknown cell line 'hela'.*k562"):
        load_lines(cfg(train_cells=["hela"], test_cells=["hela"]))


@pytest.mark.parametrize("mutate,message", [
    (lambda de, d: (de, d[:1]), "no row in"),
    (lambda de, d: ([(*de[0][:2], 2, de[0][3]), *de[1:]], d), "label must be 0 or 1"),
    (lambda de, d: (de, d + [("A", "Y", 1, "train")]), "not DE"),
    (lambda de, d: (de + [de[0]], d), "more than once"),
    (lambda de, d: ([(*r[:3], "dev") for r in de], d), "split must be"),
])
def test_malformed_csvs_get_clear_errors(tmp_path, mutate, message):
    de, d = mutate(list(GOOD_DE), list(GOOD_DIR))
    _write_line(tmp_path, "k562", de, d)
    with pytest.raises(SynthpertError, match=message):
        load_cell_line(tmp_path, "k562")


def test_wrong_columns_and_missing_file(tmp_path):
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "k562-de.csv", index=False)
    with pytest.raises(SynthpertError, match="lacks column"):
        load_cell_line(tmp_path, "k562")
    with pytest.raises(SynthpertError, match="missing file"):
        load_cell_line(tmp_path, "rpe1")


def test_users_own_screen_goes_through_the_same_build(tmp_path):
    _write_line(tmp_path, "myscreen", GOOD_DE, GOOD_DIR)
    c = DataConfig(source=str(tmp_path), train_cells=["myscreen"], test_cells=["myscreen"], val_fraction=0,
                   extra_cell_lines={"myscreen": {"name": "MyCells", "description": "Primary T cells."}})
    fr = build_frames(c)
    assert fr["train"].label.tolist() == [UP, NOT_DE]
    assert fr["test"].label.tolist() == [NOT_DE, DOWN]
    from synthpert.prompting import student_messages
    assert "MyCells" in student_messages("myscreen", "A", "X")[1]["content"]


def test_fetch_from_local_copy_verifies_checksums(tmp_path, perturbqa_dir):
    out = fetch(tmp_path / "copy", from_dir=perturbqa_dir, log=lambda *_: None)
    assert sorted(p.name for p in out.glob("*.csv")) == sorted(
        f"{k}-{s}.csv" for k in ALL for s in ("de", "dir"))
    bad = tmp_path / "bad"
    shutil.copytree(perturbqa_dir, bad)
    (bad / "rpe1-dir.csv").chmod(0o644)
    with open(bad / "rpe1-dir.csv", "a") as f:
        f.write("X,Y,1,train\n")
    with pytest.raises(SynthpertError, match="rpe1-dir.csv.*failed verification"):
        fetch(tmp_path / "copy2", from_dir=bad, log=lambda *_: None)
    assert not (tmp_path / "copy2" / "rpe1-dir.csv").exists()  # nothing unverified is left behind
    assert not list((tmp_path / "copy2").glob(".*"))


def test_fetch_downloads_over_http_and_rejects_a_corrupt_mirror(tmp_path, perturbqa_dir):
    """The real download path (urllib over HTTP), against a local server standing in for GitHub."""
    import functools
    import http.server
    import threading

    mirror = tmp_path / "mirror"
    shutil.copytree(perturbqa_dir, mirror)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = fetch(tmp_path / "dl", base_url=url, log=lambda *_: None)
        assert (out / "k562-de.csv").read_bytes() == (perturbqa_dir / "k562-de.csv").read_bytes()
        (mirror / "hepg2-de.csv").chmod(0o644)
        (mirror / "hepg2-de.csv").write_text("pert,gene,label,split\n")
        with pytest.raises(SynthpertError, match="hepg2-de.csv.*failed verification: size"):
            fetch(tmp_path / "dl2", base_url=url, log=lambda *_: None)
        with pytest.raises(SynthpertError, match="could not download"):
            fetch(tmp_path / "dl3", base_url=url + "/missing", log=lambda *_: None)
    finally:
        server.shutdown()


def test_built_config_restores_a_users_own_cell_line(tmp_path):
    """Later stages (generate, train, eval, serve) read the dataset folder, not the user's YAML: the cell
    line declared at build time must resolve there too."""
    from synthpert import cells
    from synthpert.dataset import built_config
    from synthpert.evidence import dataset_training_stats

    _write_line(tmp_path, "myscreen2", GOOD_DE, GOOD_DIR)
    c = DataConfig(source=str(tmp_path), train_cells=["myscreen2"], test_cells=["myscreen2"], val_fraction=0,
                   extra_cell_lines={"myscreen2": {"name": "MyCells2", "description": "Primary B cells."}})
    build(c, tmp_path / "built")
    cells._extra.clear()
    with pytest.raises(SynthpertError, match="unknown cell line"):
        cells.get_cell_line("myscreen2")
    assert built_config(tmp_path / "built").train_cells == ["myscreen2"]
    assert cells.get_cell_line("myscreen2").name == "MyCells2"
    stats = dataset_training_stats(tmp_path / "built")
    assert stats.gene_counts_loo("myscreen2", "B", "X").tolist() == [1, 0, 0]  # A's row only; B is a test pert
    assert dataset_training_stats(tmp_path / "built") is stats  # cached: the CSVs are read once per process


def test_val_fraction_zero_round_trips_through_save_and_load(tmp_path, lines, cfg):
    """The published recipe keeps no validation split: the empty split saves and loads back, typed."""
    from synthpert.dataset import load_built

    dd, summary = build(cfg(val_fraction=0.0, train_subsample=SubsampleConfig(n=40)), tmp_path, lines)
    assert summary["splits"]["validation"]["n"] == 0
    back = load_built(tmp_path)
    assert {k: len(v) for k, v in back.items()} == {"train": 40, "validation": 0, "test": 23212}
    assert back["validation"].features == back["train"].features
    assert len(load_built(tmp_path, "validation").to_pandas()) == 0


def test_empty_test_split_round_trips_and_empty_train_split_fails_at_build(tmp_path):
    """A user's screen with no test rows builds (the test split is empty and loads back); one whose
    training rows are all filtered away fails at build time, naming why, not in a later stage."""
    from synthpert.dataset import load_built

    train_rows = ([r for r in GOOD_DE if r[3] == "train"], [r for r in GOOD_DIR if r[3] == "train"])
    _write_line(tmp_path, "trainonly", *train_rows)
    extra = {"trainonly": {"name": "TrainOnly", "description": "A screen without a test split."}}
    c = DataConfig(source=str(tmp_path), train_cells=["trainonly"], test_cells=["trainonly"], val_fraction=0,
                   extra_cell_lines=extra)
    build(c, tmp_path / "built")
    back = load_built(tmp_path / "built")
    assert len(back["train"]) == 2 and len(back["test"]) == 0 and len(back["validation"]) == 0
    _write_line(tmp_path, "testonly", [r for r in GOOD_DE if r[3] == "test"], [r for r in GOOD_DIR if r[3] == "test"])
    c = DataConfig(source=str(tmp_path), train_cells=["testonly"], test_cells=["testonly"], val_fraction=0,
                   extra_cell_lines={"testonly": {"description": "A screen without training rows."}})
    with pytest.raises(SynthpertError, match="no training rows"):
        build(c, tmp_path / "built2")
    assert not (tmp_path / "built2").exists()


def test_an_unreadable_built_dataset_is_a_clear_error(tmp_path, lines, cfg):
    from synthpert.dataset import load_built

    build(cfg(train_subsample=SubsampleConfig(n=10)), tmp_path, lines)
    for f in (tmp_path / "dataset" / "train").glob("*.arrow"):
        f.unlink()
    with pytest.raises(SynthpertError, match="could not read the built dataset.*synthpert data build"):
        load_built(tmp_path)
