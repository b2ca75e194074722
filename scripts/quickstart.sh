#!/usr/bin/env bash
# The offline quickstart: set up .venv, make PerturbQA available, run the whole pipeline on the tiny model.
#   bash scripts/quickstart.sh [extra key=value overrides for configs/quickstart.yaml]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source scripts/perturbqa_env.sh
exec .venv/bin/synthpert run configs/quickstart.yaml "$@"
