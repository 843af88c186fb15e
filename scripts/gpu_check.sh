#!/usr/bin/env bash
# The one-shot GPU check: build, conformance, compile/opcheck, compute-sanitizer, benchmarks,
# report in OUT_DIR (gpu_check.md + gpu_check.json). See scripts/gpu_check.py.
#   scripts/gpu_check.sh OUT_DIR             on a machine with one NVIDIA GPU (no network needed)
#   scripts/gpu_check.sh --dry-run OUT_DIR   the same pipeline on CPU stand-ins (CI)
set -uo pipefail
# a relative OUT_DIR is the caller's, not the repository's: gpu_check.py resolves it against this
export GSA_GPU_CHECK_CALLER_DIR="$PWD"
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
exec "$PY" scripts/gpu_check.py "$@"
