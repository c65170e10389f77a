#!/usr/bin/env bash
# One CUDA GPU, no network, <= 8 minutes: writes benchmarks/results/gpu_check_cuda.json.
#   benchmarks/gpu_check.sh [--wheels DIR] [extra gpu_check.py arguments]
# --wheels DIR: a machine without this project's packages (the lent GPU machine: Python 3.12, torch,
# timm, onnx already there, no network) installs the wheels of DIR first, offline, into a temporary
# folder put on PYTHONPATH; `make gpu-wheels` fills DIR (default .whl/, git-ignored) with exactly
# those wheels, one version each, for CPython 3.12 / manylinux x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [[ "${1:-}" == "--wheels" ]]; then
  wheels="${2:?--wheels needs a folder}"
  shift 2
  PY="${PYTHON:-python3}"
  site="$(mktemp -d)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" benchmarks/gpu_check.py --device cuda "$@"
