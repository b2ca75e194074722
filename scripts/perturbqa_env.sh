# Sourced by quickstart.sh and local_llm.sh (from the repository root, after setup.sh): makes PerturbQA
# available and exports SYNTHPERT_DATA. A local copy next to the checkout is verified and used; otherwise
# the CSVs are downloaded once (checksums verified) into ~/.cache/synthpert/perturbqa.
data="${SYNTHPERT_DATA:-$HOME/.cache/synthpert/perturbqa}"
if [[ -z "${SYNTHPERT_DATA:-}" && -d ../shared/data/perturbqa ]]; then
  .venv/bin/synthpert data fetch --dest "$data" --from ../shared/data/perturbqa   # local copy, verified
elif [[ ! -f "$data/k562-de.csv" ]]; then
  .venv/bin/synthpert data fetch --dest "$data"                                   # download, verified
fi
export SYNTHPERT_DATA="$data"
