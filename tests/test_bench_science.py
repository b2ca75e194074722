"""scripts/bench_science.py's axes without running a model: arguments, the overrides of each run, the science
eval sets' config, run folders and the measurements its table reads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_science.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_science", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tiny_lora_run_keeps_its_folder_and_overrides(bench):
    o = bench.run_overrides("multitask", 1)
    assert o["name"] == "multitask-s1" and o["train.base_model"] == "tiny"
    assert o["seed"] == o["data.seed"] == o["train.seed"] == 1
    assert not any(k.startswith(("train.optim.", "train.method", "train.precision")) for k in o)
    assert bench.run_overrides("multitask_lookup", 0)["train.evidence_lookup"] == "true"


def test_smollm2_gets_its_training_settings_and_the_variant_wins(bench):
    o = bench.run_overrides("reasoning", 0, "smollm2-135m-instruct", "lora")
    assert o["name"] == "reasoning-smollm2-135m-instruct-lora-s0"
    assert o["train.optim.lr"] == 2.0e-4 and o["train.lora.layers"] == 6 and o["train.precision"] == "bf16"
    assert o["eval.inference.merge_adapter"] == "true" and o["train.max_length"] == 1536
    assert o["eval.inference.max_new_tokens"] == 192  # the variant's own setting is applied last
    full = bench.run_overrides("multitask", 0, "smollm2-135m-instruct", "full")
    assert full["train.method"] == "full" and full["train.optim.lr"] == 5.0e-5
    assert not any(k.startswith("train.lora.") or k == "eval.inference.merge_adapter" for k in full)
    assert bench.run_overrides("multitask", 0, "tiny", "full")["name"] == "multitask-tiny-full-s0"


def test_triples_fix_the_training_set_size_over_the_variant_and_name_the_folder(bench):
    o = bench.run_overrides("reasoning", 0, "smollm2-135m-instruct", "lora", 1200)
    assert o["data.train_subsample.n"] == 1200  # the variant's own 1,500 gives way: equal data across models
    assert o["name"] == "reasoning-smollm2-135m-instruct-lora-n1200-s0"
    assert bench.run_overrides("label_only", 2, triples=1200)["name"] == "label_only-n1200-s2"
    assert "data.train_subsample.n" not in bench.run_overrides("label_only", 0)
    assert bench.parse_args(["--triples", "1200"]).triples == 1200


def test_a_model_folder_is_a_pretrained_base(bench, tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    o = bench.run_overrides("multitask", 0, str(model), "lora")
    assert o["train.base_model"] == str(model.resolve()) and o["name"] == "multitask-my-model-lora-s0"
    assert o["train.optim.lr"] == 2.0e-4 and "train.lora.layers" not in o  # its layer count is its own
    with pytest.raises(SystemExit, match="neither tiny nor smollm2-135m-instruct nor a model folder"):
        bench.base_overrides(str(tmp_path / "absent"), "lora")


def test_arguments(bench, tmp_path):
    args = bench.parse_args(["--variants", "multitask", "--seeds", "0", "--chosen", "label_only"])
    assert bench.plan_of(args) == [("multitask", 0), ("label_only", 1), ("label_only", 2)]
    assert args.eval_sets == "science" and args.runs_dir == bench.ROOT / "runs" / "bench_science" / "science"
    assert args.base_model == "tiny" and args.method == "lora"
    old = bench.parse_args(["--eval-sets", "quickstart"])
    assert old.runs_dir == bench.ROOT / "runs" / "bench_science"
    for bad in (["--variants", "nope"], ["--chosen", "nope"], ["--method", "qlora"], ["--base-model", "nope"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(bad)
        assert e.value.code == 2


def test_science_sets_replace_the_quickstarts(bench, tmp_path):
    from synthpert.config import load_section
    from synthpert.config.run import RunConfig

    assert bench.run_config("quickstart", tmp_path) == "quickstart.yaml"
    path = Path(bench.run_config("science", tmp_path))
    cfg = load_section(RunConfig, None, path, [])
    assert set(cfg.eval_sets) == {"k562_science", "rpe1_science"} == set(bench.set_names("science"))
    for es in cfg.eval_sets.values():
        assert es.genes == 1200 and es.seed == 0 and es.n is None  # drawn by gene, fixed seed, never by label
    assert cfg.train.base_model == "tiny" and cfg.data.train_cells == ["k562", "hepg2", "jurkat"]


def test_list_shows_every_axis_and_table_only_needs_finished_runs(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, check=True)
    shown = yaml.safe_load(out.stdout)
    assert {"variants", "base_models", "methods", "eval_sets"} <= set(shown)
    assert "multitask_lookup" in shown["variants"] and "smollm2-135m-instruct" in shown["base_models"]
    r = subprocess.run([sys.executable, str(SCRIPT), "--variants", "multitask", "--table-only",
                        "--runs-dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "no finished run" in r.stderr and "Traceback" not in r.stderr


def test_stage_times_show_the_measured_wall_time_and_memory(bench, tmp_path):
    run = tmp_path / "multitask-s0"
    for stage, secs in (("train", 250.4), ("eval", 231.0)):
        (run / stage).mkdir(parents=True)
        (run / stage / "stage.json").write_text(json.dumps({"seconds": secs}))
    assert bench.stage_times({"multitask s0": run}) == "- multitask s0: train 250 s, eval 231 s"
    assert set(bench._stage_stamps(run)) == {"train", "eval"}
    (run / "bench.json").write_text(json.dumps({"wall_s": 512.3, "stages_run": ["train", "eval"],
                                                "peak_rss_gib": 1.93}))
    assert bench.stage_times({"multitask s0": run}).endswith(
        "eval 231 s, run 512 s wall (train, eval ran), peak RSS 1.93 GiB")


def test_a_run_is_measured_by_its_own_process(bench, tmp_path):
    grow = "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); print('done')"
    code, wall, peak = bench.measured([sys.executable, "-c", grow], tmp_path / "log")
    assert code == 0 and wall > 0 and (tmp_path / "log").read_text() == "done\n"
    assert 0.28 < peak < 2  # the child's 300 MiB, not this process's size
    code, _, _ = bench.measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log")
    assert code == 3


def test_a_science_set_is_the_same_pairs_whatever_the_runs_seed(bench, tmp_path, perturbqa_dir):
    import pandas as pd

    from synthpert.config import load_section
    from synthpert.config.run import RunConfig
    from synthpert.pipeline import Pipeline
    from synthpert.sampling import subsample

    path = bench.run_config("science", tmp_path)
    genes = {}
    for seed in (0, 7):
        cfg = load_section(RunConfig, None, path, [f"data.seed={seed}", f"data.source={perturbqa_dir}"])
        dcfg = Pipeline(cfg, tmp_path / f"run{seed}").eval_data_config("rpe1_science")
        assert dcfg.seed == seed and dcfg.test_subsample.seed == 0  # only the test draw is fixed
        frame = pd.DataFrame({"gene": [f"G{i}" for i in range(3000)], "label": "x"})
        genes[seed] = set(subsample(frame, dcfg.test_subsample, dcfg.seed + 2)["gene"])
    assert genes[0] == genes[7] and len(genes[0]) == 1200
    # without the fixed seed each run's seed draws its own genes
    drawn = [set(subsample(frame, dcfg.test_subsample.model_copy(update={"seed": None}), s)["gene"]) for s in (2, 9)]
    assert drawn[0] != drawn[1]
