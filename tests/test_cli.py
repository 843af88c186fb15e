import subprocess
import sys


def test_info_lists_every_backend_with_a_reason():
    out = subprocess.run([sys.executable, "-m", "gsa_kernels", "info"], capture_output=True, text=True, check=True).stdout
    for name in ("reference", "cpu", "triton", "cuda"):
        assert f"  {name}" in out
    assert "torch " in out and "gsa_kernels " in out
