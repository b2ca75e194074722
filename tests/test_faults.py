"""Faults in the long stages, through the real CLI on the tiny model: `synthpert eval` and `synthpert train`
SIGKILLed mid-run, then rerun. Nothing finished is lost or computed twice; training continues from the last
complete checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _procs import synthpert_process  # noqa: E402

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.Popen:
    # One thread: the child's torch would otherwise spin a thread per core against the test process's own,
    # which on a 2-core runner makes it several times slower.
    return synthpert_process(*args, env={"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})


def kill_when(proc: subprocess.Popen, cond, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to kill")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def finish(proc: subprocess.Popen, timeout: float = 300.0) -> str:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    return stdout


def test_eval_sigkilled_mid_run_reruns_only_the_unfinished_examples(tiny_built_dataset, tiny_model_dir,
                                                                    tiny_adapter_dir, tmp_path):
    out = tmp_path / "ev"
    preds = out / "predictions.jsonl"
    args = ["eval", "--json", "--dataset", tiny_built_dataset, "--model", tiny_model_dir, "--adapter", tiny_adapter_dir,
            "--out", out, "--n", 16, "chunk_size=2", "n_bootstrap=0", "figures=false",
            "inference.max_new_tokens=8", "inference.batch_size=2"]
    proc = cli(*args)
    kill_when(proc, lambda: preds.exists() and preds.read_bytes().count(b"\n") >= 4)
    at_kill = preds.read_bytes()
    finished = at_kill[: at_kill.rfind(b"\n") + 1]  # whole records; a torn tail is the example being written
    done = [json.loads(line)["id"] for line in finished.splitlines()]
    assert 4 <= len(done) < 16

    stdout = finish(cli(*args))
    summary = json.loads(stdout[stdout.index('{\n  "out"'):stdout.index("\nreport:")])
    after = preds.read_bytes()
    assert after.startswith(finished)  # every finished prediction kept, byte for byte
    new = [json.loads(line)["id"] for line in after[len(finished):].splitlines()]
    assert not set(new) & set(done)  # finished predictions recomputed: 0
    assert len(done) + len(new) == len(set(done) | set(new)) == 16  # lost: 0
    assert summary["complete"] and summary["n"] == 16


def _losses(checkpoint: Path) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _complete_steps(ckpts: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*") if (p / "trainer_state.json").exists())


def test_train_sigkilled_after_a_checkpoint_resumes_from_the_last_complete_one(tiny_model_dir, tiny_traces_path,
                                                                                tmp_path):
    from synthpert.config import load_section
    from synthpert.config.train import TrainConfig
    from synthpert.train import run_train

    settings = [f"base_model={tiny_model_dir}", "max_length=512", "seed=0", "eval_fraction=0.0", "max_examples=16",
                "logging_steps=1", "save_steps=1", "save_total_limit=3", "lora.r=8", "lora.alpha=16",
                "optim.lr=1e-2", "optim.batch_size=2", "optim.grad_accum=1", "optim.warmup=0.0", "optim.max_steps=6"]
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    args = ["train", "--json", "--data", tiny_traces_path, "--out", out, *settings]
    proc = cli(*args)
    kill_when(proc, lambda: len(_complete_steps(ckpts)) >= 2 if ckpts.is_dir() else False)
    last = max(_complete_steps(ckpts))
    assert last < 6
    # A kill while the next checkpoint was being written leaves its folder without trainer_state.json (written
    # last): make sure there is one, so the rerun has to step over it.
    partial = ckpts / f"checkpoint-{last + 1}"
    partial.mkdir(exist_ok=True)
    (partial / "trainer_state.json").unlink(missing_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\x00" * 100)

    stdout = finish(cli(*args, "--resume"))
    summary = json.loads(stdout[stdout.index('{\n  "run_dir"'):])
    assert summary["resumed_from"].endswith(f"checkpoint-{last}") and summary["global_step"] == 6

    # the same run without the kill gives the same loss curve
    import torch

    straight = tmp_path / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs had (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        run_train(load_section(TrainConfig, "train", None, settings), tiny_traces_path, straight)
    finally:
        torch.set_num_threads(threads)
    resumed, uninterrupted = _losses(ckpts / "checkpoint-6"), _losses(straight / "checkpoints" / "checkpoint-6")
    assert len(resumed) == len(uninterrupted) == 6
    assert resumed == pytest.approx(uninterrupted, rel=1e-3, abs=1e-4)


def test_a_full_disk_is_a_clear_error_naming_the_file_and_leaves_no_partial_result(tiny_built_dataset, tmp_path,
                                                                                   monkeypatch, capsys):
    """The disk fills while eval writes metrics.json: the CLI says which file and why (no traceback), no
    half-written metrics.json is left to be read as a result, and once there is space again the rerun asks
    the model nothing more."""
    import errno

    from fake_openai_server import FakeOpenAIServer

    from synthpert.cli.main import main

    out = tmp_path / "ev"
    real_write = Path.write_text

    def disk_full_for_metrics(self, data, *a, **kw):
        if self.parent == out and "metrics" in self.name:
            with open(self, "w") as f:  # what a full disk does: part of the file is written, then ENOSPC
                f.write(data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data, *a, **kw)

    def run_cli(srv) -> int:
        monkeypatch.setattr(sys, "argv", ["synthpert", "eval", "--dataset", str(tiny_built_dataset), "--out", str(out),
                                          "--backend", "openai", "--model", "fake-model", "--base-url", srv.base_url,
                                          "--n", "8", "inference.api_key_env=FAKE_KEY", "n_bootstrap=0",
                                          "figures=false"])
        with pytest.raises(SystemExit) as exit_:
            main()
        return exit_.value.code

    monkeypatch.setenv("FAKE_KEY", "k")
    with FakeOpenAIServer() as srv:
        monkeypatch.setattr(Path, "write_text", disk_full_for_metrics)
        assert run_cli(srv) == 2
        err = capsys.readouterr().err
        assert f"{out / 'metrics.json'}: No space left on device" in err and "Traceback" not in err
        assert not (out / "metrics.json").exists() and not list(out.glob(".metrics.json*"))
        assert len((out / "predictions.jsonl").read_text().splitlines()) == 8  # the predictions are kept
        asked = len(srv.received)

        monkeypatch.setattr(Path, "write_text", real_write)  # space freed
        assert run_cli(srv) == 0
        assert len(srv.received) == asked  # re-asked: 0
    assert json.loads((out / "metrics.json").read_text())["n_predicted"] == 8
