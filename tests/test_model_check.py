"""Base models are checked before anything runs (issue 27): a name that is neither a model folder nor a model
the hub knows fails within seconds naming both readings; a folder that is no model fails at the check, not
an hour into training; a tiny-model learning rate on a pretrained model is said out loud."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from synthpert.model_check import base_model_problem, learning_rate_note


def test_a_missing_local_folder_names_both_readings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problem = base_model_problem("./runs/no_such_model")
    assert "no folder runs/no_such_model exists here" in problem and "hub id" in problem


def test_an_unknown_hub_id_offline_fails_at_once_naming_both_readings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    problem = base_model_problem("no-such-org-27/no_such_model")
    assert time.monotonic() - started < 5
    assert "no folder no-such-org-27/no_such_model exists here" in problem
    assert "as a hub id no-such-org-27/no_such_model is not in the local hub cache" in problem


def test_a_folder_that_is_not_a_model_fails_the_check(tmp_path):
    empty = tmp_path / "notes"
    empty.mkdir()
    assert "is a folder but not a model" in base_model_problem(str(empty))
    only_config = tmp_path / "half"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32}))
    assert "its tokenizer does not load" in base_model_problem(str(only_config))


def test_a_tiny_learning_rate_on_a_pretrained_model_is_noted():
    assert learning_rate_note("tiny", True, 3e-3) is None
    assert learning_rate_note("org/model", False, 2e-4) is None
    note = learning_rate_note("org/model", False, 3e-3)
    assert "lr=0.003 is a learning rate for the tiny random model" in note and "org/model" in note


def test_run_with_a_base_model_that_is_nowhere_fails_before_the_data_stage(tmp_path, perturbqa_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SYNTHPERT_DATA": str(perturbqa_dir)}
    cfg = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "run", str(cfg), "--runs-dir", str(tmp_path / "runs"),
                        "train.base_model=no-such-org-27/no_such_model"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert time.monotonic() - started < 60
    assert r.returncode == 2 and "not in the local hub cache" in r.stderr, r.stderr
    assert "lr=0.003 is a learning rate for the tiny random model" in r.stdout + r.stderr
    assert not (tmp_path / "runs" / "quickstart" / "data" / "stage.json").exists()


def test_train_checks_its_base_model_before_loading_anything(tmp_path):
    (tmp_path / "notamodel").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, message in (("notamodel", "notamodel is a folder but not a model"),
                          ("no-such-org-27/m", "is not in the local hub cache")):
        r = subprocess.run([sys.executable, "-m", "synthpert.cli", "train", "--data", "kept.jsonl", "--out", "o",
                            f"base_model={name}"], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=120)
        assert r.returncode == 2 and "train.base_model: " in r.stderr and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
