"""Every shipped config runs end to end, as a user would run it, on a small subsample.

Only what cannot exist on a CPU-only machine without network is substituted, by command-line overrides:
the teacher's and judge's ``base_url`` point at an OpenAI-compatible server on 127.0.0.1 (answering in the
format the real models would), the 8B student becomes the offline tiny model, 4-bit quantization and the
8-bit paged optimizer (bitsandbytes, CUDA only) become their full-precision equivalents, and sample sizes
shrink (fewer triples, eval pairs and optimizer steps). Everything else — teacher mode, keep rule, LoRA
settings, chat template, eval sets and backend, report — runs as shipped. A config added to configs/
without an entry in SMOKE fails ``test_every_shipped_config_has_a_smoke_test``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-smoke-SECRET-0123456789abcdef"

# configs/<file> -> the test (file::function) that runs it end to end.
SMOKE = {
    "quickstart.yaml": "test_pipeline.py::test_quickstart_pipeline_interrupted_and_resumed",
    "synthpert-k562.yaml": "test_configs_smoke.py::test_recipe_run_config",
    "unseen-rpe1.yaml": "test_configs_smoke.py::test_recipe_run_config",
    "teacher_openai.yaml": "test_configs_smoke.py::test_teacher_openai_merged_into_quickstart",
    "train_recipe.yaml": "test_configs_smoke.py::test_train_config",
    "train_tiny.yaml": "test_configs_smoke.py::test_train_config",
    "rl_tiny.yaml": "test_rl.py::test_grpo_moves_the_adapter_writes_the_manifest_and_resumes",
    "rl_8b_vllm.yaml": "test_rl.py::test_8b_vllm_config_loads_and_needs_a_gpu",
    "local_llm.yaml":
        "test_real_model_serve.py::test_local_llm_config_runs_end_to_end_with_a_real_teacher_judge_and_student",
}

# What a CPU machine without the hub substitutes in the recipe configs (see the module docstring).
CPU_TRAIN = ["train.base_model=tiny", "tiny_model.chat_format=r1", "train.quantization=none",
             "train.optim.optimizer=adamw_torch"]


def unlisted_configs(config_dir: Path, listed: dict) -> list[str]:
    """Config files in ``config_dir`` (top level: run, stage and training configs) without a smoke test."""
    return sorted(p.name for p in config_dir.glob("*.yaml") if p.name not in listed)


def _test_functions(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def test_every_shipped_config_has_a_smoke_test():
    assert unlisted_configs(ROOT / "configs", SMOKE) == []
    for config, test in SMOKE.items():
        assert (ROOT / "configs" / config).exists(), f"SMOKE lists {config}, which is not in configs/"
        file, func = test.split("::")
        assert func in _test_functions(Path(__file__).parent / file), f"{config}: no test {test}"


def test_an_unlisted_config_is_caught(tmp_path):
    for name in SMOKE:
        (tmp_path / name).write_text((ROOT / "configs" / name).read_text())
    assert unlisted_configs(tmp_path, SMOKE) == []
    (tmp_path / "my-new-recipe.yaml").write_text("name: x\n")
    assert unlisted_configs(tmp_path, SMOKE) == ["my-new-recipe.yaml"]


# ---------------------------------------------------------------------------------------------------------


def _env(perturbqa_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return {**env, "SYNTHPERT_DATA": str(perturbqa_dir), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def _synthpert(*args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthpert.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _no_secret_in(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), f"the API key leaked into {p}"


def _check_eval(run_dir: Path, sets: dict[str, int]) -> None:
    for name, n in sets.items():
        result = run_dir / "eval" / name / "result"
        metrics = json.loads((result / "metrics.json").read_text())
        assert metrics["n_predicted"] == n
        report = (result / "report.md").read_text()
        assert "majority" in report and "gene_prior" in report


@pytest.mark.parametrize("config", ["synthpert-k562.yaml", "unseen-rpe1.yaml"])
def test_recipe_run_config_refuses_without_key_before_the_data_stage(config, tmp_path, perturbqa_dir):
    r = _synthpert("run", config, "--runs-dir", tmp_path / "runs", env=_env(perturbqa_dir))
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "OPENAI_API_KEY" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists(), "a refused run must not leave a run folder"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["synthpert-k562.yaml", "unseen-rpe1.yaml"])
def test_recipe_dry_run_prints_the_plan_without_key_or_gpu(config, tmp_path, perturbqa_dir):
    r = _synthpert("run", config, "--dry-run", "--runs-dir", tmp_path / "runs", env=_env(perturbqa_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for stage in ("[data]", "[generate]", "[judge]", "[cost]", "[train]", "[eval]"):
        assert stage in out, out
    assert "o4-mini" in out and "est. cost $" in out and "OPENAI_API_KEY" in out
    assert "nothing was sent" in out
    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())
    for name in cfg["eval_sets"]:
        assert name in out
    run_dir = tmp_path / "runs" / config.removesuffix(".yaml")
    assert (run_dir / "data" / "stage.json").exists()  # the data is built (free), nothing else
    assert not (run_dir / "generate" / "traces.jsonl").exists() and not (run_dir / "train").exists()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("config,teacher_fraction", [("synthpert-k562.yaml", 0.0003), ("unseen-rpe1.yaml", 0.0001)])
def test_recipe_run_config(config, teacher_fraction, tmp_path, perturbqa_dir):
    """The published recipe and the unseen-line config through `synthpert run`, as shipped but small."""
    shipped = yaml.safe_load((ROOT / "configs" / config).read_text())
    runs = tmp_path / "runs"
    eval_n = 16
    with FakeOpenAIServer(responder="mixed") as srv:
        overrides = [f"teacher.base_url={srv.base_url}", f"judge.base_url={srv.base_url}",
                     f"teacher.subsample.fraction={teacher_fraction}", *CPU_TRAIN, "train.optim.max_steps=40",
                     "eval.n_bootstrap=20",
                     "eval.inference.max_new_tokens=48",
                     *(f"eval_sets.{name}.n={eval_n}" for name in shipped["eval_sets"])]
        r = _synthpert("run", config, "--runs-dir", runs, *overrides, env=_env(perturbqa_dir, OPENAI_API_KEY=KEY))
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        received = list(srv.received)
    run_dir = runs / shipped["name"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"data", "base_model", "generate", "judge", "train", "eval"}

    gen = manifest["stages"]["generate"]["summary"]
    judge = manifest["stages"]["judge"]["summary"]
    assert gen["mode"] == shipped["teacher"]["mode"] and gen["teacher"] == shipped["teacher"]["model"]
    assert gen["traces"] >= 10 and gen["parse_failures"] == 0
    # Every request went to the local server with the shipped sampling, and the key only in the header.
    assert len(received) == gen["engine"]["http_requests"] + judge["engine"]["http_requests"]
    teacher_bodies = [b for b in received if b["model"] == shipped["teacher"]["model"]
                      and "Rating: <excellent" not in json.dumps(b)]
    assert teacher_bodies and all(b["reasoning_effort"] == "medium" and b["max_completion_tokens"] == 4096
                                  for b in teacher_bodies)
    assert KEY not in json.dumps(received)
    # The keep rule as shipped: only "excellent" traces, and the server rated some merely "good".
    assert judge["threshold"] == shipped["judge"]["threshold"] == "excellent"
    assert judge["per_rating"]["good"]["n"] > 0 and judge["per_rating"]["good"]["kept"] == 0
    assert 0 < judge["kept"] == judge["per_rating"]["excellent"]["kept"] < gen["traces"]

    train = manifest["stages"]["train"]["summary"]
    assert 0 < train["n_train"] <= judge["kept"]
    adapter = json.loads((run_dir / "train" / "adapter_config.json").read_text())
    lora = shipped["train"]["lora"]
    assert adapter["r"] == lora["r"] and adapter["lora_alpha"] == lora["alpha"]
    assert sorted(adapter["target_modules"]) == sorted(lora["target_modules"])
    template = (run_dir / "train" / "chat_template.jinja").read_text()
    assert "<｜Assistant｜>" in template  # the shipped R1-Distill training template, saved with the adapter

    _check_eval(run_dir, {name: eval_n for name in shipped["eval_sets"]})
    first_set = next(iter(shipped["eval_sets"]))
    run_info = json.loads((run_dir / "eval" / first_set / "result" / "eval_run.json").read_text())
    assert run_info["backend_info"]["backend"] == "vllm"
    # every stage wrote its resolved settings next to its output
    teacher_cfg = json.loads((run_dir / "generate" / "teacher_config.json").read_text())
    judge_cfg = json.loads((run_dir / "judge" / "judge_config.json").read_text())
    assert teacher_cfg["model"] == shipped["teacher"]["model"] and teacher_cfg["base_url"].startswith("http://127.0.0.1")
    assert judge_cfg["threshold"] == "excellent" and run_info["config"]["n_bootstrap"] == 20
    _no_secret_in(run_dir)


@pytest.mark.slow
def test_teacher_openai_merged_into_quickstart(tmp_path, perturbqa_dir):
    """configs/teacher_openai.yaml's teacher and judge on top of the quickstart run (README's recipe)."""
    runs = tmp_path / "runs"
    with FakeOpenAIServer(responder="auto") as srv:
        overrides = ["name=qs_openai", f"teacher.base_url={srv.base_url}", f"judge.base_url={srv.base_url}",
                     "teacher.subsample.n=30", "data.train_subsample.n=90", "train.optim.epochs=1",
                     "eval.n_bootstrap=20", "eval.figures=false", "eval.inference.max_new_tokens=48",
                     "eval.decision_fit_n=60", "eval_sets.k562_test.n=16", "eval_sets.rpe1_unseen.n=16"]
        r = _synthpert("run", "quickstart.yaml", "--merge", "teacher_openai.yaml", "--runs-dir", runs, *overrides,
                       env=_env(perturbqa_dir, OPENAI_API_KEY=KEY))
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        models = {b["model"] for b in srv.received}
    run_dir = runs / "qs_openai"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    gen, judge = (manifest["stages"][s]["summary"] for s in ("generate", "judge"))
    assert gen["mode"] == "rationalise" and gen["teacher"] == "gpt-4o-mini" and gen["examples"] == 30
    assert judge["kind"] == "llm" and judge["judge"] == "gpt-4o" and judge["kept"] > 0
    assert models == {"gpt-4o-mini", "gpt-4o"}
    assert manifest["stages"]["train"]["summary"]["n_train"] > 0
    _check_eval(run_dir, {"k562_test": 16, "rpe1_unseen": 16})
    _no_secret_in(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["train_recipe.yaml", "train_tiny.yaml"])
def test_train_config(config, tmp_path, perturbqa_dir, tiny_traces_path, tiny_built_dataset):
    """The training configs through `synthpert train --config`, on kept traces of real PerturbQA rows."""
    shipped = yaml.safe_load((ROOT / "configs" / config).read_text())["train"]
    env = _env(perturbqa_dir)
    model = tmp_path / "tiny_model"
    flavour = ["--chat-format", "r1"] if shipped.get("chat_template") == "r1_distill_train" else []
    r = _synthpert("model", "tiny", "--out", model, "--source", perturbqa_dir, *flavour, env=env)
    assert r.returncode == 0, r.stderr
    overrides = [f"base_model={model}"]
    if shipped.get("quantization") == "4bit":
        overrides += ["quantization=none", "optim.optimizer=adamw_torch"]
    out = tmp_path / "train"
    r = _synthpert("train", "--config", ROOT / "configs" / config, "--data", tiny_traces_path, "--out", out,
                   *overrides, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == shipped["lora"]["r"] and manifest["n_train"] > 0 and manifest["global_step"] > 0
    assert manifest["config"]["chat_template"] == shipped.get("chat_template")
