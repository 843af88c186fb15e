"""scripts/gpu_check.sh --dry-run: the one-shot GPU check's pipeline on CPU stand-ins (Triton
interpreter, CUDA emulation, reduced sizes), so that it cannot rot between GPU days."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("environment", "build", "conformance", "compile", "sanitizer", "bench", "local")


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    report = (tmp_path / "gpu_check.md").read_text()
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(data["parts"]) == set(PARTS), data["parts"].keys()
    for part in PARTS:
        assert f"| {part} |" in report
    bad = {n: p["status"] for n, p in data["parts"].items()
           if not (p["status"] == "passed" or p["status"].startswith("skipped"))}
    assert not bad and proc.returncode == 0, f"{bad}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = data["parts"]["bench"]["info"]["rows"]
    assert {r["impl"] for r in rows} >= {"triton", "cuda", "eager", "compiled"}
    assert {r["workload"] for r in rows} == {"G1", "G2", "T1", "M1", "E1"}
    counts = data["parts"]["conformance"]["info"]["counts"]
    assert sum(t for fams in counts.values() for _, t in fams.values()) > 0, "the conformance slice ran no case"
    _check_local_part(data, report)


def _check_local_part(data, report):
    """The local part's rows: every machine, triton / cuda / conv2d, ours checked against conv2d."""
    rows = data["parts"]["local"]["info"]["rows"]
    assert {r["workload"] for r in rows} == {"L-ls", "L-els", "L-bbels"}
    assert {r["impl"] for r in rows} == {"triton", "cuda", "conv2d"}
    ours = [r for r in rows if r["impl"] != "conv2d"]
    assert len(ours) == 6 and all(r["max_abs_diff_vs_conv2d"] < 1e-3 for r in ours), ours
    assert "## Local score machines vs the conv2d formulation" in report and "| L-els | cuda |" in report


def test_gpu_check_local_part_dry_run(tmp_path):
    """The local machines' part alone on the CPU stand-ins (interpreter, emulation, tiny shapes)."""
    proc = _run_check(["--dry-run", "--parts", "local", str(tmp_path)], REPO, timeout=600)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0 and data["parts"]["local"]["status"] == "passed", proc.stdout + proc.stderr
    _check_local_part(data, (tmp_path / "gpu_check.md").read_text())


def test_local_table_reads_the_rows():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    base = dict(sigma=1.0, dtype="float32", B=8, N=1000, C=1, H=28, W=28, P=5, reduced=False)
    rows = [dict(base, workload="L-els", impl="conv2d", median_ms=500.0, best_ms=490.0),
            dict(base, workload="L-els", impl="cuda", median_ms=50.0, best_ms=49.0, max_abs_diff_vs_conv2d=3e-6)]
    table = "\n".join(gpu_check.local_table({"rows": rows}))
    assert "| L-els | cuda | 50.000 | 49.000 | 10.0 | 3e-06 |" in table and "| L-els | conv2d | 500.000" in table
    assert gpu_check.local_table({}) == ["(no local rows)"]


def _run_check(args, cwd, timeout=300):
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={k: v for k, v in os.environ.items()
                                                           if k != "GSA_GPU_CHECK_CALLER_DIR"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_check_without_a_gpu_fails_loudly(tmp_path):
    """Run for real (no --dry-run) where torch sees no GPU: exit 2 at once, a report saying
    so, and no part run on the CPU stand-ins (which would "pass" conformance)."""
    proc = _run_check([str(tmp_path)], REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(data["parts"]) == ["environment"] and data["parts"]["environment"]["status"].startswith("failed")


def test_gpu_check_clears_an_earlier_runs_results_and_resolves_out_dir_at_the_caller(tmp_path):
    """OUT_DIR holding an earlier run's passing results: this run (environment only) must not
    report them; a relative OUT_DIR lands under the caller's directory, not the repository."""
    out = tmp_path / "rel" / "out"
    out.mkdir(parents=True)
    stale = {"dry_run": True, "parts": {"conformance": {"status": "passed", "seconds": 1, "info": {}}}}
    (out / "gpu_check.json").write_text(json.dumps(stale))
    (out / "conformance.xml").write_text("<testsuite/>")
    (out / "compile.json").write_text("[]")
    proc = _run_check(["--dry-run", "--parts", "environment", "rel/out"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "gpu_check.json").read_text())
    assert list(data["parts"]) == ["environment"]
    assert not (out / "conformance.xml").exists() and not (out / "compile.json").exists()
    assert not (REPO / "rel").exists()


def test_gpu_check_reads_only_files_this_run_wrote(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    old = tmp_path / "conformance.xml"
    old.write_text("<testsuite/>")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert not gpu_check._written_since(old, time.time())
    assert gpu_check._written_since(old, time.time() - 7200)
