import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "vllm", "fastapi", "datasets", "ray")


def test_help_imports_no_heavy_library():
    code = ("import sys; from synthpert.cli.main import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"--help imported heavy modules: {out.stdout}"


def test_config_typo_gets_did_you_mean(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  train_cels: [k562]\n")
    out = subprocess.run([sys.executable, "-m", "synthpert.cli", "data", "build", "--out", str(tmp_path / "o"),
                          "--config", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean 'train_cells'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_wheel_ships_prompts_data_configs_and_finds_them(tmp_path):
    """A non-editable install must find prompts/, data/ and configs/ (they live outside the package dir)."""
    pytest.importorskip("hatchling")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("synthpert-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("synthpert/_resources/prompts/student_user.j2", "synthpert/_resources/data/cell_lines.yaml",
                   "synthpert/_resources/data/perturbqa_checksums.json"):
        assert needed in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import synthpert, synthpert.resources as r; from synthpert.prompting import student_messages; "
            f"assert str(synthpert.__file__).startswith({str(target)!r}); print(r.resource_dir('prompts')); "
            "print(student_messages('rpe1', 'A', 'B')[1]['content'][:40])")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "_resources" in out.stdout and "Analyze the regulatory effect" in out.stdout


def test_version_flag_prints_the_version_without_a_command():
    import subprocess
    import sys

    from synthpert import __version__

    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == __version__, r.stdout + r.stderr


def test_baselines_config_values_survive_when_no_flag_is_given(tmp_path, perturbqa_dir):
    """The --train-cells / --test-cells defaults used to win over the config's data section."""
    import json
    import subprocess
    import sys

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  source: {perturbqa_dir}\n  train_cells: [hepg2]\n  test_cells: [hepg2]\n")
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "baselines", "-c", str(cfg), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["train_cells"] == ["hepg2"] and out["test_cells"] == ["hepg2"]
    # a flag given on the command line still wins over the file
    r = subprocess.run([sys.executable, "-m", "synthpert.cli", "baselines", "-c", str(cfg), "--json",
                        "--test-cells", "hepg2", "--train-cells", "hepg2,k562"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["train_cells"] == ["hepg2", "k562"]
