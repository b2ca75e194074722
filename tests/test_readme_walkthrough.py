"""README's walkthrough runs as written: its commands are read from README.md (each fenced block after a
`<!-- walkthrough -->` line) and executed in order on a small subsample, so README and tool cannot drift."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- walkthrough -->"
# The sizes README names as the ones to change, and the smaller ones the test uses instead.
SIZES = {"train_subsample.n=300": "train_subsample.n=24", "test_subsample.genes=60": "test_subsample.genes=6",
         "--n 200": "--n 4", "inference.max_new_tokens=192": "inference.max_new_tokens=24"}


def walkthrough_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Walkthrough")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def walkthrough_commands() -> list[str]:
    section = walkthrough_section()
    blocks = re.findall(re.escape(MARK) + r"\s*\n```bash\n(.*?)```", section, flags=re.S)
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def test_walkthrough_is_found_and_chains_one_run_folder():
    commands = walkthrough_commands()
    assert [c.split()[1] for c in commands] == ["data", "generate", "judge", "model", "train", "eval", "predict"]
    assert all(c.startswith("synthpert ") and "runs/demo/" in c for c in commands)
    section = walkthrough_section()
    for size in SIZES:
        assert size in section, f"README's walkthrough no longer names {size!r}: update SIZES here"


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path, perturbqa_dir):
    env = {**os.environ, "SYNTHPERT_DATA": str(perturbqa_dir), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    outputs = {}
    for command in walkthrough_commands():
        for size, small in SIZES.items():
            command = command.replace(size, small)
        args = shlex.split(command)
        r = subprocess.run([sys.executable, "-m", "synthpert.cli", *args[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        outputs[args[1]] = r.stdout
    run = tmp_path / "runs" / "demo"
    for path in ("data/dataset", "generate/traces.jsonl", "judge/kept.jsonl", "base_model/config.json",
                 "train/adapter_model.safetensors", "eval/report.md"):
        assert (run / path).exists(), path
    # what README shows of the outputs is what the commands print
    section = walkthrough_section()
    for stage in ("generate", "judge"):
        written = next(line for line in outputs[stage].splitlines() if line.startswith("written: "))
        assert written in section, written
    assert "## Verdict" in (run / "eval" / "report.md").read_text()
    answer = json.loads(outputs["predict"])
    assert answer["label"] in ("upregulated", "downregulated", "not differentially expressed")
    assert set(answer["probabilities"]) == {"up", "down", "not_de"}
