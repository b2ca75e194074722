"""judge.kind=consistency: label-free selection from k label-blind samples per triple (offline evidence_blind
teacher and an OpenAI-compatible server), its keep rule, per-class quotas and report."""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

from synthpert.answer import DOWN, LABELS, NOT_DE, UP  # noqa: E402
from synthpert.config.data import DataConfig, SubsampleConfig  # noqa: E402
from synthpert.config.generate import JudgeConfig, TeacherConfig  # noqa: E402
from synthpert.errors import SynthpertError  # noqa: E402
from synthpert.generate import run_generate  # noqa: E402
from synthpert.judge import run_judge  # noqa: E402
from synthpert.schema import TraceRecord, read_jsonl  # noqa: E402

KEY_ENV = "SYNTHPERT_TEST_API_KEY"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, perturbqa_dir) -> Path:
    from synthpert.data import build

    out = tmp_path_factory.mktemp("run") / "data"
    cfg = DataConfig(source=str(perturbqa_dir), train_cells=["k562"], test_cells=["k562"], seed=0,
                     train_subsample=SubsampleConfig(n=24, balance=True), val_subsample=SubsampleConfig(n=5),
                     test_subsample=SubsampleConfig(n=5))
    build(cfg, out)
    return out


# the triple's hash decides its three samples: unanimous, 2 of 3, or no majority
PATTERNS = [(UP, UP, UP), (DOWN, DOWN, UP), (UP, DOWN, NOT_DE)]


def _pattern(body: dict) -> tuple[str, str, str]:
    user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    return PATTERNS[int(hashlib.sha256(user.encode()).hexdigest(), 16) % 3]


def split_responder(body: dict, index: int) -> str:
    return f"<think>\nsample {index} reasons about the knockdown\n</think>\n<answer>{_pattern(body)[index]}</answer>"


