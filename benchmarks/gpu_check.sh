#!/usr/bin/env bash
# Training throughput on a lent GPU machine (one command, self-contained): paper preset, batch 1024 pairs,
# 1024 random negatives, real featurization from a synthetic day it builds; prints steps/s, examples/s,
# peak GPU memory, mean GPU utilisation and the top CUDA kernels of a step (last line: one JSON object).
#
# The GPU machine has python3.12 with torch, numba, pyarrow, scipy and safetensors but not duckdb or
# rocksdict: carry their cp312 wheels in .whl/ (ignored by git). Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl duckdb==2.0.1 rocksdict==0.3.29
# then run through the device tool with carry [".whl"]:  bash benchmarks/gpu_check.sh [--steps 60]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/train_throughput.py --device cuda --preset paper --batch-size 1024 --negatives 1024 \
  --scale small --steps 60 --profile "$@"
