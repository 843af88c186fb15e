"""The one place of the helpers the test modules share (tests/README.md): random models with known
structure (float64 unless asked), which backends run here, and re-running a module's Triton
cases under the interpreter."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels._core import _backends, _extension

REPO = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


# ----------------------------------------------------------------------------- which backends run here


def requires_backend(name):
    """Skip marker for a backend that is not usable here, with the reason."""
    ok, why = _backends.BACKENDS[name].status()
    return pytest.mark.skipif(not ok, reason=f"backend {name!r} unavailable: {why}")


def backend_param(name):
    """pytest.param(name) that skips, saying why, where the backend cannot run in this process:
    triton only under TRITON_INTERPRET=1 (the child of rerun_under_interpreter), cuda through
    the emulated kernels (the test sets GSA_KERNELS_CUDA_EMULATE=1), the others by their status."""
    if name == "triton":
        why = ("triton is not installed" if not HAS_TRITON
               else "runs in the TRITON_INTERPRET=1 subprocess of this module's test_triton_interpreter")
        return pytest.param(name, marks=pytest.mark.skipif(not (INTERPRET and HAS_TRITON), reason=why))
    if name == "cuda":
        return pytest.param(name, marks=pytest.mark.skipif(
            not _extension.has_kernel("cuda_emu_gaussian_map", "CPU"), reason="no emulated CUDA kernels in the build"))
    ok, why = _backends.BACKENDS[name].status()
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=why))


# ----------------------------------------------------------------------------- the Triton interpreter


def rerun_under_interpreter(test_file, *pytest_args, timeout=900):
    """Run the tests of `test_file` (filtered by pytest_args, e.g. "-k", "triton") in a child
    pytest with TRITON_INTERPRET=1 -- Triton decides between compiled and interpreted kernels when
    its kernel modules are imported, so a process that imported them cannot switch -- and fail the
    calling test with the child's output if any failed. Returns the output's tail."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is set: these tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", *pytest_args, str(test_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"the TRITON_INTERPRET=1 run of {Path(test_file).name} failed:\n{tail}"
    assert " passed" in tail, f"the TRITON_INTERPRET=1 run of {Path(test_file).name} ran nothing:\n{tail}"
    return tail


# ----------------------------------------------------------------------------- models


def orthonormal(D, r, gen):
    """D x r orthonormal columns, float64, contiguous, from the generator gen (r = 0: [D, 0])."""
    return torch.linalg.qr(torch.randn(D, max(r, 1), dtype=torch.float64, generator=gen))[0][:, :r].contiguous()


def random_gaussian(D, r, residual_var=0.3, dtype=torch.float64, seed=0, spread=3.0):
    """A GaussianModel with a random orthonormal basis and eigenvalues spread over decades."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, max(r, 1), dtype=torch.float64, generator=g))[0][:, :r]
    eigvals = torch.exp(spread * torch.rand(r, dtype=torch.float64, generator=g) - 1.5)
    mean = torch.randn(D, dtype=torch.float64, generator=g)
    return gk.GaussianModel(mean.to(dtype), basis.to(dtype), eigvals.to(dtype), residual_var)


def random_mixture(K, D, r, residual_var=0.2, dtype=torch.float64, seed=0, sep=3.0):
    g = torch.Generator().manual_seed(seed)
    means = sep * torch.randn(K, D, dtype=torch.float64, generator=g)
    bases = torch.stack([torch.linalg.qr(torch.randn(D, max(r, 1), dtype=torch.float64, generator=g))[0][:, :r] for _ in range(K)])
    eigvals = torch.exp(2 * torch.rand(K, r, dtype=torch.float64, generator=g) - 1)
    residual_vars = residual_var * (0.5 + torch.rand(K, dtype=torch.float64, generator=g))
    log_weights = torch.randn(K, dtype=torch.float64, generator=g)
    return gk.GaussianMixture(means.to(dtype), bases.to(dtype), eigvals.to(dtype), residual_vars.to(dtype), log_weights.to(dtype))


def dense_covariance(g):
    """Sigma = U diag(lam) U^T + residual_var (I - U U^T) as a dense [D, D] float64 matrix."""
    U = g.basis.double()
    P = torch.eye(g.dim, dtype=torch.float64) - U @ U.T
    return U @ torch.diag(g.eigvals.double()) @ U.T + g.residual_var * P


def dense_covariances(m):
    out = []
    for k in range(m.num_components):
        U = m.bases[k].double()
        P = torch.eye(m.dim, dtype=torch.float64) - U @ U.T
        out.append(U @ torch.diag(m.eigvals[k].double()) @ U.T + m.residual_var[k].double() * P)
    return torch.stack(out)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


SIGMAS = [0.002, 0.05, 1.0, 80.0]
