"""The C++ CPU kernels and the SIMT-emulated CUDA kernels under AddressSanitizer +
UndefinedBehaviorSanitizer (scripts/sanitize.sh: a separate in-place build in a scratch copy,
the sanitizer runtimes preloaded): the conformance suite's cpu and cuda (emulated) cases on
shapes at every tile edge, one-row batches, NaN rows and the large-grid cases, and the file-backed
and concurrency tests of tests/test_scaleout_hardening.py, must run clean."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the conformance families that reach every index path: tile edges (B = 1 included), NaN rows, grids,
# constant coordinates (the cpu gather)
SLICE = os.environ.get("GSA_SANITIZE_K", "(cpu or cuda) and (tiles or nan or grid or const)")
# and the file-backed and concurrency tests of the scale-out paths (points files read with pread,
# models mutated by another thread, freed storages)
SCALEOUT = (["tests/test_scaleout_hardening.py"], "test_file_ or test_concurrent_")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("git") is None, reason="needs gcc and git")
def test_kernels_run_clean_under_asan_and_ubsan(tmp_path):
    env = dict(os.environ, GSA_SANITIZE_DIR=str(tmp_path / "tree"))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "sanitize.sh"), "tests/conformance", *SCALEOUT[0], "-k",
                           f"({SLICE}) or {SCALEOUT[1]}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-6000:]
    assert proc.returncode == 0, out[-6000:]
    assert " passed" in out, out[-3000:]
