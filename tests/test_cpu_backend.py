"""The C++ CPU backend (csrc/cpu) against the float64 reference (gsa_kernels/reference.py).

Inputs are float32-representable (models and x are drawn in float32 or rounded to the tested
dtype) and the oracle runs in float64 on exactly those values, so every difference is the
kernel's own rounding. Error measure, per row b:

    err_b = |out_b - ref_b| / scale_b,   scale_b = |ref_b| + (largest gain) |y_b| + |b_b mu|

i.e. relative to the largest term the spectral map adds up (a y, U diag(f) c, b mu; DESIGN.md
section 1). Where those terms cancel (score at sigma = 0.002: every term ~ 1/sigma^2 while the sum
is much smaller) no float32 evaluation order can do better than a few ulps of the largest term,
and the float32 reference itself is off by 1e-2 relative to |ref| there. Tolerances:
  float64  1e-10 (spec: <= 1e-5; the kernels reach ~1e-14)
  float32  1e-5  (~100 ulp of the largest term: GEMM sums over D <= 784 terms)
  float16  1.5e-3, bfloat16 1e-2 (output rounding: half an ulp is 2^-11 and 2^-8 relative,
           plus the float16 / bfloat16 rounding of the returned values only)
"""
import math

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import reference
from tests.conftest import requires_backend

pytestmark = requires_backend("cpu")

GAUSS_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
SIGMAS = [0.002, 0.03, 1.0, 7.0, 80.0]  # per-sample sigma rows, both ends of the EDM range


def _orthonormal(D, r, gen):
    q, _ = torch.linalg.qr(torch.randn(D, max(r, 1), dtype=torch.float64, generator=gen))
    return q[:, :r]


def make_gaussian(D, r, residual_var, seed=0):
    """A float32 GaussianModel (the tested values) with eigenvalues spread over 1e-3..10."""
    gen = torch.Generator().manual_seed(seed)
    basis = _orthonormal(D, r, gen).float()
    eigvals = (10.0 ** (torch.rand(r, generator=gen) * 4 - 3)).float()
    mean = torch.randn(D, generator=gen).float()
    return gk.GaussianModel(mean, basis, eigvals, residual_var)


