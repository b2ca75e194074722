"""A user's own screen, alone: two CSVs in PerturbQA's format and a run config build, train, evaluate and
predict on their line with no PerturbQA folder anywhere (docs/configuration.md's worked example)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synthpert.errors import SynthpertError

PERTS = [f"KD{i}" for i in range(24)]
GENES = [f"RG{j}" for j in range(16)]


def write_screen(folder: Path, key: str = "myscreen") -> Path:
    """{key}-de.csv (every pair, label 1 = changed) and {key}-dir.csv (the changed pairs, label 1 = up);
    knockdowns KD20-KD23 are the test split."""
    folder.mkdir(parents=True, exist_ok=True)
    de, dirs = ["pert,gene,label,split"], ["pert,gene,label,split"]
    for i, p in enumerate(PERTS):
        split = "test" if i >= 20 else "train"
        for j, g in enumerate(GENES):
            changed = (i + j) % 3 == 0
            de.append(f"{p},{g},{int(changed)},{split}")
            if changed:
                dirs.append(f"{p},{g},{int(j % 2 == 0)},{split}")
    (folder / f"{key}-de.csv").write_text("\n".join(de) + "\n")
    (folder / f"{key}-dir.csv").write_text("\n".join(dirs) + "\n")
    return folder


def own_config(folder: Path) -> Path:
    cfg = {
        "name": "mine", "seed": 0,
        "data": {"train_cells": ["myscreen"], "test_cells": ["myscreen"], "val_fraction": 0.1,
                 "extra_cell_lines": {"myscreen": {"name": "MyScreen", "source": "screen",
                                                   "description": "a CRISPRi screen in my own cell line"}},
                 "train_subsample": {"n": 48, "balance": True}},
        "eval_sets": {"mine_test": {"test_cells": ["myscreen"]}},
        "teacher": {"mode": "evidence"}, "judge": {"kind": "rules"},
        "train": {"base_model": "tiny", "evidence": True, "max_length": 512, "eval_fraction": 0.1,
                  "logging_steps": 2, "optim": {"lr": 3.0e-3, "epochs": 1, "batch_size": 8, "warmup": 0.0}},
        "eval": {"n_bootstrap": 10, "figures": False, "inference": {"max_new_tokens": 16, "batch_size": 16}},
    }
    path = folder / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(tmp_path: Path) -> dict:
    # no PerturbQA anywhere: not in SYNTHPERT_DATA, not in the download cache under HOME
    return {**os.environ, "SYNTHPERT_DATA": str(tmp_path / "no_perturbqa_here"), "HOME": str(tmp_path / "home"),
            "XDG_CACHE_HOME": str(tmp_path / "home" / ".cache"), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthpert.cli", *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=900)


def test_a_missing_screen_folder_names_the_screen_not_data_fetch(tmp_path):
    from synthpert.config.data import DataConfig
    from synthpert.dataset import load_lines

    cfg = DataConfig(train_cells=["myscreen"], test_cells=["myscreen"], extra_cell_lines={
        "myscreen": {"description": "mine", "source": str(tmp_path / "typo")}})
    with pytest.raises(SynthpertError) as e:
        load_lines(cfg)
    assert "data.extra_cell_lines.myscreen.source: folder" in str(e.value) and "myscreen-de.csv" in str(e.value)
    assert "data fetch" not in str(e.value)


def test_a_merge_file_can_replace_the_eval_sets(tmp_path):
    from synthpert.config import load_section
    from synthpert.config.run import RunConfig

    mine = tmp_path / "mine.yaml"
    mine.write_text("eval_sets:\n  _replace: true\n  mine_test: {test_cells: [k562]}\n")
    root = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    assert list(load_section(RunConfig, None, root, [], merge=[mine]).eval_sets) == ["mine_test"]
    added = tmp_path / "added.yaml"
    added.write_text("eval_sets:\n  mine_test: {test_cells: [k562]}\n")
    assert "k562_test" in load_section(RunConfig, None, root, [], merge=[added]).eval_sets


def test_own_screen_data_builds_without_perturbqa(tmp_path, monkeypatch):
    from synthpert.config import load_section
    from synthpert.config.run import RunConfig
    from synthpert.dataset import load_lines
    from synthpert.data import build

    monkeypatch.setenv("SYNTHPERT_DATA", str(tmp_path / "no_perturbqa_here"))
    write_screen(tmp_path / "screen")
    cfg = load_section(RunConfig, None, own_config(tmp_path))
    _, summary = build(cfg.data, tmp_path / "data", load_lines(cfg.data))
    assert summary["splits"]["train"]["n"] > 0 and summary["splits"]["test"]["n"] == 4 * len(GENES)
    built = json.loads((tmp_path / "data" / "data_config.json").read_text())
    assert built["source"] is None and built["extra_cell_lines"]["myscreen"]["source"].endswith("screen")


@pytest.mark.slow
def test_own_screen_builds_trains_evaluates_and_predicts_without_perturbqa(tmp_path):
    write_screen(tmp_path / "screen")
    config = own_config(tmp_path)
    r = _cli(tmp_path, "run", str(config))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "offline heuristics" in r.stdout and "synthpert predict --run runs/mine" in r.stdout
    manifest = json.loads((tmp_path / "runs" / "mine" / "train" / "manifest.json").read_text())
    assert manifest["extra_cell_lines"]["myscreen"]["source"].endswith("screen")

    r = _cli(tmp_path, "predict", "--run", "runs/mine", "--cell", "MyScreen", "--perturbation", "KD21",
             "--gene", "RG3", "inference.max_new_tokens=16")
    assert r.returncode == 0, r.stderr[-3000:]
    answer = json.loads(r.stdout)
    assert answer["cell_line"] == "myscreen" and answer["label"] and set(answer["probabilities"]) == {
        "up", "down", "not_de"}

    r = _cli(tmp_path, "predict", "--run", "runs/mine", "--baseline", "combined", "--cell", "myscreen",
             "--perturbation", "KD21", "--gene", "RG3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["decision"]["rule"] == "baseline combined"

    r = _cli(tmp_path, "predict", "--run", "runs/mine", "--cell", "hela", "--perturbation", "KD21", "--gene", "RG3")
    assert r.returncode == 2 and "unknown cell line 'hela'" in r.stderr and "Traceback" not in r.stderr
