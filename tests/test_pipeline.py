"""End to end: a smaller quickstart through `synthpert run`, interrupted and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]



def _small_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["name"] = "e2e"
    cfg["data"]["train_subsample"] = {**cfg["data"]["train_subsample"], "n": 90}  # the recipe, smaller
    cfg["eval_sets"] = {"k562_test": {"test_cells": ["k562"], "n": 24},
                        "rpe1_unseen": {"test_cells": ["rpe1"], "n": 24}}
    cfg["train"]["save_steps"] = 4
    cfg["train"]["optim"]["epochs"] = 2
    cfg["eval"]["n_bootstrap"] = 20
    cfg["eval"]["decision_fit_n"] = 60  # the tuned rule still fits, on fewer validation rows
    cfg["eval"]["figures"] = False
    cfg["eval"]["inference"]["max_new_tokens"] = 48
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg: Path, runs: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthpert.cli", "run", str(cfg), "--runs-dir", str(runs), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_quickstart_pipeline_interrupted_and_resumed(tmp_path, perturbqa_dir):
    cfg = _small_config(tmp_path)
    runs = tmp_path / "runs"
    env = {**os.environ, "SYNTHPERT_DATA": str(perturbqa_dir), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    # 1. Interrupt (Ctrl-C) once training has written a checkpoint.
    proc = subprocess.Popen([sys.executable, "-m", "synthpert.cli", "run", str(cfg), "--runs-dir", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    ckpt_dir = runs / "e2e" / "train" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(ckpt_dir.glob("checkpoint-*")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    out1 = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    run_dir = runs / "e2e"
    assert (run_dir / "generate" / "stage.json").exists() and (run_dir / "judge" / "stage.json").exists()
    assert not (run_dir / "train" / "stage.json").exists(), out1
    traces_mtime = (run_dir / "generate" / "traces.jsonl").stat().st_mtime

    # 2. Rerun: finished stages are skipped, training resumes from its checkpoint, the run completes.
    r2 = _run(cfg, runs, env)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    for stage in ("data", "base_model", "generate", "judge"):
        assert f"[{stage}] up to date, skipped" in r2.stdout
    assert "[train] resuming" in r2.stdout
    assert (run_dir / "generate" / "traces.jsonl").stat().st_mtime == traces_mtime
    train_summary = json.loads((run_dir / "train" / "stage.json").read_text())["summary"]
    assert train_summary["resumed_from"] and train_summary["last_logged_loss"] < train_summary["first_logged_loss"]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["name"] == "e2e" and manifest["versions"]["torch"]
    assert set(manifest["stages"]) == {"data", "base_model", "generate", "judge", "train", "eval"}
    assert manifest["counts"]["traces_generated"] == 90 and manifest["counts"]["examples_trained"] > 0
    for name in ("k562_test", "rpe1_unseen"):
        metrics = json.loads((run_dir / "eval" / name / "result" / "metrics.json").read_text())
        assert metrics["n_predicted"] == 24
        report = (run_dir / "eval" / name / "result" / "report.md").read_text()
        assert "majority" in report and "gene_prior" in report
        # the closing summary repeats metrics.json's verdict, set by set
        v = metrics["verdict"]["macro_f1"]
        assert (f"{name} (24 pairs) macro-F1: model {v['model']:.3f}" in r2.stdout
                and f"best baseline {v['best_baseline']} {v['baseline']:.3f}" in r2.stdout), r2.stdout[-3000:]
    assert "Traceback" not in r2.stderr and "At a glance" in r2.stdout, r2.stderr

    # 3. A third run does nothing; changing an eval setting reruns only the evaluation.
    r3 = _run(cfg, runs, env)
    assert r3.returncode == 0 and r3.stdout.count("up to date, skipped") == 6
    r4 = _run(cfg, runs, env, "eval.n_bootstrap=10")
    assert r4.returncode == 0, r4.stdout + r4.stderr
    assert "[train] up to date, skipped" in r4.stdout and "[eval] running" in r4.stdout


def test_run_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  base_model: tiny\n  lora: {rank: 8}\n")
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "run", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown key 'train.lora.rank'" in r.stderr and "did you mean 'r'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "run", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "config file not found" in r.stderr


@pytest.mark.parametrize("name", ["quickstart.yaml", "synthpert-k562.yaml", "unseen-rpe1.yaml"])
def test_shipped_run_configs_validate(name):
    from synthpert.config import load_section
    from synthpert.config.run import RunConfig

    cfg = load_section(RunConfig, None, ROOT / "configs" / name)
    assert cfg.name == name.removesuffix(".yaml") and cfg.eval_sets


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_run_fits_the_tuned_decision_on_validation_rows_before_eval(tmp_path, perturbqa_dir, method):
    """eval.decision: tuned → the run fits decision.json on its validation split, then every set applies it.
    train.method=full: the same run with a whole fine-tuned model in train/ instead of an adapter."""
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["name"] = "tuned"
    cfg["train"]["method"] = method
    cfg["data"]["train_subsample"] = {**cfg["data"]["train_subsample"], "n": 60}
    cfg["train"]["mode"] = "label_only"
    cfg["train"]["optim"]["epochs"] = 1
    cfg["eval_sets"] = {"k562_test": {"test_cells": ["k562"], "n": 20}}
    cfg["eval"].update({"n_bootstrap": 0, "figures": False, "decision": "tuned", "decision_fit_n": 30})
    cfg["eval"]["inference"]["max_new_tokens"] = 12
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "SYNTHPERT_DATA": str(perturbqa_dir), "HF_HUB_OFFLINE": "1"}
    r = _run(path, tmp_path / "runs", env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tuned"
    decision = json.loads((run_dir / "train" / "decision.json").read_text())
    assert decision["rule"] == "tuned" and decision["fitted_on"]["split"] == "validation"
    assert decision["fitted_on"]["n"] == 30
    fitted = [json.loads(line)["id"] for line in (run_dir / "eval" / "decision_fit" / "predictions.jsonl").open()]
    assert fitted and all(i.split(":")[0] in cfg["data"]["train_cells"] for i in fitted)  # training lines
    from synthpert.dataset import load_built

    test_ids = set(load_built(run_dir / "eval" / "k562_test" / "data", "test")["id"])
    assert not test_ids & set(fitted)  # fitted on validation rows only, never on a test pair
    metrics = json.loads((run_dir / "eval" / "k562_test" / "result" / "metrics.json").read_text())
    assert metrics["decision"]["rule"] == "tuned" and "decided" in metrics["model"]
    if method == "full":
        from synthpert.backends import adapter_version

        train = run_dir / "train"
        assert (train / "model.safetensors").is_file() and not (train / "adapter_config.json").exists()
        assert json.loads((train / "manifest.json").read_text())["method"] == "full"
        assert decision["adapter_hash"] == adapter_version(train)  # bound to the full model's weights
        assert metrics["n_predicted"] == 20
        again = _run(path, tmp_path / "runs", env)  # the stage check hashes the model's weights
        assert again.returncode == 0 and "[train] up to date, skipped" in again.stdout, again.stdout[-2000:]


@pytest.mark.slow
def test_run_sigkilled_between_stages_reruns_exactly_the_unfinished_ones(tmp_path, perturbqa_dir, tiny_model_dir):
    """`synthpert run` SIGKILLed the moment the generate stage has recorded its completion: the rerun skips
    exactly the stages complete at the kill, leaves their outputs untouched, and runs the next one (an API
    judge against a slow local server, so the kill lands before it can finish; its cache keeps what it bought)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_openai_server import FakeOpenAIServer

    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["name"] = "k"
    cfg["data"].update(train_cells=["k562"], train_subsample={"n": 12, "balance": True})
    cfg["eval_sets"] = {"k562_test": {"test_cells": ["k562"], "n": 4}}
    cfg["train"]["base_model"] = str(tiny_model_dir)  # no base_model stage
    env = {**os.environ, "SYNTHPERT_DATA": str(perturbqa_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "FAULT_JUDGE_KEY": "k"}
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "k"
    with FakeOpenAIServer(latency_ms=150) as srv:
        cfg["judge"] = {"kind": "llm", "model": "fake-model", "base_url": srv.base_url, "concurrency": 1,
                        "api_key_env": "FAULT_JUDGE_KEY", "judge_mismatched": True, "progress": False}
        path = tmp_path / "k.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "synthpert.cli", "run", str(path), "--runs-dir", str(runs)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 120
        while not (run_dir / "generate" / "stage.json").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "timed out waiting for the generate stage"
            time.sleep(0.005)
        proc.kill()
        proc.communicate(timeout=30)
        complete = [s for s in ("data", "generate", "judge") if (run_dir / s / "stage.json").exists()]
        assert complete == ["data", "generate"]  # the judge needs >= 12 x 150 ms
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for s in complete for p in (run_dir / s).rglob("*")
                  if p.is_file() and p.name != "stage.pending.json"}

        r = _run(path, runs, env, "--until", "judge")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert srv.stats()["duplicates"] <= 1  # bought twice: only a request in flight at the kill
    skipped = [s for s in ("data", "generate", "judge") if f"[{s}] up to date, skipped" in r.stdout]
    assert skipped == complete  # exactly the completed stages
    assert "[judge] resuming" in r.stdout or "[judge] running" in r.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before  # their outputs untouched
    assert json.loads((run_dir / "judge" / "stage.json").read_text())["summary"]["traces"] == 12


def test_a_judge_that_kept_nothing_stops_the_run_with_its_reasons(tmp_path):
    """A real weak judge (or teacher) can leave nothing to train on: the run says so, with what was rejected and
    why, before train would fail on an empty file."""
    from synthpert.config.run import RunConfig
    from synthpert.errors import SynthpertError
    from synthpert.pipeline import Pipeline

    pipe = Pipeline(RunConfig(name="x", train={"base_model": "tiny"}), tmp_path / "x")
    judge = pipe.stage_dir("judge")
    judge.mkdir(parents=True)
    (judge / "summary.json").write_text(json.dumps({"traces": 12, "kept": 0, "rejection_reasons": {
        "answer != label": 7, "rated below threshold": 5}}))
    with pytest.raises(SynthpertError, match=r"kept none of the 12 traces \(rejected: answer != label 7, rated "
                                             r"below threshold 5\).*teacher\.samples"):
        pipe._check_kept()
    (judge / "summary.json").write_text(json.dumps({"traces": 12, "kept": 3}))
    pipe._check_kept()  # something to train on: no error