def rank_of(D, which):
    return {"0": 0, "1": 1, "quarter": max(1, D // 4), "full": D}[which]


def row_errors(out, ref, scale):
    out = out.double().reshape(out.shape[0], -1)
    ref = ref.double().reshape(ref.shape[0], -1)
    return (out - ref).norm(dim=1) / scale


def gain_bound(g, kind, sa, sb, ka, kb):
    """Per-row upper bound of the gains of the spectral map (a and every a(lam_j)), [B]."""
    lam = torch.cat([g.eigvals.double(), torch.tensor([g.residual_var], dtype=torch.float64)])[None]
    sa, sb, ka, kb = (t.double()[:, None] for t in (sa, sb, ka, kb))
    if kind == "denoise":
        gains = torch.ones_like(sa)
    elif kind == "score":
        gains = 1.0 / (lam + sa**2)
    else:
        finite = torch.sqrt((lam + sb**2) / (lam + torch.where(torch.isinf(sa), 1.0, sa) ** 2)) / ka
        gains = kb * torch.where(torch.isinf(sa), torch.sqrt(lam + sb**2), finite)
    return gains.max(dim=1).values


def per_row(v, B):
    return v.expand(B) if isinstance(v, torch.Tensor) else torch.full((B,), float(v))


def run_gaussian(kind, x, g, sa, sb, ka, kb, backend):
    if kind == "denoise":
        return gk.gaussian_denoise(x, sa, g, backend=backend)
    if kind == "score":
        return gk.gaussian_score(x, sa, g, backend=backend)
    return gk.gaussian_flow(x, sa, sb, g, scale_from=ka, scale_to=kb, backend=backend)


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_gaussian(kind, x, g, sa, sb=1.0, ka=1.0, kb=1.0, out=None):
    """The cpu backend's result (or `out`, computed elsewhere) vs the float64 reference."""
    g64 = g.to(dtype=torch.float64)
    B = x.shape[0]
    d64 = lambda v: v.double() if isinstance(v, torch.Tensor) else v
    if out is None:
        out = run_gaussian(kind, x, g.to(dtype=compute_dtype(x.dtype)), sa, sb, ka, kb, "cpu")
    ref = run_gaussian(kind, x.double(), g64, d64(sa), d64(sb), d64(ka), d64(kb), "reference")
    assert out.dtype == x.dtype and out.shape == x.shape
    rows = [per_row(v, B) for v in (sa, sb, ka, kb)]
    y = x.double() - g64.mean
    y = torch.where(torch.isinf(rows[0].double())[:, None], x.double(), y)
    mu_term = (per_row(kb, B).double() if kind == "flow" else torch.ones(B)).abs() * g64.mean.norm()
    scale = ref.double().norm(dim=1) + gain_bound(g64, kind, *rows) * y.norm(dim=1) + mu_term
    err = row_errors(out, ref, scale).max().item()
    assert err <= GAUSS_TOL[x.dtype], f"{kind}: error {err:.3g} > {GAUSS_TOL[x.dtype]:.3g}"


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which_r", ["0", "1", "quarter", "full"])
@pytest.mark.parametrize("D", [2, 61, 784])
@pytest.mark.parametrize("sigma", ["per_sample", 0.002, 80.0], ids=str)
@pytest.mark.parametrize("kind", ["denoise", "score"])
def test_denoise_and_score(kind, sigma, D, which_r, dtype):
    if kind == "score" and dtype == torch.float16:
        pytest.skip("score ~ |x| / sigma^2 overflows float16 at small sigma (the reference too)")
    g = make_gaussian(D, rank_of(D, which_r), residual_var=0.0 if which_r == "full" else 0.05)
    x = torch.randn(5, D).to(dtype) * 2
    s = torch.tensor(SIGMAS) if sigma == "per_sample" else sigma
    check_gaussian(kind, x, g, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which_r", ["0", "1", "quarter", "full"])
@pytest.mark.parametrize("D", [2, 61, 784])
def test_flow(D, which_r, dtype):
    g = make_gaussian(D, rank_of(D, which_r), residual_var=0.02)
    x = torch.randn(5, D).to(dtype)
    # per-sample: forward and backward in sigma, sigma_to = 0, scaled (VP-like) schedules
    sa = torch.tensor([80.0, 0.5, 0.002, 3.0, 10.0])
    sb = torch.tensor([0.0, 0.002, 80.0, 3.0, 1.0])
    ka = torch.tensor([0.012, 0.9, 1.0, 0.3, 1.0])
    kb = torch.tensor([1.0, 1.0, 0.0125, 0.3, 0.7])
    check_gaussian("flow", x, g, sa, sb, ka, kb)
    check_gaussian("flow", x, g, 2.0, 0.1, 0.5, 0.8)  # scalar form


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [61, 784])
def test_flow_from_noise(D, dtype):
    """sigma_from = inf: x is unit noise; mixed with finite starts in one batch."""
    g = make_gaussian(D, D // 4, residual_var=0.1)
    x = torch.randn(4, D).to(dtype)
    check_gaussian("flow", x, g, math.inf, torch.tensor([80.0, 1.0, 0.002, 0.0]), 1.0, torch.tensor([0.5, 1.0, 1.0, 2.0]))
    check_gaussian("flow", x, g, torch.tensor([math.inf, 3.0, math.inf, 0.01]), 0.5)


def test_single_row_and_shape():
    g = make_gaussian(61, 7, 0.1)
    x = torch.randn(1, 1, 61)  # B = 1, feature shape kept
    out = gk.gaussian_denoise(x, 0.3, g, backend="cpu")
    assert out.shape == x.shape
    check_gaussian("denoise", x.reshape(1, 61), g, 0.3)


def test_many_rows_cross_blocks():
    """More rows than one row block and than one thread's share: block edges are exact."""
    g = make_gaussian(300, 40, 0.1)
    x = torch.randn(700, 300)
    check_gaussian("denoise", x, g, torch.rand(700) * 3 + 0.002)
    check_gaussian("flow", x.double(), g, torch.rand(700) * 3 + 0.1, torch.rand(700))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which_r", ["0", "1", "full"])
@pytest.mark.parametrize("start", ["finite", "inf"])
def test_trajectory(start, which_r, dtype):
    D = 61
    g = make_gaussian(D, rank_of(D, which_r), residual_var=0.03)
    x = torch.randn(3, D).to(dtype)
    sig = gk.schedules.karras(6).float()  # [7], 80 .. 0.002, 0
    per_sample = torch.stack([sig, sig * 0.5 + 1e-3, sig * 1.5], 1)  # [T, B]
    if start == "inf":  # the first row starts finite: mixed starts in one batch
        sig[0] = math.inf
        per_sample[0] = torch.tensor([math.inf, 40.0, math.inf])
    for sigmas in (sig, per_sample):
        out = gk.gaussian_trajectory(x, sigmas, g.to(dtype=compute_dtype(dtype)), backend="cpu")
        assert out.shape == (sigmas.shape[0], 3, D) and out.dtype == dtype
        rows = sigmas if sigmas.dim() == 2 else sigmas[:, None].expand(-1, 3)
        # step t is the flow from sigmas[0] to sigmas[t]; a state at sigma = inf is not finite
        # (the reference gives inf there too), so an infinite start is checked from t = 1
        for t in range(1 if start == "inf" else 0, rows.shape[0]):
            check_gaussian("flow", x, g, rows[0].clone(), rows[t].clone(), out=out[t])
