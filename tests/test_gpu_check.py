"""scripts/gpu_check.sh --dry-run: the one-shot GPU check's pipeline on CPU stand-ins (Triton
interpreter, CUDA emulation, reduced sizes), so that it cannot rot between GPU days."""
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("environment", "build", "conformance", "compile", "sanitizer", "bench")


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
