"""What a newcomer meets in the first hour of the command line (issue 19): each test pins one behaviour that
used to surprise, in the words a user sees."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from synthpert.config import load_section
from synthpert.config.data import DataConfig
from synthpert.config.generate import TeacherConfig
from synthpert.config.run import RunConfig
from synthpert.config.train import TrainConfig
from synthpert.errors import SynthpertError

PYDANTIC_WORDS = ("Value error", "(top level)", "Input should be", "validation error", "pydantic")


def _cli(*args, cwd=None, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "synthpert.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def _message(fn) -> str:
    with pytest.raises(SynthpertError) as err:
        fn()
    return str(err.value)


def test_baselines_table_shows_bootstrap_intervals(perturbqa_dir, capsys):
    from synthpert.data import run_baselines
    from synthpert.cli.data import baseline_table

    result = run_baselines(DataConfig(source=str(perturbqa_dir), train_cells=["hepg2"], test_cells=["hepg2"]),
                           n_bootstrap=20)
    baseline_table(result, 20)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "gene_prior " in line)
    assert re.search(r"0\.\d{3} \[0\.\d\d, 0\.\d\d\]", row), row
    assert "20 resamples" in out
    for metrics in result["baselines"].values():  # no bootstrap: the same table without brackets
        metrics.pop("ci", None)
    baseline_table(result)
    out = capsys.readouterr().out
    assert "gene_prior " in out and "[" not in out and "resamples" not in out


def test_model_tiny_says_which_gene_list_it_used(tmp_path):
    empty = tmp_path / "no_csvs"
    empty.mkdir()
    r = _cli("model", "tiny", "--out", tmp_path / "m", env={"SYNTHPERT_DATA": str(empty)})
    assert r.returncode == 0, r.stderr
    assert "built-in gene list" in r.stdout and str(empty) in r.stdout and "--source" in r.stdout


def test_shipped_config_path_resolves_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_section(RunConfig, None, "configs/quickstart.yaml")
    assert cfg.name == "quickstart"
    assert load_section(TrainConfig, "train", "configs/train_tiny.yaml", ["base_model=org/name"]).lora.r == 16


def test_relative_paths_in_a_config_are_read_from_its_folder(tmp_path, monkeypatch, perturbqa_dir):
    project = tmp_path / "project"
    (project / "csvs").mkdir(parents=True)
    (project / "cfg.yaml").write_text("data:\n  source: csvs\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Path(load_section(DataConfig, "data", "../project/cfg.yaml").source) == (project / "csvs").resolve()
    # the command line is read from the working directory, as every shell argument is
    assert load_section(DataConfig, "data", "../project/cfg.yaml", ["source=here"]).source == "here"


def test_missing_local_base_model_fails_at_load_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    msg = _message(lambda: load_section(TrainConfig, "train", None, ["base_model=./no_model"]))
    assert "no folder ./no_model" in msg and "command line" in msg
    # runs/ exists here, so runs/tiny_model is a path, not a hub id "runs" / "tiny_model"
    msg = _message(lambda: load_section(TrainConfig, "train", None, ["base_model=runs/tiny_model"]))
    assert "no folder runs/tiny_model" in msg
    (tmp_path / "c.yaml").write_text("train:\n  base_model: ../models/student\n")
    msg = _message(lambda: load_section(TrainConfig, "train", "c.yaml"))
    assert f"no folder {(tmp_path.parent / 'models' / 'student').resolve()}" in msg and "c.yaml" in msg
    assert load_section(TrainConfig, "train", None, ["base_model=Qwen/Qwen2.5-0.5B"]).base_model == "Qwen/Qwen2.5-0.5B"


def test_did_you_mean_searches_every_section():
    msg = _message(lambda: load_section(TeacherConfig, "teacher", None, ["techer.mode=evidence"]))
    assert "did you mean 'teacher.mode'" in msg
    msg = _message(lambda: load_section(RunConfig, None, "quickstart.yaml", ["techer.mode=evidence"]))
    assert "did you mean 'teacher.mode'" in msg


def test_override_typo_is_reported_as_coming_from_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  train_cells: [k562]\n")
    msg = _message(lambda: load_section(DataConfig, "data", tmp_path / "c.yaml", ["train_cels=[rpe1]"]))
    line = next(x for x in msg.splitlines() if "train_cels" in x)
    assert "on the command line" in line and "c.yaml" not in line and "did you mean 'train_cells'" in line
    (tmp_path / "d.yaml").write_text("data:\n  train_cels: [k562]\n")
    msg = _message(lambda: load_section(DataConfig, "data", tmp_path / "d.yaml"))
    assert "d.yaml" in msg.splitlines()[-1] and "command line" not in msg


def test_config_errors_are_in_the_toolkits_words_naming_key_and_source(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  protocol: published\n  train_cells: [k562]\n  test_cells: [k562]\n")
    msg = _message(lambda: load_section(DataConfig, "data", tmp_path / "c.yaml"))
    assert "protocol 'published' is for unseen cell lines" in msg and "c.yaml" in msg
    msg += _message(lambda: load_section(DataConfig, "data", None, ["seed=abc", "val_fraction=0.9"]))
    assert "seed: must be a whole number (got 'abc')" in msg and "val_fraction: must be < 0.5" in msg
    assert not [w for w in PYDANTIC_WORDS if w in msg], msg


def test_every_cli_error_uses_one_prefix(tmp_path):
    for args in (["baselines", "--no-such-flag"], ["data", "build"], ["run", tmp_path / "nope.yaml"]):
        r = _cli(*args)
        assert r.returncode == 2
        flagged = [line for line in r.stderr.splitlines() if "rror" in line]
        assert flagged and all(line.startswith("error: ") for line in flagged), r.stderr


def test_run_with_a_stage_typo_leaves_no_run_folder(tmp_path):
    for extra in ([], ["--dry-run"]):
        r = _cli("run", "quickstart.yaml", "--until", "dat", "--runs-dir", tmp_path / "runs", *extra)
        assert r.returncode == 2 and "did you mean 'data'" in r.stderr, r.stderr
        assert not (tmp_path / "runs").exists() and r.stdout == ""


def test_generate_and_judge_end_with_a_short_summary(tmp_path, tiny_built_dataset):
    gen, judged = tmp_path / "generate", tmp_path / "judge"
    r = _cli("generate", "--dataset", tiny_built_dataset, "--out", gen, "teacher.mode=evidence")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) <= 4 and "96 traces" in lines[0] and "cost" in r.stdout and str(gen / "traces.jsonl") in r.stdout
    r = _cli("judge", "--traces", gen / "traces.jsonl", "--out", judged, "judge.kind=rules")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) <= 4 and "kept 96 of 96" in lines[0] and str(judged / "kept.jsonl") in r.stdout
    r = _cli("judge", "--json", "--traces", gen / "traces.jsonl", "--out", judged, "judge.kind=rules")
    assert r.returncode == 0 and json.loads(r.stdout)["kept"] == 96


def test_bad_records_and_decision_files_are_described_without_pydantic_words(tmp_path):
    from synthpert.decision import load_decision
    from synthpert.schema import TraceRecord, read_jsonl

    traces = tmp_path / "traces.jsonl"
    traces.write_text('{"id": "a#0", "example_id": "a", "cell_line": "k562", "perturbation": "P", "gene": "G", '
                      '"label": "upregulated", "sample_index": "first"}\n')
    msg = _message(lambda: list(read_jsonl(traces, TraceRecord)))
    assert "traces.jsonl:1" in msg and "sample_index: must be a whole number" in msg
    (tmp_path / "decision.json").write_text('{"rule": "tuned", "log_offsets": "big"}')
    msg += _message(lambda: load_decision(tmp_path))
    assert not [w for w in PYDANTIC_WORDS if w in msg], msg


def test_data_build_ends_with_a_short_summary_and_keeps_the_json_for_json(tmp_path, perturbqa_dir):
    args = ["data", "build", "--source", perturbqa_dir, "--train-cells", "rpe1", "--test-cells", "rpe1",
            "train_subsample.n=30", "train_subsample.balance=true", "test_subsample.genes=5"]
    r = _cli(*args, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) <= 6 and lines[-1].startswith("written: ") and "summary.json" in lines[-1]
    assert any(line.startswith("train: 30 triples") and "up 10" in line for line in lines), r.stdout
    j = _cli(*args, "--out", tmp_path / "b", "--json")
    assert j.returncode == 0 and json.loads(j.stdout)["splits"]["train"]["n"] == 30


def _pipe_with_verdicts(tmp_path, *verdicts):
    from types import SimpleNamespace

    sets = {}
    for i, v in enumerate(verdicts):
        result = tmp_path / "eval" / f"set{i}" / "result"
        result.mkdir(parents=True)
        (result / "metrics.json").write_text(json.dumps({"verdict": {"macro_f1": v}}))
        sets[f"set{i}"] = None
    return SimpleNamespace(cfg=SimpleNamespace(eval_sets=sets), dir=Path("runs/quickstart"),
                           stage_dir=lambda stage: tmp_path / stage)


def test_the_run_summary_says_which_predictor_to_use_and_how(tmp_path):
    from synthpert.cli.run import _which_predictor

    trails = {"beats": False, "outcome": "trails", "best_baseline": "combined"}
    beats = {"beats": True, "outcome": "beats", "best_baseline": "combined"}
    lines = _which_predictor(_pipe_with_verdicts(tmp_path / "a", beats, trails))
    assert "with the combined baseline while the student trails it" in lines[0]
    assert lines[1].strip() == ("synthpert predict --run runs/quickstart --baseline combined --input pairs.csv "
                                "--out predictions.csv")
    lines = _which_predictor(_pipe_with_verdicts(tmp_path / "b", beats, beats))
    assert "--baseline" not in "\n".join(lines) and "synthpert predict --run runs/quickstart" in lines[1]


def test_the_run_says_up_front_when_teacher_and_judge_are_heuristics():
    from synthpert.cli.run import _offline_heuristics
    from synthpert.config.run import RunConfig

    base = {"name": "x", "train": {"base_model": "tiny"}, "teacher": {"mode": "evidence"}}
    cfg = RunConfig.model_validate({**base, "judge": {"kind": "rules"}})
    assert _offline_heuristics(cfg) == ("the teacher (mode evidence) and the judge (rules, form only) are offline "
                                        "heuristics")
    cfg = RunConfig.model_validate({**base, "judge": {"kind": "llm"}})
    assert _offline_heuristics(cfg) == "the teacher (mode evidence) is an offline heuristic"
