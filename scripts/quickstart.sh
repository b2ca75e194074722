#!/usr/bin/env bash
# The offline quickstart: set up .venv, make PerturbQA available, run the whole pipeline on the tiny model.
#   bash scripts/quickstart.sh [extra key=value overrides for configs/quickstart.yaml]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
data="${SYNTHPERT_DATA:-$HOME/.cache/synthpert/perturbqa}"
if [[ -z "${SYNTHPERT_DATA:-}" && -d ../shared/data/perturbqa ]]; then
  .venv/bin/synthpert data fetch --dest "$data" --from ../shared/data/perturbqa   # local copy, verified
elif [[ ! -f "$data/k562-de.csv" ]]; then
  .venv/bin/synthpert data fetch --dest "$data"                                   # download, verified
fi
export SYNTHPERT_DATA="$data"
exec .venv/bin/synthpert run configs/quickstart.yaml "$@"
