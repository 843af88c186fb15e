"""Regressions of the kernel accuracy fixes of issue 11, one test body per case over the compiled
and Triton backends (cpu; cuda through the SIMT emulation; triton through the interpreter, in a
subprocess as in test_triton_backend.py), against the float64 reference on the same rounded
inputs:
- low-rank mixture weights on near ties at small sigma (nearly equal 1-d subspaces, residual_var
  0, large |x|): the residual |P_perp y|^2 must not come from |y|^2 - |c|^2;
- delta (r = 0) mixture weights on near ties (queries between two training points);
- float64 log-densities accurate to 1e-9 (no float32 constant in the float64 path);
- NaN in a row of x gives NaN logp, weights and denoiser in that row only;
- CUDA launch grids beyond 65535 blocks in gridDim.y / gridDim.z.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gsa_kernels import reference
from gsa_kernels._core import _backends, _extension
from tests._helpers import backend_param, rerun_under_interpreter
from tests.conformance.harness import WEIGHTS_TV

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TV_MAX = WEIGHTS_TV[torch.float32]  # total variation of the weights from the float64 truth (issue 11)


BACKENDS = [backend_param(b) for b in ("cpu", "cuda", "triton")]


@pytest.fixture(autouse=True)
def _emulate(monkeypatch):
    monkeypatch.setenv("GSA_KERNELS_CUDA_EMULATE", "1")  # the cuda backend reads it at call time


def test_triton_interpreter():
    """This module's triton cases, in a subprocess with TRITON_INTERPRET=1."""
    print(rerun_under_interpreter(__file__, "-k", "triton"))


def _posterior(backend, x, means, bases, eigvals, residual_var, log_weights, sigma):
    """The kernel-level op of `backend`: (denoised, logp, weights); the model in the compute dtype."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    args = [t.to(cd).contiguous() for t in (means, bases, eigvals, residual_var, log_weights, sigma)]
    return _backends.resolve(backend, x.device, "mixture_posterior")(x.contiguous(), *args[:5], args[5], True, True)


def _truth(x, means, bases, eigvals, residual_var, log_weights, sigma):
    """The float64 reference on the rounded inputs (model rounded to the compute dtype)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = [t.to(cd).double() for t in (means, bases, eigvals, residual_var, log_weights)]
    return reference.mixture_posterior(x.double(), *d, sigma.to(cd).double(), True, True)


def _check_weights(backend, case, dtype):
    den, logp, w = _posterior(backend, *case)
    den_t, logp_t, w_t = _truth(*case)
    tv = 0.5 * (w.double() - w_t).abs().sum(1).max().item()
    assert tv <= TV_MAX, f"weights: total variation {tv:.2e} from the float64 truth"
    # logp is stored in the compute dtype: relative bounds (|logp| reaches 1e7 at sigma = 0.002)
    logp_tol = (1e-9 if dtype == torch.float64 else 1e-6) * max(1.0, logp_t.abs().max().item())
    err = (logp.double() - logp_t).abs().max().item()
    assert err <= logp_tol, f"logp off by {err:.2e}"


