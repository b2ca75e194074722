"""`--run RUN_DIR`: a folder `synthpert run` wrote supplies predict / serve / eval / decide with the model, the
adapter, the evidence data and the run's own cell lines; the errors around those paths name the right folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synthpert.errors import SynthpertError


def _fake_run(root: Path, evidence: bool = True, extra: dict | None = None, rl: bool = False) -> Path:
    """The files of runs/NAME that --run reads (manifests and folders; no weights)."""
    run = root / "runs" / "quick"
    (run / "base_model").mkdir(parents=True)
    (run / "base_model" / "config.json").write_text("{}")
    (run / "data" / "train").mkdir(parents=True)
    config = {"data": {"extra_cell_lines": extra or {}}, "train": {"base_model": "tiny"}, "rl": {} if rl else None}
    (run / "manifest.json").write_text(json.dumps({"config": config}))
    for stage in ("train", "rl") if rl else ("train",):
        (run / stage).mkdir()
        (run / stage / "manifest.json").write_text(json.dumps({
            "base_model": "elsewhere/runs/quick/base_model", "evidence": evidence,
            "config": {"dataset_dir": "elsewhere/runs/quick/data/train"}}))
    return run


def test_a_run_folder_supplies_model_adapter_and_evidence(tmp_path):
    from synthpert.run_folder import resolve_model_paths

    run = _fake_run(tmp_path)
    model, adapter, evidence, _ = resolve_model_paths(run, None, None, None)
    # the run folder's own copies, not the manifest's paths (relative to wherever the run was started)
    assert (model, adapter, evidence) == (str(run / "base_model"), str(run / "train"), str(run / "data" / "train"))


def test_a_run_without_evidence_gives_no_evidence_and_flags_win(tmp_path):
    from synthpert.run_folder import resolve_model_paths

    run = _fake_run(tmp_path, evidence=False)
    assert resolve_model_paths(run, None, None, None)[2] is None
    model, adapter, _, _ = resolve_model_paths(run, "my/model", str(tmp_path), None)
    assert (model, adapter) == ("my/model", str(tmp_path))


def test_a_run_with_rl_serves_the_rl_adapter(tmp_path):
    from synthpert.run_folder import read_run_folder

    run = _fake_run(tmp_path, rl=True)
    assert read_run_folder(run).adapter == str(run / "rl")


def test_a_run_registers_its_own_cell_lines(tmp_path):
    from synthpert.cells import get_cell_line
    from synthpert.run_folder import resolve_model_paths

    run = _fake_run(tmp_path, extra={"myscreen": {"name": "MyScreen", "description": "my own CRISPRi screen",
                                                  "source": str(tmp_path)}})
    with pytest.raises(SynthpertError):
        get_cell_line("myscreen")
    resolve_model_paths(run, None, None, None)
    assert get_cell_line("MyScreen").key == "myscreen"


@pytest.mark.parametrize("setup,message", [
    (lambda p: p / "nope", "folder does not exist"),
    (lambda p: p, "no manifest.json"),
])
def test_run_folder_errors_name_the_problem(tmp_path, setup, message):
    from synthpert.run_folder import read_run_folder

    with pytest.raises(SynthpertError, match=message):
        read_run_folder(setup(tmp_path))


def test_an_unfinished_run_says_to_finish_it(tmp_path):
    from synthpert.run_folder import read_run_folder

    run = _fake_run(tmp_path)
    (run / "train" / "manifest.json").unlink()
    with pytest.raises(SynthpertError, match="no trained adapter yet"):
        read_run_folder(run)


def test_evidence_errors_name_the_folder_the_adapter_was_trained_with(tmp_path):
    from synthpert.inference import check_evidence_setting

    run = _fake_run(tmp_path)
    with pytest.raises(SynthpertError) as e:
        check_evidence_setting(str(run / "train"), None)
    assert "--evidence-from elsewhere/runs/quick/data/train (the folder it was trained with)" in str(e.value)
    assert "--run RUN_DIR" in str(e.value)


def test_a_mistyped_adapter_with_evidence_from_says_folder_does_not_exist(tmp_path):
    from synthpert.inference import check_evidence_setting

    run = _fake_run(tmp_path)
    with pytest.raises(SynthpertError, match="adapter .*trian: folder does not exist"):
        check_evidence_setting(str(run / "trian"), str(run / "data" / "train"))


def test_predict_without_model_or_run_says_what_to_give(tmp_path):
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "predict", "--cell", "k562", "--perturbation", "MYC",
                        "--gene", "GAPDH"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert r.returncode == 2 and "--run RUN_DIR" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_predict_with_run_answers_like_the_readme_says(tmp_path, tiny_model_dir, tiny_adapter_dir,
                                                       tiny_built_dataset):
    """`synthpert predict --run runs/NAME --cell K562 ...` on a run folder laid out as `synthpert run` writes it."""
    run = tmp_path / "runs" / "quick"
    run.mkdir(parents=True)
    shutil.copytree(tiny_model_dir, run / "base_model")
    shutil.copytree(tiny_adapter_dir, run / "train")
    shutil.copytree(tiny_built_dataset, run / "data" / "train")
    (run / "manifest.json").write_text(json.dumps({"config": {"data": {}, "train": {"base_model": "tiny"}}}))
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "predict", "--run", "runs/quick", "--cell", "K562",
                        "--perturbation", "MYC", "--gene", "GAPDH", "inference.max_new_tokens=8"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["cell_line"] == "k562" and answer["label"] and set(answer["probabilities"]) == {"up", "down",
                                                                                                  "not_de"}

    # decide and eval take the same folder: the rule lands beside the run's adapter, eval scores with it
    r = _run_cli(tmp_path, "decide", "--run", "runs/quick", "--n", "8", "inference.max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    assert (run / "train" / "decision.json").exists()
    r = _run_cli(tmp_path, "eval", "--run", "runs/quick", "--dataset", "runs/quick/data/train", "--n", "4",
                 "--out", "ev", "inference.max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["run"]["backend_info"]["adapter"].endswith(
        "train")

    # serve --run answers the README's request
    served = _serve_run(tmp_path)
    assert served["label"] and served["adapter"].endswith("train")


def _run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthpert.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _serve_run(cwd: Path) -> dict:
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "synthpert.cli", "serve", "--run", "runs/quick", "--port", str(port),
                             "--max-new-tokens", "8"], cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", timeout=60,
                               content=b'{"cell_line":"K562","perturbation":"MYC","gene":"GAPDH"}')
                return r.raise_for_status().json()
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "serve --run did not come up"
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_adapters_own_cell_lines_are_known_to_predict_and_others_are_a_clear_error(tmp_path):
    from synthpert.cells import get_cell_line
    from synthpert.predict import check_triples
    from synthpert.run_folder import register_cell_lines_for

    import pandas as pd

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "manifest.json").write_text(json.dumps({"extra_cell_lines": {
        "myscreen": {"name": "MyScreen", "description": "my own screen", "source": str(tmp_path)}}}))
    rows = pd.DataFrame([{"cell_line": "MyScreen", "perturbation": "MYC", "gene": "GAPDH"}])
    with pytest.raises(SynthpertError, match="unknown cell line 'MyScreen'.*--run RUN_DIR"):
        check_triples(rows, "command line")
    register_cell_lines_for(str(adapter), None)
    assert check_triples(rows, "command line")["cell_line"].tolist() == ["myscreen"]
    assert get_cell_line("myscreen").description == "my own screen"


def test_a_mistyped_evidence_folder_says_folder_does_not_exist(tmp_path):
    from synthpert.run_folder import resolve_model_paths

    with pytest.raises(SynthpertError, match="--evidence-from .*dat: folder does not exist"):
        resolve_model_paths(None, "m", None, str(tmp_path / "dat"))
