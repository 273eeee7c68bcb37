#!/usr/bin/env bash
# The checks that need a CUDA device, as one short script for a lent GPU
# machine: the GPU-marked tests, then a short run with device=cuda (nccl).
# Usage: bash scripts/gpu_check.sh   (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi || { echo "no GPU visible"; exit 1; }
make venv
export GEMINI_OUTPUTS="${OUT:-/tmp}/gemini-gpu-outputs"
echo "== GPU-marked tests"
.venv/bin/python -m pytest -m gpu -q -p no:cacheprovider || rc=$?
echo "== short run on cuda (2 nodes x 1 rank, replicated, one software failure)"
.venv/bin/gemini cluster.device=cuda cluster.nodes=2 model=gpt_tiny train.steps=40 \
  backend=replicated failure=software_once failure.at_step=20 tracking=off
exit "${rc:-0}"
