"""`synthpert push --dry-run`: the folders that would go to the Hub, built from a real run folder (offline
evidence teacher + rules judge on the built fixture dataset, the session's tiny adapter, a small eval)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

REPO = "my-lab/k562-tiny"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_built_dataset, tiny_model_dir, tiny_adapter_dir):
    from synthpert.config.evaluate import EvalConfig
    from synthpert.config.generate import JudgeConfig, TeacherConfig
    from synthpert.evaluate import run_eval
    from synthpert.generate import run_generate
    from synthpert.judge import run_judge

    run = tmp_path_factory.mktemp("pushrun") / "k562-tiny"
    run_generate(TeacherConfig(mode="evidence", progress=False), tiny_built_dataset, run / "generate")
    run_judge(JudgeConfig(kind="rules", progress=False), run / "generate" / "traces.jsonl", run / "judge")
    shutil.copytree(tiny_adapter_dir, run / "train", ignore=shutil.ignore_patterns("checkpoints"))
    ev = EvalConfig(dataset=str(tiny_built_dataset), n=8, n_bootstrap=50,
                    inference={"model": str(tiny_model_dir), "adapter": str(run / "train"), "max_new_tokens": 4,
                               "batch_size": 8})
    run_eval(ev, out_dir=run / "eval" / "k562" / "result", progress=False)
    return run


@pytest.mark.slow
def test_dry_run_writes_cards_built_from_the_runs_own_numbers(run_dir, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from synthpert.cli.main import app

    monkeypatch.delenv("HF_TOKEN", raising=False)  # a dry run needs none
    out = tmp_path / "push"
    r = CliRunner().invoke(app, ["push", str(run_dir), "--repo-id", REPO, "--dry-run", "--out", str(out),
                                 "--base-model", "Qwen/Qwen2.5-0.5B-Instruct", "--license", "apache-2.0"])
    assert r.exit_code == 0, r.output
    assert f"model -> {REPO}" in r.output and f"dataset -> {REPO}-traces" in r.output
    assert "  adapter_model.safetensors" in r.output and "  data/train.jsonl" in r.output

    card = ModelCard.load(out / "model" / "README.md")
    d = card.data.to_dict()
    assert d["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and d["library_name"] == "peft"
    assert d["pipeline_tag"] == "text-generation" and d["license"] == "apache-2.0"
    assert d["datasets"] == [f"{REPO}-traces"]
    assert d["tags"] == ["synthpert", "trl", "sft", "lora", "biology", "perturbation"]
    # the body carries this run's numbers, not placeholders
    metrics = json.loads((run_dir / "eval" / "k562" / "result" / "metrics.json").read_text())
    judge = json.loads((run_dir / "judge" / "summary.json").read_text())
    gen = json.loads((run_dir / "generate" / "summary.json").read_text())
    manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    body = card.text
    strict = metrics["model"]["strict"]["overall"]
    lo, hi = strict["ci"]["macro_f1"]
    row = f"| model (strict parse) | {strict['accuracy']:.3f} | {strict['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}] |"
    assert row in body
    majority = metrics["baselines"]["majority"]["overall"]
    assert f"| baseline: majority | {majority['accuracy']:.3f} |" in body
    assert f"teacher: `{gen['teacher']}`" in body and gen["prompt_hash"] in body
    assert f"judge: `{judge['judge']}`" in body and f"{judge['kept']} kept" in body
    up = judge["per_class"]["upregulated"]
    assert f"| up | {up['traces']} | {up['kept']} |" in body
    assert manifest["chat_template_sha256"] in body and f"r={manifest['config']['lora']['r']}" in body
    assert "## Limitations" in body and "not differentially expressed" in body and "seen" in body
    assert str(run_dir) not in card.content  # no local path (the tiny base model's folder) leaks into the card
    assert (out / "model" / "eval" / "k562" / "metrics.json").exists()
    assert (out / "model" / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (out / "model" / "tokenizer_config.json").read_text())
    assert not (out / "model" / "checkpoints").exists()
    (tmp_path / "card.md").write_text(card.content)


@pytest.mark.slow
def test_dry_run_dataset_loads_back_with_datasets_and_its_card_parses(run_dir, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from synthpert.publish import push

    res = push(run_dir, REPO, out=tmp_path / "p", what="traces", dry_run=True)
    assert set(res["folders"]) == {"dataset"}
    folder = tmp_path / "p" / "dataset"
    ds = load_dataset(str(folder), split="train")
    kept = [json.loads(x) for x in (run_dir / "judge" / "kept.jsonl").read_text().splitlines()]
    assert len(ds) == len(kept) and ds[0]["reasoning"] == kept[0]["reasoning"]
    assert set(ds["label"]) <= {"upregulated", "downregulated", "not differentially expressed"}
    card = DatasetCard.load(folder / "README.md")
    assert card.data.license == "cc-by-4.0" and "PerturbQA" in card.text
    n_up = sum(1 for k in kept if k["label"] == "upregulated")
    assert f"up {n_up}" in card.text
    assert (folder / "generation" / "teacher_config.json").exists()
    assert (folder / "generation" / "judge_summary.json").exists()


@pytest.mark.parametrize("repo_id", ["noslash", "a/b/c", "-x/y", "org/na me", "org/a--b", "org/x..y", ""])
def test_bad_repo_id_is_refused_before_anything(repo_id, tmp_path):
    from synthpert.errors import SynthpertError
    from synthpert.publish import push

    with pytest.raises(SynthpertError, match="repo id"):
        push(tmp_path, repo_id, dry_run=True)


def test_run_without_adapter_or_eval_is_a_clear_error(tmp_path):
    from synthpert.errors import SynthpertError
    from synthpert.publish import push

    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    with pytest.raises(SynthpertError, match="no trained adapter"):
        push(run, REPO, dry_run=True)
    (run / "train" / "adapter_config.json").write_text("{}")
    with pytest.raises(SynthpertError, match="no evaluation"):
        push(run, REPO, dry_run=True)
    with pytest.raises(SynthpertError, match="no kept traces"):
        push(run, REPO, what="traces", dry_run=True)
    with pytest.raises(SynthpertError, match="--what"):
        push(run, REPO, what="adapter,weights", dry_run=True)


def test_no_token_names_hf_token_and_login_without_a_traceback(tmp_path, monkeypatch):
    from synthpert.cli.main import app

    run = tmp_path / "run"
    (run / "judge").mkdir(parents=True)
    (run / "judge" / "kept.jsonl").write_text("")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    from synthpert.errors import SynthpertError

    r = CliRunner().invoke(app, ["push", str(run), "--repo-id", REPO, "--what", "traces"])
    # a SynthpertError: synthpert's main() prints it as one message with exit code 2, never a traceback
    assert r.exit_code != 0 and isinstance(r.exception, SynthpertError)
    assert "HF_TOKEN" in str(r.exception) and "hf auth login" in str(r.exception)
    assert not (run / "push").exists()  # refused before building anything