def test_consistency_against_a_server_k_samples_once_keep_rule_quota_and_report(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-0123456789")
    api = dict(model="fake-model", base_url=None, api_key_env=KEY_ENV, timeout=10, progress=False,
               backoff_initial=0.01)
    with FakeOpenAIServer(responder=split_responder) as srv:
        cfg = TeacherConfig(**{**api, "base_url": srv.base_url}, mode="predict", samples=3)
        run_generate(cfg, dataset, tmp_path / "gen")
        assert len(srv.received) == 24 and all(b["n"] == 3 for b in srv.received)  # k samples, one request
        patterns = Counter(_pattern(b) for b in srv.received)
        assert all(patterns[p] >= 2 for p in PATTERNS)  # every case of the keep rule occurs
        run_generate(cfg, dataset, tmp_path / "gen")
        assert len(srv.received) == 24  # the rerun is served from the cache: 0 requests
    traces = tmp_path / "gen" / "traces.jsonl"

    s = run_judge(JudgeConfig(kind="consistency", agreement=0.75), traces, tmp_path / "j75")
    unanimous = patterns[PATTERNS[0]]
    assert s["kept_triples"] == unanimous and s["kept"] == 3 * unanimous
    kept = list(read_jsonl(tmp_path / "j75" / "kept.jsonl", TraceRecord))
    assert all(t.parsed_label == UP for t in kept)
    labels_of_kept = Counter(t.label for t in kept[::3])
    assert s["per_class"][UP]["kept"] == labels_of_kept[UP]
    assert s["kept_majority_equals_label"] == pytest.approx(labels_of_kept[UP] / unanimous, abs=1e-4)

    s = run_judge(JudgeConfig(kind="consistency", agreement=0.6), traces, tmp_path / "j60")
    two_of_three = patterns[PATTERNS[1]]
    assert s["kept_triples"] == unanimous + two_of_three
    assert s["kept"] == 3 * unanimous + 2 * two_of_three  # the minority sample of a kept triple is dropped
    assert s["per_class"][DOWN]["kept_as_majority"] == two_of_three

    s = run_judge(JudgeConfig(kind="consistency", agreement=0.6, class_quota={"up": 2}), traces, tmp_path / "jq")
    assert s["per_class"][UP]["kept_as_majority"] == 2 and s["kept_triples"] == 2 + two_of_three
    assert sum(v["triples"] for v in s["per_class"].values()) == 24


def _logprob(body: dict, index: int) -> float:
    """Every token of a triple's samples gets the same log-probability, which varies across triples."""
    user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    return -0.05 * (1 + int(hashlib.sha256(f"lp{user}".encode()).hexdigest(), 16) % 9)


def test_cocoa_ranks_by_server_logprobs_which_join_the_cache_key_only_when_requested(dataset, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-0123456789")
    with FakeOpenAIServer(responder=split_responder, logprob=_logprob) as srv:
        plain = TeacherConfig(model="fake-model", base_url=srv.base_url, api_key_env=KEY_ENV, timeout=10,
                              progress=False, mode="predict", samples=3)
        run_generate(plain, dataset, tmp_path / "gen")
        assert len(srv.received) == 24 and not any("logprobs" in b for b in srv.received)  # off: not sent
        shutil.copy(tmp_path / "gen" / "traces.jsonl", tmp_path / "plain.jsonl")
        cfg = plain.model_copy(update={"sampling": plain.sampling.model_copy(update={"logprobs": True})})
        run_generate(cfg, dataset, tmp_path / "gen")
        assert len(srv.received) == 48 and all(b["logprobs"] is True for b in srv.received[24:])
        run_generate(cfg, dataset, tmp_path / "gen")
        assert len(srv.received) == 48  # the rerun with logprobs is served from the cache: 0 requests
    traces = list(read_jsonl(tmp_path / "gen" / "traces.jsonl", TraceRecord))
    conf = {t.example_id: math.exp(_logprob({"messages": t.messages}, 0)) for t in traces}
    assert all(t.confidence == pytest.approx(conf[t.example_id]) for t in traces)

    # quota of 2 "up" triples among the unanimous ones (agreement 1): CoCoA takes the 2 most confident,
    # agreement order the first 2 by id
    unanimous = sorted({t.example_id for t in traces if _pattern({"messages": t.messages}) == PATTERNS[0]})
    by_cocoa = sorted(unanimous, key=lambda e: (-conf[e], e))[:2]
    assert set(by_cocoa) != set(unanimous[:2])  # the two orders differ on this data, so the test can fail
    for rank_by, expect in (("cocoa", by_cocoa), ("agreement", unanimous[:2])):
        jcfg = JudgeConfig(kind="consistency", agreement=0.6, class_quota={"up": 2}, rank_by=rank_by)
        s = run_judge(jcfg, tmp_path / "gen" / "traces.jsonl", tmp_path / f"j_{rank_by}")
        kept = list(read_jsonl(tmp_path / f"j_{rank_by}" / "kept.jsonl", TraceRecord))
        assert sorted({t.example_id for t in kept if t.parsed_label == UP}) == sorted(expect)
        assert s["rank_by"] == rank_by and s["mean_cocoa_score_kept"] is not None
    assert "CoCoA score" in kept[0].judge.justification
    with pytest.raises(SynthpertError, match="logprobs=true"):
        run_judge(JudgeConfig(kind="consistency", rank_by="cocoa"), tmp_path / "plain.jsonl", tmp_path / "jp")


def test_consistency_with_the_offline_label_blind_teacher(dataset, tmp_path):
    run_generate(TeacherConfig(mode="evidence_blind", samples=4, progress=False), dataset, tmp_path / "gen")
    traces = list(read_jsonl(tmp_path / "gen" / "traces.jsonl", TraceRecord))
    s = run_judge(JudgeConfig(kind="consistency", agreement=0.75), tmp_path / "gen" / "traces.jsonl", tmp_path / "j")
    groups: dict[str, list] = {}
    for t in traces:
        groups.setdefault(t.example_id, []).append(t)
    expected = {e for e, g in groups.items()
                if max(Counter(t.parsed_label for t in g if t.parsed_label).values(), default=0) / len(g) >= 0.75}
    assert 0 < len(expected) < len(groups)  # the rule separates triples
    kept = list(read_jsonl(tmp_path / "j" / "kept.jsonl", TraceRecord))
    assert {t.example_id for t in kept} == expected and s["kept_triples"] == len(expected)
    assert set(s["per_class"]) == set(LABELS)


def test_consistency_refuses_label_told_or_single_samples(dataset, tmp_path):
    from pydantic import ValidationError

    run_generate(TeacherConfig(mode="evidence", samples=2, progress=False), dataset, tmp_path / "told")
    with pytest.raises(SynthpertError, match="label-blind"):
        run_judge(JudgeConfig(kind="consistency"), tmp_path / "told" / "traces.jsonl", tmp_path / "j")
    run_generate(TeacherConfig(mode="evidence_blind", samples=1, progress=False), dataset, tmp_path / "one")
    with pytest.raises(SynthpertError, match="samples >= 2"):
        run_judge(JudgeConfig(kind="consistency"), tmp_path / "one" / "traces.jsonl", tmp_path / "j")
    with pytest.raises(ValidationError, match="sideways"):
        JudgeConfig(kind="consistency", class_quota={"sideways": 3})


def test_a_run_config_with_consistency_needs_a_label_blind_teacher_with_samples():
    from pydantic import ValidationError

    from synthpert.config.run import RunConfig

    base = {"name": "x", "train": {"base_model": "tiny"}, "judge": {"kind": "consistency"}}
    with pytest.raises(ValidationError, match="teacher.mode to predict or evidence_blind"):
        RunConfig.model_validate(base)
    with pytest.raises(ValidationError, match="samples >= 2"):
        RunConfig.model_validate({**base, "teacher": {"mode": "evidence_blind"}})
    assert RunConfig.model_validate({**base, "teacher": {"mode": "evidence_blind", "samples": 4}}).judge.agreement
    cocoa = {**base, "judge": {"kind": "consistency", "rank_by": "cocoa"}}
    with pytest.raises(ValidationError, match="logprobs=true"):  # the offline teacher has no log-probabilities
        RunConfig.model_validate({**cocoa, "teacher": {"mode": "evidence_blind", "samples": 4}})
    assert RunConfig.model_validate({**cocoa, "teacher": {"mode": "predict", "samples": 4,
                                                          "sampling": {"logprobs": True}}}).judge.rank_by == "cocoa"
    with pytest.raises(ValidationError, match="consistency only"):
        JudgeConfig(kind="rules", rank_by="cocoa")
