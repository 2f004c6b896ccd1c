#!/usr/bin/env bash
# GPU check (issue #14): clients on cuda, fractional GPUs per Ray actor, metrics equal to the CPU run.
# Skips cleanly (exit 0) where no CUDA GPU is visible. Usage: bash scripts/gpu_check.sh [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_check.py "$@"
