#!/usr/bin/env bash
# One CUDA GPU, no network, <= 8 minutes: writes benchmarks/results/gpu_check_cuda.json.
#   benchmarks/gpu_check.sh [extra gpu_check.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" benchmarks/gpu_check.py --device cuda "$@"
