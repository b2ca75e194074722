"""SmolLM2-135M-Instruct served by `synthpert serve` as the teacher's and judge's OpenAI-compatible endpoint, and
configs/local_llm.yaml end to end with it: a real teacher, a real judge and a real student (the other half of the
``real_model`` tier, beside test_real_model.py; the import is the shared ``real_model_dir`` fixture)."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from _procs import communicate, free_port, synthpert_process, wait_for_health

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def base_server(real_model_dir):
    """`synthpert serve` on the base model: the teacher's and judge's OpenAI-compatible endpoint."""
    port = free_port()
    proc = synthpert_process("serve", "--model", NAME, "--port", port, "request_timeout_s=900",
                             env={"SYNTHPERT_MODEL_CACHE": os.environ["SYNTHPERT_MODEL_CACHE"]})
    url = f"http://127.0.0.1:{port}"
    wait_for_health(proc, url, 180)
    yield url
    proc.terminate()
    proc.communicate(timeout=30)


def test_served_base_model_speaks_the_openai_sdk_and_the_predict_route(base_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_server}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Name one organelle of the cell."}]
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert plain.choices[0].message.content and streamed == plain.choices[0].message.content
    assert plain.usage.completion_tokens <= 16
    r = httpx.post(f"{base_server}/v1/predict", json={"cell_line": "K562", "perturbation": "MYC", "gene": "GAPDH"},
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] in ("upregulated", "downregulated", "not differentially expressed")
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-6


def test_local_llm_config_runs_end_to_end_with_a_real_teacher_judge_and_student(base_server, perturbqa_dir,
                                                                              tmp_path):
    """configs/local_llm.yaml, small: every stage meets the real model, and what it does wrong is counted; then
    `synthpert predict --run` answers with the student it trained."""
    v1 = f"{base_server}/v1"
    proc = synthpert_process(
        "run", "configs/local_llm.yaml", "--runs-dir", tmp_path,
        f"data.source={perturbqa_dir}", f"teacher.base_url={v1}", f"judge.base_url={v1}",
        "data.train_subsample.n=6", "teacher.sampling.max_completion_tokens=96",
        "judge.sampling.max_completion_tokens=24", "train.optim.max_steps=2", "train.optim.batch_size=2",
        "train.lora.layers=2",
        "eval_sets.k562_test.n=4", "eval.inference.max_new_tokens=24",
        env={"SYNTHPERT_MODEL_CACHE": os.environ["SYNTHPERT_MODEL_CACHE"]})
    stdout, stderr = communicate(proc, timeout=600)
    assert proc.returncode == 0, (stdout[-3000:], stderr[-3000:])
    run = tmp_path / "local_llm"
    gen = json.loads((run / "generate" / "summary.json").read_text())
    assert gen["traces"] == 12 and gen["teacher"] == NAME and not gen["offline_heuristic"]
    rates = gen["parse_rates"]
    assert 0 <= rates["strict"] <= rates["lenient"] <= 1
    assert set(gen["output_problems"]) >= {"no_answer_tag", "hit_length_cap", "repetition",
                                           "answer_disagrees_with_label", "label_in_other_words"}
    judged = json.loads((run / "judge" / "summary.json").read_text())
    assert judged["judge"] == NAME and judged["kept"] >= 1
    assert sum(r["n"] for r in judged["per_rating"].values()) == judged["judged"]
    assert sum(judged["rejection_reasons"].values()) == judged["rejected"]
    console = stdout + stderr
    assert "strict" in console and "lenient" in console and "rating" in console
    assert (run / "eval" / "k562_test" / "result" / "report.md").is_file()
    # what the run's last lines suggest: the trained student answers a triple of one's own
    proc = synthpert_process("predict", "--run", run, "--cell", "K562", "--perturbation", "MYC", "--gene", "GAPDH",
                             "inference.max_new_tokens=24",
                             env={"SYNTHPERT_MODEL_CACHE": os.environ["SYNTHPERT_MODEL_CACHE"]})
    stdout, stderr = communicate(proc, timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    answer = json.loads(stdout)
    assert answer["label"] in ("upregulated", "downregulated", "not differentially expressed")
    assert abs(sum(answer["probabilities"].values()) - 1) < 1e-6
