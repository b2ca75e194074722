"""A read-only run folder and a full disk in every stage that writes: `synthpert generate`, `train` and `eval`
exit 2 with a message naming the path and no traceback; nothing half-written is left to pass for a result;
once the disk is fixed, the rerun finishes without paying twice for what was done."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _readonly import CANNOT_PROVE, cli_in_child  # noqa: E402
from fake_openai_server import FakeOpenAIServer  # noqa: E402

pytestmark = pytest.mark.slow

KEY_ENV = "SYNTHPERT_FAULTS_KEY"
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name


def teacher_args(srv: FakeOpenAIServer) -> list[str]:
    return [f"teacher.base_url={srv.base_url}", "teacher.model=fake-model", f"teacher.api_key_env={KEY_ENV}",
            "teacher.backoff_initial=0.01", "teacher.subsample={n: 6}"]


def train_settings(model: Path) -> list[str]:
    return [f"base_model={model}", "max_length=512", "seed=0", "eval_fraction=0.0", "max_examples=8",
            "logging_steps=1", "save_steps=1", "lora.r=8", "lora.alpha=16", "optim.batch_size=2",
            "optim.max_steps=3"]


def run_cli(monkeypatch, *argv) -> int:
    from synthpert.cli.main import main

    monkeypatch.setattr(sys, "argv", ["synthpert", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")


@pytest.mark.parametrize("command", ["generate", "train", "eval"])
def test_a_read_only_run_folder_is_a_clear_error_naming_it(command, tiny_built_dataset, tiny_traces_path,
                                                           tiny_model_dir, tiny_adapter_dir, tmp_path, key):
    ro = tmp_path / "ro"
    ro.mkdir()
    with FakeOpenAIServer() as srv:
        argv = {"generate": ["generate", "--dataset", tiny_built_dataset, "--out", ro, *teacher_args(srv)],
                "train": ["train", "--data", tiny_traces_path, "--out", ro, *train_settings(tiny_model_dir)],
                "eval": ["eval", "--dataset", tiny_built_dataset, "--model", tiny_model_dir, "--adapter",
                         tiny_adapter_dir, "--out", ro, "--n", 2, "n_bootstrap=0", "figures=false"]}[command]
        rc, err = cli_in_child(argv, ro, tmp_path)
        asked = len(srv.received)
    if rc == CANNOT_PROVE:
        pytest.skip("this process keeps write access to a folder with mode 0o555 (capabilities cannot be dropped)")
    assert rc == 2, err
    assert str(ro) in err and "Traceback" not in err
    assert ("Permission denied" in err or "cannot write" in err) and "move it aside" not in err
    assert not list(ro.iterdir()) and asked == 0  # nothing written, nothing paid for


def test_a_full_disk_while_generate_writes_its_traces(tiny_built_dataset, tmp_path, monkeypatch, capsys, key):
    """The disk fills while traces.jsonl is written: exit 2 naming it, no traces file (whole or partial, hidden
    or not) is left, and the rerun writes it from the response cache: 0 requests bought twice."""
    from synthpert import runs

    out = tmp_path / "gen"

    def full_disk_for_traces(path, mode="r", **kw):
        f = open(path, mode, **kw)
        if "traces.jsonl" in str(path) and "w" in mode:
            def write(text, _write=f.write):
                _write(text[: len(text) // 2])  # part of the record reaches the disk, then the disk is full
                raise ENOSPC
            f.write = write
        return f

    with FakeOpenAIServer() as srv:
        args = ["generate", "--json", "--dataset", tiny_built_dataset, "--out", out, *teacher_args(srv)]
        monkeypatch.setattr(runs, "open", full_disk_for_traces, raising=False)
        assert run_cli(monkeypatch, *args) == 2
        err = capsys.readouterr().err
        assert f"{out / 'traces.jsonl'}: No space left on device" in err and "Traceback" not in err
        assert not [p.name for p in out.iterdir() if "traces" in p.name]
        asked = len(srv.received)
        assert asked == 6

        monkeypatch.delattr(runs, "open")  # space freed
        assert run_cli(monkeypatch, *args) == 0
        assert len(srv.received) == asked  # bought twice: 0
    traces = (out / "traces.jsonl").read_text().splitlines()
    assert len({json.loads(t)["example_id"] for t in traces}) == 6


def test_a_full_disk_while_train_writes_a_checkpoint(tiny_traces_path, tiny_model_dir, tmp_path, monkeypatch,
                                                     capsys):
    """The disk fills while the second checkpoint's adapter is written (safetensors reports it as its own
    SafetensorError and removes the file, as measured on a full tmpfs): exit 2 naming the checkpoint, which is
    never taken for a complete one, the run is not marked finished, and --resume continues from step 1."""
    import peft.peft_model
    from safetensors import SafetensorError

    out = tmp_path / "run"
    real_save = peft.peft_model.safe_save_file

    def full_disk_at_step_2(tensors, filename, *a, **kw):
        if "checkpoint-2" in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, *a, **kw)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk_at_step_2)
    args = ["train", "--json", "--data", tiny_traces_path, "--out", out, *train_settings(tiny_model_dir)]
    assert run_cli(monkeypatch, *args) == 2
    err = capsys.readouterr().err
    partial = out / "checkpoints" / "checkpoint-2"
    assert f"{partial}: No space left on device" in err and "Traceback" not in err
    assert not (partial / "trainer_state.json").exists() and not (out / "manifest.json").exists()

    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save)  # space freed
    assert run_cli(monkeypatch, *args, "--resume") == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout[stdout.index('{\n  "run_dir"'):])
    assert summary["resumed_from"].endswith("checkpoint-1") and summary["global_step"] == 3
    assert json.loads((out / "manifest.json").read_text())["global_step"] == 3
    assert (partial / "trainer_state.json").exists()  # rewritten whole by the rerun


def test_torch_saves_unexplained_write_error_counts_as_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    """torch.save on a full disk raises a RuntimeError that names no cause (measured on a full tmpfs): it
    becomes ENOSPC naming the folder being written when the disk is full, and stays what it is otherwise."""
    import shutil
    from collections import namedtuple

    from synthpert.runs import storage_errors

    measured = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "optimizer.pt").write_bytes(b"PK")
    with pytest.raises(RuntimeError):  # plenty of space: some other fault, reported as it is
        with storage_errors(tmp_path):
            raise measured
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    with pytest.raises(OSError) as e:
        with storage_errors(tmp_path):
            raise measured
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "checkpoint-2")
