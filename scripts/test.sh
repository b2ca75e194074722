#!/usr/bin/env bash
# Install the test environment (.venv, with the vLLM CPU build) and run the whole test-suite.
# The fast tier while developing (no training, vLLM or whole-pipeline runs): bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SYNTHPERT_TEST_DATA="${SYNTHPERT_TEST_DATA:-$(cd .. && pwd)/shared/data/perturbqa}"
exec .venv/bin/python -m pytest -q --durations=25 "$@"