def _lowrank_near_tie(dtype, sigma):
    """Two components whose 1-d subspaces differ by 1e-5, eigvals 1e4, residual_var 0, D = 64,
    x = 100 u + 2e-3 noise: the weights hinge on residuals of ~2.5e-4 next to |y|^2 = 1e4."""
    gen = torch.Generator().manual_seed(0)
    D = 64
    u1 = torch.randn(D, generator=gen, dtype=torch.float64)
    u1 /= u1.norm()
    v = torch.randn(D, generator=gen, dtype=torch.float64)
    v -= (v @ u1) * u1
    u2 = u1 + 1e-5 * v / v.norm()
    bases = torch.stack([u1, u2 / u2.norm()])[:, :, None]
    x = (100 * u1 + 2e-3 * torch.randn(4, D, generator=gen, dtype=torch.float64)).to(dtype)
    f64 = dict(dtype=torch.float64)
    return (x, torch.zeros(2, D, **f64), bases, torch.full((2, 1), 1e4, **f64), torch.zeros(2, **f64),
            torch.full((2,), -math.log(2), **f64), torch.full((4,), sigma, **f64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sigma", [0.002, 0.01, 0.1])
def test_lowrank_near_tie_weights(backend, dtype, sigma):
    _check_weights(backend, _lowrank_near_tie(dtype, sigma), dtype)


def _delta_near_tie(dtype, sigma, K=16, D=512, B=4):
    """Training points uniform in [-1, 1]^D; queries at midpoints of two points + 1e-3 noise."""
    gen = torch.Generator().manual_seed(1)
    points = torch.rand(K, D, generator=gen, dtype=torch.float64) * 2 - 1
    i = torch.arange(B)
    x = (0.5 * (points[i] + points[i + 1]) + 1e-3 * torch.randn(B, D, generator=gen, dtype=torch.float64)).to(dtype)
    f64 = dict(dtype=torch.float64)
    return (x, points, torch.zeros(K, D, 0, **f64), torch.zeros(K, 0, **f64), torch.zeros(K, **f64),
            torch.full((K,), -math.log(K), **f64), torch.full((B,), sigma, **f64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sigma", [0.002, 0.03, 0.1, 1.0, 80.0])
def test_delta_near_tie_weights(backend, dtype, sigma):
    _check_weights(backend, _delta_near_tie(dtype, sigma), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [0, 3])
def test_float64_logp(backend, r):
    """float64 log-densities to 1e-9 (a float32 log(2 pi) moves every row by ~1e-7)."""
    gen = torch.Generator().manual_seed(2)
    K, D, B = 5, 16, 6
    bases = torch.linalg.qr(torch.randn(K, D, D, generator=gen, dtype=torch.float64))[0][:, :, :r]
    case = (torch.randn(B, D, generator=gen, dtype=torch.float64), torch.randn(K, D, generator=gen, dtype=torch.float64),
            bases.contiguous(), torch.rand(K, r, generator=gen, dtype=torch.float64) * 3,
            torch.rand(K, generator=gen, dtype=torch.float64) * 0.5,
            torch.log_softmax(torch.randn(K, generator=gen, dtype=torch.float64), 0),
            torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 80.0], dtype=torch.float64))
    den, logp, w = _posterior(backend, *case)
    den_t, logp_t, w_t = _truth(*case)
    torch.testing.assert_close(logp, logp_t, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(w, w_t, rtol=0, atol=1e-9)
    torch.testing.assert_close(den, den_t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [0, 2])
def test_nan_row_propagates(backend, dtype, r):
    gen = torch.Generator().manual_seed(3)
    K, D, B = 3, 8, 3
    bases = torch.linalg.qr(torch.randn(K, D, D, generator=gen, dtype=torch.float64))[0][:, :, :r]
    x = torch.randn(B, D, generator=gen).to(dtype)
    x[1, 3] = float("nan")
    case = (x, torch.randn(K, D, generator=gen, dtype=torch.float64), bases.contiguous(),
            torch.ones(K, r, dtype=torch.float64), torch.full((K,), 0.1 if r else 0.0, dtype=torch.float64),
            torch.full((K,), -math.log(K), dtype=torch.float64), torch.full((B,), 0.5, dtype=torch.float64))
    den, logp, w = _posterior(backend, *case)
    assert logp[1].isnan() and w[1].isnan().all() and den[1].isnan().all()
    assert logp[[0, 2]].isfinite().all() and w[[0, 2]].isfinite().all() and den[[0, 2]].isfinite().all()


@pytest.mark.skipif(not _extension.has_kernel("cuda_emu_gaussian_map", "CPU"), reason="extension without the emulated CUDA kernels")
def test_cuda_grid_beyond_65535():
    """T > 65535 steps (gridDim.z is at most 65535: launched in chunks), and many rows (on gridDim.x;
    the 2M rows that overflowed gridDim.y before are too slow to emulate here)."""
    trajectory = _backends.resolve("cuda", torch.device("cpu"), "gaussian_trajectory")
    gen = torch.Generator().manual_seed(4)
    for r in (0, 1):
        D = 2
        mean = torch.randn(D, generator=gen)
        basis = torch.linalg.qr(torch.randn(D, D, generator=gen))[0][:, :r].contiguous()
        eigvals = torch.ones(r)
        for B, T in ((1, 70000), (70000, 1)):
            x = torch.randn(B, D, generator=gen)
            sigmas = torch.rand(T, B, generator=gen) + 0.1
            out = trajectory(x, mean, basis, eigvals, 0.3, sigmas)
            rows = [0, B - 1]
            ref = reference.gaussian_trajectory(x[rows].double(), mean.double(), basis.double(), eigvals.double(), 0.3,
                                                sigmas[:, rows].double())
            torch.testing.assert_close(out[:, rows].double(), ref, rtol=1e-5, atol=1e-5)
