#!/usr/bin/env bash
# Install gsa_kernels and its dependencies into the current Python environment (a venv is best).
#   bash scripts/install.sh          the library + demo extras
#   bash scripts/install.sh test     + test extras and the real k-diffusion / diffusers packages
# Environment: GSA_KERNELS_CUDA=0 skips the CUDA kernels (=1 insists on them); MAX_JOBS=N
# compiler processes. Running it again reuses the build: only what changed is recompiled.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") extras="demo" ;;
  test) extras="demo,test,integrations" ;;
  *) echo "usage: bash scripts/install.sh [test]" >&2; exit 2 ;;
esac
started=$SECONDS
phase() { printf '\n==> [%s/5] %s  (%ds so far)\n' "$1" "$2" "$((SECONDS - started))"; }
pip_install() { python -m pip install --no-warn-conflicts --progress-bar off "$@"; }

# The supported torch range is written once, in setup.py (TORCH_SUPPORTED).
torch_spec=$(sed -n 's/^TORCH_SUPPORTED = "\(torch[^"]*\)".*/\1/p' setup.py)

phase 1 "torch ($torch_spec): an installed torch in this range is kept"
if ! python -c "import torch" 2>/dev/null; then
  echo "No torch here: pip installs the newest torch in the range (a CUDA build from PyPI, about"
  echo "3 GB with its CUDA libraries). For a CPU-only or another CUDA build, install that torch"
  echo "first and run this script again."
fi
# numpy with torch: every later `import torch` (the probes below, setup.py) otherwise prints a
# false "Failed to initialize NumPy" warning
pip_install "$torch_spec" numpy
torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")  # a local label (+cu130, +cpu) matches no index entry
# every later pip call keeps this torch (torchvision, a k-diffusion dependency, would replace it)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"

phase 2 "build tools"
pip_install -c "$constraints" "setuptools>=77,<81" wheel ninja

cuda=$(python - <<'EOF'
import os, shutil, torch
if os.environ.get("GSA_KERNELS_CUDA") == "0":
    print("off: GSA_KERNELS_CUDA=0")
elif torch.version.cuda and shutil.which("nvcc"):
    print(f"on: nvcc found at {shutil.which('nvcc')} and torch is a CUDA {torch.version.cuda} build")
else:
    print("off: " + ("no nvcc on PATH" if torch.version.cuda else "torch is a CPU-only build"))
EOF
)
if [[ $cuda == on* ]]; then
  phase 3 "compiling the extension gsa_kernels._C (C++ CPU kernels, real CUDA kernels, their CPU emulation)"
else
  phase 3 "compiling the extension gsa_kernels._C (C++ CPU kernels + emulated CUDA kernels; no real CUDA kernels)"
fi
echo "CUDA kernels $cuda."
echo "Estimate from scratch: the C++ kernels take about 3 CPU-minutes (2 min on 2 idle cores, much longer on a busy machine)$([[ $cuda == on* ]] && echo "; the CUDA kernels add several minutes more (skip them with GSA_KERNELS_CUDA=0 bash scripts/install.sh)"); unchanged sources are not compiled again."
echo "ninja prints one line per compiled file:"
python setup.py -q build_ext --inplace

phase 4 "the package (editable) and its dependencies (extras: $extras); the build above is reused"
GSA_KERNELS_PREBUILT=1 pip_install -c "$constraints" --no-build-isolation -e ".[${extras}]"

if [ "${1:-}" = "test" ]; then
  phase 5 "k-diffusion without its stale numpy<2 pin"
  # k-diffusion's dependency dctorch pins numpy<2 but runs on numpy 2, which mlxtend and pandas
  # need; both go in without dependencies (the integrations extra lists k-diffusion's others).
  pip_install -c "$constraints" --no-deps "k-diffusion==0.1.1.post1" "dctorch==0.1.2"
else
  phase 5 "(nothing: 'bash scripts/install.sh test' adds the test extras)"
fi
echo
# pip check lists every unmet requirement but dctorch's numpy pin, which is known to be harmless
python -m pip check | grep -v '^dctorch .* numpy' || true
echo "Installed in $((SECONDS - started)) s."
python -m gsa_kernels info
