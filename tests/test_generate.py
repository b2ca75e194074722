"""Teacher and judge on real PerturbQA rows: offline evidence teacher + rules judge, an API teacher and
judge through the real SDK against a local server, and the CLI under SIGKILL / SIGINT / budget."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _procs import synthpert_process  # noqa: E402
from fake_openai_server import FakeOpenAIServer  # noqa: E402

from synthpert.answer import LABELS  # noqa: E402
from synthpert.config.data import DataConfig, SubsampleConfig  # noqa: E402
from synthpert.config.generate import JudgeConfig, TeacherConfig  # noqa: E402
from synthpert.generate import run_generate  # noqa: E402
from synthpert.judge import parse_verdict, run_judge  # noqa: E402
from synthpert.schema import TraceRecord, read_jsonl  # noqa: E402

KEY_ENV = "SYNTHPERT_TEST_API_KEY"
KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, perturbqa_dir) -> Path:
    from synthpert.data import build

    out = tmp_path_factory.mktemp("run") / "data"
    cfg = DataConfig(source=str(perturbqa_dir), train_cells=["k562"], test_cells=["k562"], seed=0,
                     train_subsample=SubsampleConfig(n=24, balance=True), val_subsample=SubsampleConfig(n=5),
                     test_subsample=SubsampleConfig(n=5))
    build(cfg, out)
    return out


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def api(srv: FakeOpenAIServer, **kw) -> dict:
    return {**dict(model="fake-model", base_url=srv.base_url, api_key_env=KEY_ENV, timeout=10, progress=False,
                   backoff_initial=0.01, prices={"fake-model": {"input": 1.0, "output": 2.0}}), **kw}


def assert_no_key(*folders: Path, texts: tuple[str, ...] = ()) -> None:
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                assert KEY.encode() not in f.read_bytes(), f
    for t in texts:
        assert KEY not in t


def test_offline_evidence_teacher_and_rules_judge_keep_traces(dataset, tmp_path):
    summary = run_generate(TeacherConfig(mode="evidence", progress=False), dataset, tmp_path / "traces")
    assert summary["complete"] and summary["offline_heuristic"] and summary["traces"] == 24
    traces = list(read_jsonl(tmp_path / "traces" / "traces.jsonl", TraceRecord))
    assert all(t.teacher == "evidence" and t.parsed_label == t.label and t.reasoning for t in traces)
    assert all(t.perturbation in t.reasoning and t.gene in t.reasoning and "K562" in t.reasoning for t in traces)
    assert summary["by_class"]["traces"] == {lab: 8 for lab in LABELS}
    judged = run_judge(JudgeConfig(kind="rules", progress=False), tmp_path / "traces" / "traces.jsonl",
                       tmp_path / "judged")
    assert judged["kept"] == 24 and judged["per_rating"]["good"]["kept"] == 24
    assert all(judged["per_class"][lab]["keep_rate"] == 1.0 for lab in LABELS)
    kept = list(read_jsonl(tmp_path / "judged" / "kept.jsonl", TraceRecord))
    assert all(k.judge.judge == "rules" and k.kept for k in kept)
    assert kept[0].assistant_text().startswith("<think>")
    # The rerun is answered from the same cache, identically.
    again = run_generate(TeacherConfig(mode="evidence", progress=False), dataset, tmp_path / "traces")
    assert again["engine"]["from_cache"] == 24 and again["engine"]["http_requests"] == 0
    assert list(read_jsonl(tmp_path / "traces" / "traces.jsonl", TraceRecord)) == traces


def test_label_blind_evidence_teacher_answers_from_evidence_and_misses_are_rejected(dataset, tmp_path):
    """evidence_blind: the offline analogue of predict mode. Its prompt and its answers do not depend on the
    label; answers that miss the label are kept in the file, marked rejected, and the judge keeps the rest."""
    from synthpert.evidence import dataset_training_stats
    from synthpert.offline import blind_answer

    cfg = TeacherConfig(mode="evidence_blind", samples=3, progress=False)
    summary = run_generate(cfg, dataset, tmp_path / "traces")
    assert summary["complete"] and summary["offline_heuristic"] and summary["traces"] == 72
    traces = list(read_jsonl(tmp_path / "traces" / "traces.jsonl", TraceRecord))
    assert all("Observed outcome" not in json.dumps(t.messages) for t in traces)  # never told the label
    stats = dataset_training_stats(dataset)
    by_example = {}
    for t in traces:
        by_example.setdefault(t.example_id, []).append(t)
        row = type("Row", (), {"id": t.example_id, "cell_line": t.cell_line, "perturbation": t.perturbation,
                               "gene": t.gene})
        assert t.parsed_label == blind_answer(stats, row, t.sample_index)  # a function of the evidence only
        if t.parsed_label != t.label:
            assert t.kept is False and "rejection sampling" in t.reject_reason
    assert 0 < summary["answer_matches_label"] < 72
    judged = run_judge(JudgeConfig(kind="rules", progress=False), tmp_path / "traces" / "traces.jsonl",
                       tmp_path / "judged")
    assert judged["kept"] == summary["answer_matches_label"]
    again = run_generate(cfg, dataset, tmp_path / "traces")
    assert again["engine"]["http_requests"] == 0 and again["engine"]["from_cache"] == 24


def test_rules_judge_rejects_bad_form(dataset, tmp_path):
    run_generate(TeacherConfig(mode="evidence", progress=False), dataset, tmp_path / "t")
    traces = list(read_jsonl(tmp_path / "t" / "traces.jsonl", TraceRecord))
    traces[0].reasoning = "Too short."
    traces[0].raw_text = "<think>\nToo short.\n</think>\n<answer>" + traces[0].label + "</answer>"
    traces[1].parsed_label = next(lab for lab in LABELS if lab != traces[1].label)
    from synthpert.schema import write_jsonl

    write_jsonl(tmp_path / "edited.jsonl", traces)
    s = run_judge(JudgeConfig(kind="rules", progress=False), tmp_path / "edited.jsonl", tmp_path / "j")
    assert s["kept"] == 22 and s["rejected"] == 2 and s["per_rating"]["bad"]["n"] == 1
    assert s["rejected_without_judging"] == 1  # the wrong answer never reaches a judge


def test_api_teacher_and_llm_judge_record_everything(dataset, tmp_path):
    with FakeOpenAIServer(prompt_tokens=300, completion_tokens=120) as srv:
        s = run_generate(TeacherConfig(**api(srv), sampling={"temperature": 0.7, "max_tokens": 400}), dataset,
                         tmp_path / "traces")
        assert s["complete"] and s["traces"] == 24 and s["answer_matches_label"] == 24
        assert s["cost_usd_this_run"] == pytest.approx(24 * (300 * 1.0 + 120 * 2.0) / 1e6)
        traces = list(read_jsonl(tmp_path / "traces" / "traces.jsonl", TraceRecord))
        t = traces[0]
        assert t.teacher == "fake-model" and t.prompt_name == "teacher_rationalise.j2" and len(t.prompt_hash) == 64
        assert t.sampling == {"temperature": 0.7, "max_tokens": 400} and t.usage.prompt_tokens == 300
        assert "Observed outcome: " + t.label in t.messages[-1]["content"]
        n_teacher = len(srv.received)
        j = run_judge(JudgeConfig(**api(srv, model="fake-model")), tmp_path / "traces" / "traces.jsonl",
                      tmp_path / "judged")
        assert len(srv.received) == n_teacher + 24
        assert j["kept"] == 24 and j["per_rating"]["good"]["n"] == 24 and j["judge_parse_failures"] == 0
        assert j["cost_usd_this_run"] == pytest.approx(24 * (300 + 240) / 1e6)
        # judged again: everything from the cache
        run_judge(JudgeConfig(**api(srv, model="fake-model")), tmp_path / "traces" / "traces.jsonl",
                  tmp_path / "judged")
        assert len(srv.received) == n_teacher + 24
    assert_no_key(tmp_path)


def test_predict_mode_rejection_sampling(dataset, tmp_path):
    with FakeOpenAIServer(responder="fixed:<think>\nreasoning\n</think>\n<answer>upregulated</answer>") as srv:
        s = run_generate(TeacherConfig(**api(srv), mode="predict", samples=3), dataset, tmp_path / "traces")
        assert len(srv.received) == 24 and all(b["n"] == 3 for b in srv.received)
        assert "Observed outcome" not in srv.received[0]["messages"][-1]["content"]
        assert s["traces"] == 72 and s["answer_matches_label"] == 24
        traces = list(read_jsonl(tmp_path / "traces" / "traces.jsonl", TraceRecord))
        rejected = [t for t in traces if t.kept is False]
        assert len(rejected) == 48 and all("rejection sampling" in t.reject_reason for t in rejected)
        assert all(t.raw_text for t in rejected)  # raw kept
        srv.set_responder("judge:average")
        j = run_judge(JudgeConfig(**api(srv, model="fake-model")), tmp_path / "traces" / "traces.jsonl",
                      tmp_path / "judged")
        assert len(srv.received) == 24 + 24  # only matching samples were judged
        assert j["kept"] == 0 and j["per_rating"]["average"]["n"] == 24  # below the 'good' threshold


@pytest.mark.parametrize("text,rating", [
    ("Rating: good\nJustification: fine.", "good"), ("**Rating:** Excellent\n**Justification:** x", "excellent"),
    ('{"rating": "bad", "justification": "generic"}', "bad"), ("terrible", "terrible"),
    ("Rating: good\nRating: bad", None), ("I think it is quite good but also bad", None), ("", None)])
def test_judge_verdict_parser(text, rating):
    assert parse_verdict(text)[0] == rating


# ---------------------------------------------------------------------------------------------------------
# The CLI in a subprocess


def cli(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    return synthpert_process(*args, env={KEY_ENV: KEY, **(env_extra or {})})


def gen_args(dataset: Path, out: Path, srv: FakeOpenAIServer, *extra: str) -> list[str]:
    return ["generate", "--json", "--dataset", str(dataset), "--out", str(out), f"teacher.base_url={srv.base_url}",
            "teacher.model=fake-model", f"teacher.api_key_env={KEY_ENV}", "teacher.backoff_initial=0.01",
            "teacher.prices={fake-model: {input: 1.0, output: 2.0}}", *extra]


def wait_for(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def test_sigkill_mid_run_resumes_without_losing_or_rebuying(dataset, tmp_path):
    out = tmp_path / "traces"
    with FakeOpenAIServer(latency_ms=250) as srv:
        proc = cli(*gen_args(dataset, out, srv, "teacher.concurrency=4"))
        wait_for(lambda: srv.state.completed >= 9)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert 9 <= len(srv.received) < 24
        answered_before = len(srv.received)
        proc = cli(*gen_args(dataset, out, srv, "teacher.concurrency=4"))
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        stats = srv.stats()
        assert stats["duplicates"] <= 4  # only requests in flight at the kill were sent again
        assert len(srv.received) <= 24 + 4 and answered_before > 0
    summary = json.loads(stdout)
    assert summary["complete"] and summary["engine"]["from_cache"] >= 9 - 4
    traces = list(read_jsonl(out / "traces.jsonl", TraceRecord))
    assert len({t.example_id for t in traces}) == 24
    assert_no_key(tmp_path, texts=(stdout, stderr))


def test_sigint_finishes_in_flight_requests_and_exits_cleanly(dataset, tmp_path):
    out = tmp_path / "traces"
    with FakeOpenAIServer(latency_ms=400) as srv:
        proc = cli(*gen_args(dataset, out, srv, "teacher.concurrency=2"))
        wait_for(lambda: len(srv.received) >= 3)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr
        assert "rerun" in stderr and "Traceback" not in stderr
        done = srv.state.completed
        assert done == len(srv.received)  # what was in flight at Ctrl-C was waited for, not abandoned
        traces = list(read_jsonl(out / "traces.jsonl", TraceRecord))  # whole records only
        assert len(traces) == done < 24
        assert json.loads(stdout)["complete"] is False
        proc = cli(*gen_args(dataset, out, srv, "teacher.concurrency=8"))
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert srv.stats()["duplicates"] == 0 and len(srv.received) == 24
    assert_no_key(tmp_path, texts=(stdout, stderr))


def test_cli_dry_run_budget_and_fatal_errors(dataset, tmp_path):
    with FakeOpenAIServer(prompt_tokens=300, completion_tokens=120) as srv:
        proc = cli(*gen_args(dataset, tmp_path / "t", srv, "--dry-run"))
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        est = json.loads(stdout)
        assert est["dry_run"] and est["http_requests_needed"] == 24 and est["est_cost_usd"] > 0
        assert not srv.received
        proc = cli(*gen_args(dataset, tmp_path / "t", srv, "--max-cost", "0.004", "teacher.sampling.max_tokens=200"))
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 3, stderr
        s = json.loads(stdout)
        assert s["engine"]["stopped"] == "max_cost" and 0 < s["cost_usd_this_run"] <= 0.004
        assert 0 < s["traces"] < 24 and len(srv.received) == s["traces"]
        srv.inject("status", count=50, status=401, message=f"Incorrect API key provided: {KEY}")
        proc = cli(*gen_args(dataset, tmp_path / "t2", srv))
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2 and "HTTP 401" in stderr and KEY_ENV in stderr and "Traceback" not in stderr
        proc = cli(*gen_args(dataset, tmp_path / "t3", srv), env_extra={KEY_ENV: ""})
        stdout2, stderr2 = proc.communicate(timeout=60)
        assert proc.returncode == 2 and f"{KEY_ENV} is not set" in stderr2
        proc = cli(*gen_args(dataset, tmp_path / "t3", srv, "teacher.concurency=3"))
        _, stderr3 = proc.communicate(timeout=60)
        assert proc.returncode == 2 and "did you mean 'concurrency'" in stderr3
    assert_no_key(tmp_path, texts=(stdout, stderr, stdout2, stderr2))


def test_worked_examples_are_earlier_turns_in_the_runs_own_format(dataset):
    """teacher.fewshot / judge.fewshot: each worked example is the same question (the run's template) and a
    well-formed answer or verdict, before the real one; the prompt hash covers them."""
    from synthpert.answer import parse_answer
    from synthpert.generate import _messages
    from synthpert.judge import _judge_messages, parse_verdict
    from synthpert.dataset import load_built

    row = next(load_built(dataset, "train").to_pandas().itertuples(index=False))
    plain = TeacherConfig(prompt="teacher_rationalise_short.j2", system_prompt="teacher_system_short.txt")
    shown = plain.model_copy(update={"fewshot": "teacher_fewshot.yaml"})
    m0, _, h0 = _messages(plain, row, None)
    m1, _, h1 = _messages(shown, row, None)
    assert [m["role"] for m in m1] == ["system"] + ["user", "assistant"] * 3 + ["user"] and h1 != h0
    assert m1[-1] == m0[-1] and m1[1]["content"].startswith("Knockdown of RPS19 in RPE1 cells")
    assert [parse_answer(m["content"]).label for m in m1 if m["role"] == "assistant"] == [
        "upregulated", "not differentially expressed", "downregulated"]
    trace = TraceRecord(id="t#0", example_id="t", cell_line="k562", perturbation="MYC", gene="GAPDH",
                        label="upregulated", teacher="x", reasoning="MYC drives glycolysis genes.",
                        parsed_label="upregulated")
    jm, _ = _judge_messages(JudgeConfig(prompt="judge_short.j2", fewshot="judge_fewshot.yaml"), trace)
    verdicts = [parse_verdict(m["content"])[0] for m in jm if m["role"] == "assistant"]
    assert verdicts == ["good", "bad", "terrible"] and "MYC drives glycolysis" in jm[-1]["content"]


def test_judge_summary_counts_rejection_reasons_and_warns_on_a_judge_that_never_varies():
    from collections import Counter

    from synthpert.judge import _rating_warnings, reason_kind

    assert reason_kind("rated bad (threshold good)") == "rated below threshold"
    assert reason_kind("answer downregulated != label upregulated") == "answer != label"
    assert reason_kind("answer unparseable != label upregulated") == "answer unparseable"
    assert reason_kind("judge output unparseable: no rating") == "judge gave no rating"
    assert "rated all 12" in _rating_warnings(Counter({"excellent": 12}))[0]
    assert _rating_warnings(Counter({"excellent": 10, "bad": 2})) == []
    assert _rating_warnings(Counter({"excellent": 3})) == []  # too few to tell
