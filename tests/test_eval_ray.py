"""`eval.engine: ray`: the same predictions as the in-process run, resumable, and clear errors for bad settings.

One local Ray instance (2 CPUs) serves the module; the Ray runs are marked slow (actor start-up loads torch
and the tiny model in each worker)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

N, CHUNK = 6, 2


def _cfg(dataset, model, adapter, engine="local", **kw):
    from synthpert.config.evaluate import EvalConfig

    inference = {"model": str(model), "adapter": str(adapter) if adapter else None, "max_new_tokens": 8,
                 "batch_size": CHUNK}
    return EvalConfig(dataset=str(dataset), n=N, seed=1, n_bootstrap=0, chunk_size=CHUNK, figures=False, engine=engine,
                      ray={"num_workers": 2}, inference=inference, **kw)


def _records(out):
    recs = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("seconds")  # wall time per example, the one field that may differ
        assert r["id"] not in recs, f"duplicate prediction for {r['id']}"
        recs[r["id"]] = r
    return recs


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process(tiny_built_dataset, tiny_model_dir, tiny_adapter_dir, tmp_path_factory):
    """The single-process run the Ray runs are compared with."""
    from synthpert.evaluate import run_eval

    out = tmp_path_factory.mktemp("eval_local")
    summary = run_eval(_cfg(tiny_built_dataset, tiny_model_dir, tiny_adapter_dir), out_dir=out, progress=False)
    assert summary["engine"]["engine"] == "local" and summary["engine"]["predicted"] == N
    return out


@pytest.mark.slow
def test_ray_engine_resumes_and_predicts_what_the_in_process_run_does(ray_local, in_process, tiny_built_dataset,
                                                                      tiny_model_dir, tiny_adapter_dir, tmp_path):
    """A run that stopped after its first chunk (a killed worker, Ctrl-C) is finished on Ray by two actors: they
    score only the missing pairs, and each record equals the in-process one. (One Ray run covers both: actor
    start-up, torch and the model loaded in each worker, is most of this test's time.)"""
    from synthpert.evaluate import run_eval

    out = tmp_path / "ev"
    shutil.copytree(in_process, out)
    kept = (out / "predictions.jsonl").read_text().splitlines()[:CHUNK]
    (out / "predictions.jsonl").write_text("\n".join(kept) + "\n")
    cfg = _cfg(tiny_built_dataset, tiny_model_dir, tiny_adapter_dir, engine="ray")
    summary = run_eval(cfg, out_dir=out, progress=False)
    engine = summary["engine"]
    assert engine["engine"] == "ray" and engine["predicted"] == N - CHUNK and summary["complete"]
    assert engine["workers_used"] >= 1
    local = _records(in_process)
    # the same batches as the in-process run, so the same padding: text, parses, class probabilities equal
    assert _records(out) == local
    assert all(r["probabilities"] for r in local.values())  # answer_logprob scoring ran in the actors too
    m_local = json.loads((in_process / "metrics.json").read_text())["model"]
    assert json.loads((out / "metrics.json").read_text())["model"] == m_local
    again = run_eval(cfg, out_dir=out, progress=False)  # nothing left: no pool is built
    assert again["engine"]["predicted"] == 0


@pytest.mark.parametrize("settings, message", [
    ({"engine": "ray", "inference": {"backend": "openai", "model": "m"}}, "runs local backends"),
    ({"inference": {"backend": "transformers", "data_parallel_size": 2}}, "is a vllm setting"),
    ({"inference": {"backend": "vllm", "data_parallel_size": 2}}, "needs eval.engine ray"),
    ({"engine": "ray", "ray": {"num_workers": 3}, "inference": {"backend": "vllm", "data_parallel_size": 2}},
     "disagree"),
    ({"engine": "spark"}, "engine"),
    ({"ray": {"num_workers": 0}}, "num_workers"),
    ({"ray": {"cpus_per_worker": 1, "workers": 2}}, "workers"),
])
def test_bad_ray_and_data_parallel_settings_fail_at_load_time(settings, message):
    from synthpert.config import validate_config
    from synthpert.config.evaluate import EvalConfig
    from synthpert.errors import SynthpertError

    with pytest.raises(SynthpertError, match=message):
        validate_config(EvalConfig, settings, origin="eval")


def test_data_parallel_size_sets_the_pool_size():
    from synthpert.config.evaluate import EvalConfig

    cfg = EvalConfig(engine="ray", inference={"backend": "vllm", "data_parallel_size": 4},
                     ray={"gpus_per_worker": 1})
    assert cfg.ray_workers() == 4
    assert EvalConfig(engine="ray").ray_workers() == 1


def test_ray_engine_without_ray_names_the_extra(tiny_built_dataset, tiny_model_dir, tmp_path, monkeypatch):
    from synthpert.errors import SynthpertError
    from synthpert.evaluate import run_eval

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    cfg = _cfg(tiny_built_dataset, tiny_model_dir, None, engine="ray")
    with pytest.raises(SynthpertError, match=r"pip install 'synthpert\[ray\]'"):
        run_eval(cfg, out_dir=tmp_path, progress=False)


def test_ray_engine_checks_the_model_folder_before_starting_ray(tiny_built_dataset, tmp_path):
    from synthpert.errors import SynthpertError
    from synthpert.evaluate import run_eval

    cfg = _cfg(tiny_built_dataset, tmp_path / "no-model", tmp_path / "no-adapter", engine="ray")
    with pytest.raises(SynthpertError, match="model folder .* does not exist"):
        run_eval(cfg, out_dir=tmp_path / "out", progress=False)



def _ray_actor_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if "MapWorker" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.slow
def test_a_ray_worker_killed_mid_run_loses_and_repeats_nothing(ray_local, tiny_built_dataset, tiny_model_dir,
                                                                tiny_adapter_dir, tmp_path, monkeypatch):
    """An actor SIGKILLed once the first predictions are written, while the pool still has batches to score: Ray
    restarts it and retries its batch, and the run completes with every pair exactly once; a rerun has nothing
    left to do."""
    import os
    import signal

    import synthpert.evaluate as evaluate
    from synthpert.evaluate import run_eval

    pytest.importorskip("psutil")
    out, total = tmp_path / "ev", 40
    cfg = _cfg(tiny_built_dataset, tiny_model_dir, tiny_adapter_dir, engine="ray").model_copy(update={"n": total})
    killed: list[int] = []
    append = evaluate.append_lines

    def append_then_kill(path, lines):
        append(path, lines)
        if not killed:  # the driver waits here: the other blocks are still being scored or queued
            pids = _ray_actor_pids()
            assert pids, "no Ray Data actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(len(path.read_text().splitlines()))

    monkeypatch.setattr(evaluate, "append_lines", append_then_kill)
    summary = run_eval(cfg, out_dir=out, progress=False)
    assert killed and killed[0] < total, killed  # killed with pairs still to score
    assert summary["complete"] and summary["engine"]["predicted"] == total
    recs = _records(out)  # fails on a duplicate
    assert len(recs) == total and all(r["probabilities"] for r in recs.values())
    assert run_eval(cfg, out_dir=out, progress=False)["engine"]["predicted"] == 0
