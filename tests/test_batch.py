"""Teacher and judge through the OpenAI Batch API: the real openai SDK against a local server that serves
/v1/files and /v1/batches (tests/fake_openai_server.py), on real PerturbQA rows.

What is pinned: a full round trip lands every answer in the same cache as the chat path, at the batch price
(summary, records, manifest totals); a SIGKILL while polling leaves the job id on disk and the rerun polls
it, submitting nothing twice (counted at the server); failed / expired batches and per-request errors
resubmit exactly the requests without an answer (or report them, --no-resubmit); damaged output files keep
their good lines; batch files round-trip through an external runner (``vllm run-batch``'s format); no API
key in any file written.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _procs import communicate, synthpert_process  # noqa: E402
from fake_openai_server import FakeOpenAIServer, run_batch_file  # noqa: E402

from synthpert.config.data import DataConfig, SubsampleConfig  # noqa: E402
from synthpert.config.generate import JudgeConfig, TeacherConfig  # noqa: E402
from synthpert.errors import SynthpertError  # noqa: E402
from synthpert.generate import run_generate  # noqa: E402
from synthpert.judge import run_judge  # noqa: E402
from synthpert.runs import Manifest, StageRecord  # noqa: E402
from synthpert.schema import TraceRecord, read_jsonl  # noqa: E402

KEY_ENV = "SYNTHPERT_TEST_API_KEY"
KEY = "sk-test-SECRET-0123456789abcdef"
N = 12  # training triples: enough to split files and to fail some, few enough to stay fast
PROMPT, COMPLETION = 300, 120
CHAT_COST = (PROMPT * 1.0 + COMPLETION * 2.0) / 1e6  # per request at the chat prices below


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, perturbqa_dir) -> Path:
    from synthpert.data import build

    out = tmp_path_factory.mktemp("run") / "data"
    cfg = DataConfig(source=str(perturbqa_dir), train_cells=["k562"], test_cells=["k562"], seed=0,
                     train_subsample=SubsampleConfig(n=N, balance=True), val_subsample=SubsampleConfig(n=3),
                     test_subsample=SubsampleConfig(n=3))
    build(cfg, out)
    return out


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def server():
    with FakeOpenAIServer(prompt_tokens=PROMPT, completion_tokens=COMPLETION) as srv:
        yield srv


def batch_cfg(srv: FakeOpenAIServer, **kw) -> dict:
    return {"model": "fake-model", "base_url": srv.base_url, "api_key_env": KEY_ENV, "timeout": 10,
            "progress": False, "max_retries": 0, "prices": {"fake-model": {"input": 1.0, "output": 2.0}},
            "batch": True, "batch_poll_interval": 0.02, **kw}


def submitted(srv: FakeOpenAIServer) -> list[list[str]]:
    return srv.state.batch_submissions


def assert_no_key(*folders: Path, texts: tuple[str, ...] = ()) -> None:
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                assert KEY.encode() not in f.read_bytes(), f
    for t in texts:
        assert KEY not in t


def cache_keys(out: Path) -> set[str]:
    db = sqlite3.connect(out / "cache.sqlite")
    try:
        return {k for (k,) in db.execute("SELECT key FROM responses")}
    finally:
        db.close()


def test_round_trip_teacher_and_judge_at_batch_price_in_files_within_limits(dataset, server, tmp_path):
    out = tmp_path / "traces"
    s = run_generate(TeacherConfig(**batch_cfg(server, batch_max_requests=5)), dataset, out)
    assert s["complete"] and s["traces"] == N and s["answer_matches_label"] == N
    assert not server.received  # nothing through the chat endpoint
    assert [len(ids) for ids in submitted(server)] == [5, 5, 2]  # split at batch_max_requests, in order
    # custom_id is the cache key: every submitted id is now a cached response, and each exactly once.
    ids = [i for ids in submitted(server) for i in ids]
    assert len(set(ids)) == N and set(ids) == cache_keys(out)
    assert s["cost_usd_this_run"] == pytest.approx(N * CHAT_COST * 0.5)
    assert s["cost_usd_total"] == pytest.approx(N * CHAT_COST * 0.5)
    traces = list(read_jsonl(out / "traces.jsonl", TraceRecord))
    assert sum(t.cost_usd for t in traces) == pytest.approx(N * CHAT_COST * 0.5)
    assert s["engine"]["batch"]["jobs_created"] == 3 and s["engine"]["batch"]["requests_submitted"] == N
    jobs = json.loads((out / "batches.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["completed"] * 3 and all(j["collected"] for j in jobs)
    # the manifest's cost ledger totals the stage at the batch price
    manifest = Manifest(tmp_path / "run", {}, 0)
    (tmp_path / "run").mkdir()
    manifest.record_stage("generate", StageRecord("generate", "i", "o", 1.0, s, "now"), skipped=False)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["totals"]["cost_usd"] == pytest.approx(
        N * CHAT_COST * 0.5)
    # a rerun is answered by the cache: no new batch
    again = run_generate(TeacherConfig(**batch_cfg(server)), dataset, out)
    assert again["engine"]["from_cache"] == N and len(submitted(server)) == 3
    assert again["cost_usd_total"] == pytest.approx(N * CHAT_COST * 0.5)  # still the price it was bought at

    j = run_judge(JudgeConfig(**batch_cfg(server, batch_discount=0.4)), out / "traces.jsonl", tmp_path / "judged")
    assert j["complete"] and j["kept"] == N and len(submitted(server)) == 4
    assert j["cost_usd_this_run"] == pytest.approx(N * CHAT_COST * 0.4)
    assert all(h == f"Bearer {KEY}" for h in server.state.auth_headers)
    assert_no_key(tmp_path)
    for f in server.state.files.values():  # what was uploaded holds requests, never the key
        assert KEY.encode() not in f["bytes"]


def test_dry_run_estimates_at_the_batch_price(dataset, server, tmp_path):
    chat = run_generate(TeacherConfig(**{**batch_cfg(server), "batch": False}), dataset, tmp_path / "a", dry_run=True)
    batch = run_generate(TeacherConfig(**batch_cfg(server)), dataset, tmp_path / "b", dry_run=True)
    assert batch["est_cost_usd"] == pytest.approx(chat["est_cost_usd"] * 0.5, abs=1e-4)  # both rounded to 4 places
    assert batch["batch"] == {"discount": 0.5, "files": 1}
    assert not submitted(server)


def test_partial_failure_resubmits_exactly_the_failed_requests(dataset, server, tmp_path, caplog):
    server.inject_batch("request_errors", n=3)
    with caplog.at_level(logging.WARNING, logger="synthpert.batch"):
        s = run_generate(TeacherConfig(**batch_cfg(server)), dataset, tmp_path / "t")
    assert s["complete"] and s["traces"] == N
    first, second = submitted(server)
    assert second == first[:3]  # exactly the three that failed, nothing else
    assert server.stats()["batch_duplicates"] == 3
    assert s["engine"]["batch"]["requests_resubmitted"] == 3
    assert "completed with 3 of 12 request(s) unanswered" in caplog.text and "HTTP 500" in caplog.text
    assert s["cost_usd_this_run"] == pytest.approx(N * CHAT_COST * 0.5)  # failures are not billed


def test_expired_and_failed_batches_resubmit_only_the_missing_or_report_them(dataset, server, tmp_path):
    server.inject_batch("expire")
    s = run_generate(TeacherConfig(**batch_cfg(server, batch_resubmit=False)), dataset, tmp_path / "t")
    assert not s["complete"] and s["traces"] == N // 2 and s["engine"]["failed"] == N // 2
    assert "batch_expired" in json.dumps(s["engine"]["failed_examples"])
    # rerun with --no-resubmit still: reported again, nothing submitted
    s = run_generate(TeacherConfig(**batch_cfg(server, batch_resubmit=False)), dataset, tmp_path / "t")
    assert len(submitted(server)) == 1 and s["engine"]["failed"] == N // 2
    # rerun allowing resubmission: only the expired half goes out; a batch that fails validation, then one
    # more round for the same requests
    server.inject_batch("fail")
    s = run_generate(TeacherConfig(**batch_cfg(server)), dataset, tmp_path / "t")
    assert s["complete"] and s["traces"] == N
    first, failed, last = submitted(server)
    assert failed == last == first[N // 2:]
    assert s["engine"]["batch"]["problems"][0].startswith("batch batch_000002 ended failed (invalid_file")


def test_damaged_output_keeps_good_lines_and_resubmits_the_lost_request(dataset, server, tmp_path, caplog):
    server.inject_batch("bad_output")
    with caplog.at_level(logging.WARNING, logger="synthpert.batch"):
        s = run_generate(TeacherConfig(**batch_cfg(server)), dataset, tmp_path / "t")
    assert s["complete"] and s["traces"] == N
    first, second = submitted(server)
    assert second == [first[-1]]  # only the request whose line was cut off
    for needle in ("is not valid JSON", "unknown custom_id", "is cut off (truncated file)"):
        assert needle in caplog.text
    assert len(s["engine"]["batch"]["problems"]) >= 3


@pytest.mark.parametrize("window", ["after the batch was created", "before the batch was created"])
def test_a_kill_inside_the_submission_is_recovered_without_a_second_batch(dataset, server, tmp_path, monkeypatch,
                                                                          window):
    """The narrowest windows: the process dies between uploading the file and creating its batch, or between
    the API creating the batch and its id reaching the disk. The rerun finds the batch by its input file (or
    creates it from the file already uploaded) instead of submitting the requests again."""
    from openai.resources.batches import Batches

    from synthpert.chat.cache import ResponseCache

    def die(*a, **kw):
        raise KeyboardInterrupt  # what a kill looks like from here: nothing after this line runs

    if window == "after the batch was created":
        monkeypatch.setattr(ResponseCache, "rename_batch_job", die)
    else:
        monkeypatch.setattr(Batches, "create", die)
    with pytest.raises(KeyboardInterrupt):
        run_generate(TeacherConfig(**batch_cfg(server)), dataset, tmp_path / "t")
    monkeypatch.undo()
    monkeypatch.setenv(KEY_ENV, KEY)
    assert len(server.state.files) == 1 and len(submitted(server)) == (window == "after the batch was created")
    s = run_generate(TeacherConfig(**batch_cfg(server)), dataset, tmp_path / "t")
    assert s["complete"] and s["traces"] == N
    assert len(submitted(server)) == 1 and server.stats()["batch_duplicates"] == 0
    assert s["engine"]["batch"]["jobs_resumed"] == 1
    assert sum(f["purpose"] == "batch" for f in server.state.files.values()) == 1  # the upload was reused


def test_max_cost_submits_only_what_fits_at_its_worst_case_batch_price(dataset, server, tmp_path):
    s = run_generate(TeacherConfig(**batch_cfg(server, max_cost=0.01)), dataset, tmp_path / "t")
    assert s["engine"]["stopped"] == "max_cost" and 0 < s["traces"] < N
    assert [len(ids) for ids in submitted(server)] == [s["traces"]] and s["cost_usd_this_run"] <= 0.01
    rest = run_generate(TeacherConfig(**batch_cfg(server)), dataset, tmp_path / "t")
    assert rest["complete"] and server.stats()["batch_duplicates"] == 0


def test_export_then_import_through_an_external_runner_sends_nothing(dataset, server, tmp_path, monkeypatch):
    cfg = TeacherConfig(**{**batch_cfg(server), "batch": False})
    exp = run_generate(cfg, dataset, tmp_path / "t", export_batch=tmp_path / "requests.jsonl")
    assert exp["exported"] == N and not server.received and not submitted(server)
    lines = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert {x["url"] for x in lines} == {"/v1/chat/completions"} and lines[0]["body"]["model"] == "fake-model"
    run_batch_file(tmp_path / "requests.jsonl", tmp_path / "results.jsonl")  # stands in for `vllm run-batch`
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"custom_id": "stray", "response": {"status_code": 200, "body": {}}}\n{"cut off')
    monkeypatch.delenv(KEY_ENV)  # importing needs no key
    s = run_generate(cfg, dataset, tmp_path / "t", import_batch=tmp_path / "results.jsonl")
    assert s["complete"] and s["traces"] == N and s["import_batch"]["imported"] == N
    assert s["import_batch"]["damaged_lines"] == 2
    assert not server.received and not submitted(server)
    # what was imported is the cache: a normal run sends nothing either
    again = run_generate(cfg, dataset, tmp_path / "t")
    assert again["engine"]["from_cache"] == N and not server.received
    with pytest.raises(SynthpertError, match="offline heuristic"):
        run_generate(TeacherConfig(mode="evidence", progress=False), dataset, tmp_path / "e",
                     export_batch=tmp_path / "x.jsonl")


def test_input_files_split_by_bytes_and_by_model_and_an_oversized_request_is_refused():
    from synthpert.chat.batch_files import chunk_calls
    from synthpert.chat import Call, ChatRequest

    def call(i: int, model: str, chars: int = 100) -> Call:
        req = ChatRequest(id=f"r{i}", messages=[{"role": "user", "content": "x" * chars}])
        return Call(req, 0, f"key{i}", model, req.messages, {})

    calls = [call(i, "a") for i in range(5)] + [call(5, "b")] + [call(6, "a")]
    files = chunk_calls(calls, max_requests=50_000, max_bytes=500)  # 229 bytes a line: two fit, not three
    assert [(m, [c.key for c in cs]) for m, cs, _ in files] == [
        ("a", ["key0", "key1"]), ("a", ["key2", "key3"]), ("a", ["key4", "key6"]), ("b", ["key5"])]
    assert all(len(data) <= 500 and data.count(b"\n") == len(cs) for _, cs, data in files)
    with pytest.raises(SynthpertError, match="larger than batch_max_bytes"):
        chunk_calls([call(9, "a", chars=1000)], max_requests=10, max_bytes=500)


def test_batch_with_an_offline_teacher_or_judge_is_refused_at_load():
    with pytest.raises(ValueError, match="offline evidence heuristic"):
        TeacherConfig(mode="evidence", batch=True)
    with pytest.raises(ValueError, match="rules judge is offline"):
        JudgeConfig(kind="rules", batch=True)


# ---------------------------------------------------------------------------------------------------------
# The CLI killed while it polls


def cli(*args: str) -> subprocess.Popen:
    return synthpert_process(*args, env={KEY_ENV: KEY})


def gen_args(dataset: Path, out: Path, srv: FakeOpenAIServer, *extra: str) -> list[str]:
    return ["generate", "--json", "--dataset", str(dataset), "--out", str(out), f"teacher.base_url={srv.base_url}",
            "teacher.model=fake-model", f"teacher.api_key_env={KEY_ENV}", "teacher.batch=true",
            "teacher.batch_poll_interval=0.02", "teacher.batch_max_requests=5",
            "teacher.prices={fake-model: {input: 1.0, output: 2.0}}", *extra]


def wait_polling(proc: subprocess.Popen, srv: FakeOpenAIServer, batches: int, retrieves: int) -> None:
    end = time.monotonic() + 60
    while not (len(submitted(srv)) == batches and srv.state.batch_retrieves >= retrieves):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the CLI never polled its batches"
        time.sleep(0.01)


def test_ctrl_c_then_sigkill_while_polling_then_rerun_submits_nothing_twice(dataset, server, tmp_path):
    out = tmp_path / "traces"
    server.state.batch_hold = True  # the batches stay in progress until the client is gone
    proc = cli(*gen_args(dataset, out, server))
    wait_polling(proc, server, batches=3, retrieves=6)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = communicate(proc, timeout=30)
    assert proc.returncode == 130 and "rerun the same command to collect them" in stderr, stderr
    assert "Traceback" not in stderr and json.loads(stdout)["complete"] is False
    jobs = json.loads((out / "batches.json").read_text())["jobs"]  # the ids were on disk before the wait
    assert [j["batch_id"] for j in jobs] == sorted(server.state.batches)
    # a second run picks the jobs up and polls them; it is killed outright
    proc = cli(*gen_args(dataset, out, server))
    wait_polling(proc, server, batches=3, retrieves=server.state.batch_retrieves + 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    server.state.batch_hold = False
    proc = cli(*gen_args(dataset, out, server))
    stdout, stderr = communicate(proc, timeout=60)
    assert proc.returncode == 0, stderr
    stats = server.stats()
    assert stats["batches_created"] == 3 and stats["batch_duplicates"] == 0
    summary = json.loads(stdout)
    assert summary["complete"] and summary["traces"] == N
    assert summary["engine"]["batch"]["jobs_resumed"] == 3 and summary["engine"]["batch"]["jobs_created"] == 0
    assert summary["cost_usd_this_run"] == pytest.approx(N * CHAT_COST * 0.5)
    assert_no_key(tmp_path, texts=(stdout, stderr))
