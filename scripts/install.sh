#!/usr/bin/env bash
# Install gsa_kernels and its dependencies into the current Python environment.
#   bash scripts/install.sh          the library + demo extras
#   bash scripts/install.sh test     + test and integration extras (k-diffusion, diffusers)
# torch 2.14.1 is the CUDA 13.0 build (on these machines it installs from local disk); the
# extension is built against it without build isolation, with the CUDA kernels when nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="demo"
[ "${1:-}" = "test" ] && extras="demo,test,integrations"
python -m pip install -q "torch==2.14.1" "setuptools>=64,<81" wheel ninja
python -m pip install -q --no-build-isolation -e ".[${extras}]"
python -m gsa_kernels info
