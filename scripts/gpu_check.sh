#!/usr/bin/env bash
# The checks that need a CUDA device, as one short script for a lent GPU
# machine (a few minutes):
#   1. the GPU-marked tests (restore on CUDA, then optimizer steps, bitwise
#      equal to the run that never failed);
#   2. a short benchmark on cuda: iteration time and checkpoint stall of
#      backend=none and backend=replicated (the results tables);
#   3. recovery end to end on cuda: a failure-free reference run, then a
#      hardware and a software failure of the same job; each must report
#      "exact  yes (reference run ...)".
# Writes everything under $OUT (or /tmp) and exits non-zero if any part fails.
# Usage: bash scripts/gpu_check.sh   (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi || { echo "no GPU visible"; exit 1; }
make venv
dir="${OUT:-/tmp}/gemini-gpu"
mkdir -p "$dir"
export GEMINI_OUTPUTS="$dir/outputs"
mlflow="sqlite:///$dir/mlflow.db"
rc=0

echo "== 1. GPU-marked tests"
.venv/bin/python -m pytest -m gpu -q -p no:cacheprovider || rc=1

echo "== 2. short benchmark on cuda (2 nodes x 1 rank, gpt_small, no failure)"
.venv/bin/gemini -m backend=none,replicated failure=none cluster.device=cuda \
  cluster.nodes=2 model=gpt_small train.steps=30 \
  tracking.uri="$mlflow" tracking.experiment=gpu-benchmark 2>&1 | tee "$dir/benchmark.txt" || rc=1

echo "== 3. recovery end to end on cuda (reference, hardware failure, software failure)"
.venv/bin/gemini -m failure=none,hardware_once,software_once failure.at_step=10 \
  backend=replicated cluster.device=cuda cluster.nodes=2 model=gpt_tiny train.steps=20 \
  tracking.uri="$mlflow" tracking.experiment=gpu-recovery 2>&1 | tee "$dir/recovery.txt" || rc=1
exact=$(grep -Ec '^exact +yes \(reference run [0-9a-f]+\)$' "$dir/recovery.txt" || true)
if [ "$exact" -eq 2 ]; then
  echo "recovery on cuda: both failures ended exact"
else
  echo "recovery on cuda: $exact of 2 failures ended exact (see $dir/recovery.txt)"
  rc=1
fi
exit "$rc"
