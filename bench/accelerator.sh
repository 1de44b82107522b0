#!/usr/bin/env bash
# The prepared accelerator check (bench/accelerator.py), bounded to fit a short device lease:
# 3B shapes, random weights, the backend's fused attention vs einsum. Under 8 minutes on one
# H100/H200-class GPU or a TPU v4 chip; the output table goes to stdout and $OUT if set.
#   bash bench/accelerator.sh            # pip installs the package first when it is missing
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import emor3_jax" 2>/dev/null || pip install -q -e ".[cuda]" 2>/dev/null \
  || pip install -q -e .
out=${OUT:-/tmp}/accelerator.txt
timeout 450 python bench/accelerator.py "$@" 2>&1 | tee "$out"
