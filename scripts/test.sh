#!/usr/bin/env bash
# Install the test environment (.venv, with the vLLM CPU build) and run the whole test-suite.
# The fast tier while developing (no training, vLLM or whole-pipeline runs): bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SYNTHPERT_TEST_DATA="${SYNTHPERT_TEST_DATA:-$(cd .. && pwd)/shared/data/perturbqa}"
# Two workers, one file each at a time (module fixtures such as the imported real model stay in one process),
# each with one OpenMP thread: two torch processes with two threads each on two cores spin against each other
# and run several times slower. SYNTHPERT_TEST_WORKERS=0 runs everything in this process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
workers="${SYNTHPERT_TEST_WORKERS:-2}"
exec .venv/bin/python -m pytest -q --durations=25 -n "$workers" --dist loadfile "$@"
