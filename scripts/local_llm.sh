#!/usr/bin/env bash
# A real language model at every stage, offline on a CPU (configs/local_llm.yaml): serves SmolLM2-135M-Instruct
# with `synthpert serve` on 127.0.0.1 (the teacher's and the judge's OpenAI-compatible endpoint), runs the
# pipeline against it, and stops the server. Rerun it to resume: answers already received are cached.
#   bash scripts/local_llm.sh [extra key=value overrides for configs/local_llm.yaml]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --real
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source scripts/perturbqa_env.sh
port="${SYNTHPERT_LOCAL_PORT:-8011}"
log="runs/local_llm_server.log"
mkdir -p runs
# Long requests are normal for a CPU teacher answering 16 samples at once: a generous per-request limit.
.venv/bin/synthpert serve --model smollm2-135m-instruct --port "$port" request_timeout_s=1800 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
echo "serving smollm2-135m-instruct on 127.0.0.1:$port (log: $log; the first start converts the model, ~30 s)"
for _ in $(seq 1 300); do
  if curl -sf "http://127.0.0.1:$port/health" >/dev/null; then break; fi
  if ! kill -0 $server 2>/dev/null; then echo "the server stopped; see $log" >&2; tail -5 "$log" >&2; exit 1; fi
  sleep 1
done
.venv/bin/synthpert run configs/local_llm.yaml teacher.base_url="http://127.0.0.1:$port/v1" \
    judge.base_url="http://127.0.0.1:$port/v1" "$@"
