"""README's walkthrough runs as written: its commands are read from README.md (each fenced block after a
`<!-- walkthrough -->` line) and executed in order on a small subsample, so README and tool cannot drift."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _procs import free_port, wait_for_health

LABELS = ("upregulated", "downregulated", "not differentially expressed")

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


def serve_block() -> tuple[str, str]:
    """README's step 8: the `synthpert serve` line and the curl line that asks it, as written."""
    section = walkthrough_section()
    block = re.search(r"\*\*8\. Serve\.\*\*.*?```bash\n(.*?)```", section, flags=re.S).group(1)
    lines = [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    serve = next(line for line in lines if line.startswith("synthpert serve "))
    curl = next(line for line in lines if line.startswith("curl "))
    return serve, curl


def readme_trace() -> str:
    """The sample trace under README's "What you get" (step 2's traces.jsonl, its AATF -> CD63 record)."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"\*\*A trace\*\*.*?```text\n(.*?)```", text, flags=re.S).group(1)


def trace_template(text: str, symbols: tuple[str, ...]) -> str:
    """A trace with its numbers and the record's own symbols blanked: what the evidence teacher's wording
    looks like, whichever triple it wrote about."""
    for sym in symbols:
        text = re.sub(rf"\b{re.escape(sym)}\b", "<SYM>", text)
    return re.sub(r"\d+", "<N>", text).strip()


def run_readme_curl(curl: str, port: int) -> dict:
    """README's curl line verbatim but for the port (8000 may be taken on a shared machine)."""
    assert "localhost:8000" in curl
    r = subprocess.run(["bash", "-c", curl.replace("localhost:8000", f"localhost:{port}")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readmes_curl_line_gets_a_prediction_as_written():
    """The line as written (it declares JSON), and the same line without its header: bare curl -d sends
    Content-Type application/x-www-form-urlencoded, and the endpoint reads the body as JSON anyway."""
    from _fake_predictor import FakePredictor
    from _live_server import LiveServer

    from synthpert.serve import create_app

    _, curl = serve_block()
    header = "-H 'Content-Type: application/json' "
    assert header in curl
    bare = curl.replace(header, "")
    assert "Content-Type" not in bare
    with LiveServer(create_app(FakePredictor())) as srv:
        for line in (curl, bare):
            answer = run_readme_curl(line, srv.port)
            assert answer["label"] in LABELS and answer["cell_line"] == "k562", (line, answer)


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
    # README's sample trace has the wording step 2 writes today (numbers and symbols aside)
    records = [json.loads(x) for x in (run / "generate" / "traces.jsonl").read_text().splitlines()]
    templates = {trace_template(r["raw_text"], ("K562", r["perturbation"], r["gene"])) for r in records}
    assert trace_template(readme_trace(), ("K562", "AATF", "CD63")) in templates
    assert "## Verdict" in (run / "eval" / "report.md").read_text()
    answer = json.loads(outputs["predict"])
    assert answer["label"] in LABELS
    assert set(answer["probabilities"]) == {"up", "down", "not_de"}
    if shutil.which("curl"):
        served = _serve_and_curl(tmp_path, env)
        assert served["label"] in LABELS and set(served["probabilities"]) == {"up", "down", "not_de"}


def _serve_and_curl(cwd: Path, env: dict) -> dict:
    """README's step 8 as written (on a free port): `synthpert serve` in the background, then its curl line."""
    serve, curl = serve_block()
    port = free_port()
    for size, small in SIZES.items():
        serve = serve.replace(size, small)
    args = shlex.split(serve.replace("--port 8000", f"--port {port}"))
    proc = subprocess.Popen([sys.executable, "-m", "synthpert.cli", *args[1:], "--max-new-tokens", "24"], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_health(proc, f"http://127.0.0.1:{port}", 300)
        return run_readme_curl(curl, port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
