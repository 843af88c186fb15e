"""Runs tests/_dispatch_probe.py in a fresh process under given GSA_KERNELS_* settings (each
setting once per test session)."""
import functools
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def probe(gemm="auto", isa="auto", threads=2):
    env = dict(os.environ, GSA_KERNELS_GEMM=gemm, GSA_KERNELS_ISA=isa,
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.pt")
        proc = subprocess.run([sys.executable, "-m", "tests._dispatch_probe", path, str(threads)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return torch.load(path)


def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo), empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
