#!/usr/bin/env bash
# The C++ CPU kernels and the SIMT-emulated CUDA kernels under AddressSanitizer +
# UndefinedBehaviorSanitizer: a separate in-place build in a scratch copy of the tracked tree
# (the installed extension is left alone), then pytest there with the sanitizer runtimes
# preloaded into Python. Any report fails the run (UBSan does not recover; ASan aborts).
#   bash scripts/sanitize.sh [pytest args...]      default: the sanitizer case list below
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${GSA_SANITIZE_DIR:-/tmp/gsa_kernels_sanitize}
mkdir -p "$work"
# the tracked tree (and untracked, not ignored files) into the scratch copy; the build dir stays
(cd "$repo" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$work" -xf -
cd "$work"
echo "[sanitize] building the ASan + UBSan extension in $work (CPU + emulated CUDA kernels) ..."
GSA_KERNELS_SANITIZE=1 GSA_KERNELS_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} python setup.py build_ext --inplace -q >build.log 2>&1 \
  || { tail -30 build.log; exit 1; }
preload="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# detect_leaks=0: CPython and torch keep allocations alive at exit by design
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:protect_shadow_gap=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export GSA_KERNELS_CUDA_EMULATE=1 OMP_NUM_THREADS=2
if [ $# -eq 0 ]; then  # the conformance suite's C++ CPU and emulated CUDA cases
  set -- tests/conformance -k "cpu or cuda"
fi
echo "[sanitize] pytest $* (LD_PRELOAD=$preload)"
LD_PRELOAD="$preload" python -m pytest -q -p no:cacheprovider "$@"
