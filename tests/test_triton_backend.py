"""Triton backend (gsa_kernels/triton) against the reference, on CPU tensors through the Triton
interpreter.

Triton decides between compiled and interpreted kernels when a kernel is decorated, so
TRITON_INTERPRET=1 must be set before gsa_kernels.triton's kernel modules are imported -- and
setting it inside a shared pytest process would also make the triton backend accept CPU tensors
in every other test module. So, unless TRITON_INTERPRET=1 is already set, this module runs
itself in a fresh subprocess with TRITON_INTERPRET=1 (test_interpreter_suite) and the kernel
tests below only run inside that subprocess (or when CI sets the variable globally).

Shapes are chosen around the interpreter's single autotune config (gsa_kernels/triton:
BLOCK_B = 16, BLOCK_D = 32, BLOCK_R = 16, BLOCK_K = 16; c held in registers for r <= 16,
through the scratch for r > 16), so every mask is crossed one below / at / one above a tile edge.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
in_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess started by test_interpreter_suite")
REPO = Path(__file__).resolve().parents[1]


def test_interpreter_suite():
    """Run this module's kernel tests in a subprocess with TRITON_INTERPRET=1."""
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is set: the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", str(Path(__file__))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"interpreter tests failed:\n{tail}"
    print(tail)


# ----------------------------------------------------------------------------- data


def _orthonormal(D, r, gen):
    return torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=gen))[0][:, :r].contiguous()


def gaussian_model(D, r, residual_var, seed=0):
    """A float32 model (float32-representable values: the float64 reference sees the same)."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(D, dtype=torch.float64, generator=gen)
    eigvals = torch.rand(r, dtype=torch.float64, generator=gen) * 4 + 0.01
    return gk.GaussianModel(mean.float(), _orthonormal(D, r, gen).float(), eigvals.float(), residual_var)


def mixture_model(K, D, r, residual_var=None, seed=0):
    """residual_var None: random per component; a float: that value for all (0 with r = 0 is
    the empirical delta mixture)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, dtype=torch.float64, generator=gen)
    bases = torch.stack([_orthonormal(D, r, gen) for _ in range(K)]) if r else torch.zeros(K, D, 0, dtype=torch.float64)
    eigvals = torch.rand(K, r, dtype=torch.float64, generator=gen) * 4 + 0.01
    if residual_var is None:
        lp = torch.rand(K, dtype=torch.float64, generator=gen) * 0.5
    else:
        lp = torch.full((K,), float(residual_var), dtype=torch.float64)
    logw = torch.log_softmax(torch.randn(K, dtype=torch.float64, generator=gen), 0)
    return gk.GaussianMixture(means.float(), bases.float(), eigvals.float(), lp.float(), logw.float())


def as64(model):
    return model.to("cpu", torch.float64)


def per_sample_sigma(B, low=0.05, high=3.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(B, dtype=torch.float64, generator=gen)).float()


# Tolerances, relative to the largest reference entry (max-norm): float32 kernels accumulate
# D products in float32 (error ~ sqrt(D) eps32 ~ 1e-6 at these D); float16 / bfloat16 outputs
# are rounded to their dtype (eps 2^-11 and 2^-8), the computation itself is float32. float64:
# the low-rank mixture forms |P_perp y|^2 as |y|^2 - |c|^2 when that is safe in float32 terms,
# while the reference sums it directly; in float64 that costs ~ eps |y|^2/(lam_perp+sigma^2) ~ 4e-10.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 2e-9}


def assert_close_maxnorm(out, ref, dtype, what=""):
    ref = ref.double()
    scale = max(1.0, ref.abs().max().item())
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"


# ----------------------------------------------------------------------------- Gaussian family

GAUSSIAN_SHAPES = [  # (B, D, r): B = 1; one below / at / above BLOCK_B, BLOCK_D, BLOCK_R; r = 0, 1, D
    (1, 61, 0), (17, 61, 1), (15, 33, 16), (16, 31, 17), (17, 32, 15), (5, 61, 61), (33, 20, 20),
]


def _f64(v):
    return v.double() if isinstance(v, torch.Tensor) else v


def _gaussian_ref(op, x, sigma, g, **kw):
    """The reference op in float64 on the same (rounded) x; sigma is sigma or sigma_from."""
    kw = {k: _f64(v) for k, v in kw.items()}
    if op == "gaussian_flow":
        kw["sigma_from"] = _f64(sigma)
    else:
        kw["sigma"] = _f64(sigma)
    return getattr(gk, op)(x.double(), g=as64(g), backend="reference", **kw)


@in_interpreter
@pytest.mark.parametrize("B,D,r", GAUSSIAN_SHAPES)
@pytest.mark.parametrize("residual_var", [0.0, 0.3])
def test_gaussian_denoise_score(B, D, r, residual_var):
    g = gaussian_model(D, r, residual_var)
    x = torch.randn(B, D) * 2
    for sigma in (per_sample_sigma(B), 0.7):
        for op in ("gaussian_denoise", "gaussian_score"):
            out = getattr(gk, op)(x, sigma, g, backend="triton")
            assert out.shape == x.shape and out.dtype == x.dtype
            assert_close_maxnorm(out, _gaussian_ref(op, x, sigma, g), torch.float32, f"{op} B={B} D={D} r={r}")


@in_interpreter
@pytest.mark.parametrize("B,D,r", GAUSSIAN_SHAPES)
def test_gaussian_flow(B, D, r):
    g = gaussian_model(D, r, 0.2)
    x = torch.randn(B, D) * 2
    sa = per_sample_sigma(B, 0.1, 5.0, seed=2)
    sa[0] = math.inf  # row 0 starts from unit noise
    sb = per_sample_sigma(B, 0.0, 2.0, seed=3)
    ka, kb = per_sample_sigma(B, 0.5, 1.5, seed=4), per_sample_sigma(B, 0.5, 1.5, seed=5)
    out = gk.gaussian_flow(x, sa, sb, g, ka, kb, backend="triton")
    ref = _gaussian_ref("gaussian_flow", x, sa, g, sigma_to=sb, scale_from=ka, scale_to=kb)
    assert_close_maxnorm(out, ref, torch.float32, f"flow B={B} D={D} r={r}")
    out = gk.gaussian_flow(x, 2.0, 0.0, g, backend="triton")  # scalar sigmas, to the ODE end point
    assert_close_maxnorm(out, _gaussian_ref("gaussian_flow", x, 2.0, g, sigma_to=0.0), torch.float32, "flow to 0")


@in_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # out[0] from noise to sigma = inf
@pytest.mark.parametrize("B,D,r", [(1, 61, 0), (17, 33, 15), (15, 61, 17), (5, 32, 32)])
def test_gaussian_trajectory(B, D, r):
    g = gaussian_model(D, r, 0.1)
    x = torch.randn(B, D) * 3
    sigmas = torch.stack([per_sample_sigma(B, 0.0, 4.0, seed=t) for t in range(5)])
    sigmas[0] = sigmas[0] + 4.0
    sigmas[0, 0] = 1e4  # per-sample: row 0 starts far out (sigmas[0] must be finite)
    out = gk.gaussian_trajectory(x, sigmas, g, backend="triton")
    ref = gk.gaussian_trajectory(x.double(), sigmas.double(), as64(g), backend="reference")
    assert out.shape == (5, B, D)
    assert_close_maxnorm(out[1:], ref[1:], torch.float32, "trajectory")
    assert_close_maxnorm(out[0], x, torch.float32, "trajectory t=0")  # out[0] is x itself


@in_interpreter
@pytest.mark.parametrize("sigma", [0.002, 80.0])
@pytest.mark.parametrize("r,residual_var", [(0, 0.3), (5, 0.0), (17, 0.1), (40, 0.0)])
def test_gaussian_sigma_extremes(sigma, r, residual_var):
    D = 40
    g = gaussian_model(D, r, residual_var)
    if r == D:  # float32-rounded U is orthonormal to ~1e-7 only, and P_perp y / sigma^2 in the
        # float64 reference amplifies that by 2.5e5: use an exactly orthonormal signed permutation
        gen = torch.Generator().manual_seed(7)
        perm = torch.eye(D)[torch.randperm(D, generator=gen)] * (torch.randint(0, 2, (D,), generator=gen) * 2 - 1)
        g = gk.GaussianModel(g.mean, perm, g.eigvals, residual_var)
    # x near the data at small sigma (the regime a sampler visits), far at large sigma
    x0 = g.mean[:, None] + (g.basis * g.eigvals.sqrt()) @ torch.randn(r, 6)
    x = (x0.T + sigma * torch.randn(6, D)).float()
    for op in ("gaussian_denoise", "gaussian_score"):
        out = getattr(gk, op)(x, sigma, g, backend="triton")
        # score at sigma = 0.002 with 0 < r < D: a y and the in-span term cancel at size
        # 1/sigma^2 = 2.5e5, so float32 keeps ~1e-7 * 2.5e5 / |out| of the span part
        tol_scale = 50 if (op == "gaussian_score" and sigma < 0.01 and 0 < r < D) else 1
        ref = _gaussian_ref(op, x, sigma, g)
        err = (out.double() - ref).abs().max().item()
        assert err <= tol_scale * TOL[torch.float32] * max(1.0, ref.abs().max().item()), f"{op}: {err}"
    out = gk.gaussian_flow(x, sigma, 0.0, g, backend="triton")
    assert_close_maxnorm(out, _gaussian_ref("gaussian_flow", x, sigma, g, sigma_to=0.0), torch.float32, "flow")


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_gaussian_dtypes(dtype):
    D, r = 61, 17
    g = gaussian_model(D, r, 0.2)
    gd = g.to("cpu", torch.float64) if dtype == torch.float64 else g
    x = (torch.randn(17, D) * 2).to(dtype)  # the reference sees the same rounded x
    sigma = per_sample_sigma(17)
    for op in ("gaussian_denoise", "gaussian_score"):
        out = getattr(gk, op)(x, sigma.to(torch.float64) if dtype == torch.float64 else sigma, gd, backend="triton")
        assert out.dtype == dtype
        assert_close_maxnorm(out, _gaussian_ref(op, x, sigma, g), dtype, f"{op} {dtype}")
    traj = gk.gaussian_trajectory(x, torch.tensor([3.0, 1.0, 0.1]), gd, backend="triton")
    assert traj.dtype == dtype
    assert_close_maxnorm(traj, gk.gaussian_trajectory(x.double(), torch.tensor([3.0, 1.0, 0.1]), as64(g), backend="reference"), dtype, "traj")


@in_interpreter
def test_gaussian_batched_shape_and_zero_batch():
    g = gaussian_model(60, 4, 0.1)
    x = torch.randn(3, 3, 4, 5)
    out = gk.gaussian_denoise(x, 0.5, g, backend="triton")
    assert out.shape == x.shape
    assert_close_maxnorm(out, gk.gaussian_denoise(x.double(), 0.5, as64(g), backend="reference"), torch.float32, "shape")
    assert gk.gaussian_score(torch.randn(0, 60), 0.5, g, backend="triton").shape == (0, 60)


@in_interpreter
def test_tf32_precision_opt_in(monkeypatch):
    """GSA_KERNELS_TRITON_PRECISION selects the dot precision; unknown values are an error."""
    g = gaussian_model(33, 17, 0.1)
    x = torch.randn(5, 33)
    monkeypatch.setenv("GSA_KERNELS_TRITON_PRECISION", "tf32x3")
    out = gk.gaussian_denoise(x, 0.5, g, backend="triton")
    assert_close_maxnorm(out, _gaussian_ref("gaussian_denoise", x, 0.5, g), torch.float16, "tf32x3")
    monkeypatch.setenv("GSA_KERNELS_TRITON_PRECISION", "fp8")
    with pytest.raises(ValueError, match="GSA_KERNELS_TRITON_PRECISION"):
        gk.gaussian_denoise(x, 0.5, g, backend="triton")


# ----------------------------------------------------------------------------- mixture family

MIXTURE_CASES = [  # (B, K, D, r, residual_var): low-rank in registers / through the scratch, full
    # rank, isotropic (r = 0, residual_var > 0), empirical (r = 0, residual_var = 0); K one
    # below / at / above BLOCK_K = 16 for the r = 0 kernel
    (17, 5, 61, 1, None), (15, 3, 33, 16, None), (16, 4, 31, 17, 0.0), (5, 3, 20, 20, None),
    (1, 15, 61, 0, 0.2), (17, 17, 61, 0, 0.0), (33, 16, 32, 0, 0.0), (3, 40, 33, 0, None),
    (3, 65, 65, 0, 0.0),  # D and K one above the merge kernel's BLOCK_N = 64
    (2, 1, 20, 3, None), (2, 1, 20, 0, 0.0),  # K = 1
]


def _mixture_ref(x, sigma, m):
    s = sigma.double() if isinstance(sigma, torch.Tensor) else torch.full((x.shape[0],), float(sigma), dtype=torch.float64)
    m64 = as64(m)
    return reference.mixture_posterior(x.double().reshape(x.shape[0], -1), s, m64.means, m64.bases, m64.eigvals,
                                       m64.residual_var, m64.log_weights)


def _near_data(m, B, sigma, seed=0):
    """x = a component's point (mean plus an in-span draw) + sigma noise."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(0, m.num_components, (B,), generator=gen)
    x0 = m.means[k].double()
    if m.bases.shape[2]:
        z = torch.randn(B, m.bases.shape[2], 1, dtype=torch.float64, generator=gen)
        x0 = x0 + (m.bases[k].double() @ (z * m.eigvals[k].double().sqrt()[:, :, None]))[..., 0]
    return (x0 + sigma * torch.randn(B, m.dim, dtype=torch.float64, generator=gen)).float()


def tv(w, ref):
    return 0.5 * (w.double() - ref).abs().sum(1).max().item()


@in_interpreter
@pytest.mark.parametrize("B,K,D,r,residual_var", MIXTURE_CASES)
def test_mixture_posterior(B, K, D, r, residual_var):
    m = mixture_model(K, D, r, residual_var)
    x = _near_data(m, B, 0.5)
    sigma = per_sample_sigma(B, 0.2, 2.0)
    den, w = gk.mixture_denoise(x, sigma, m, return_weights=True, backend="triton")
    rden, rlogp, rw = _mixture_ref(x, sigma, m)
    assert den.shape == x.shape and w.shape == (B, K) and w.dtype == torch.float32
    assert_close_maxnorm(den, rden, torch.float32, "denoised")
    assert tv(w, rw) <= 1e-5
    logp = gk.mixture_logp(x, sigma, m, backend="triton")
    # logp is a sum of D log terms (|logp| ~ D): float32 relative error
    assert (logp.double() - rlogp).abs().max().item() <= 2e-6 * max(1.0, rlogp.abs().max().item())
    score = gk.mixture_score(x, 0.7, m, backend="triton")
    rden7 = _mixture_ref(x, 0.7, m)[0]
    assert_close_maxnorm(score, (rden7 - x.double()) / 0.49, torch.float32, "score")


@in_interpreter
@pytest.mark.parametrize("r", [0, 3, 17])
def test_mixture_split_k_merge(r):
    """Partial (max, sum, weighted-sum) states over component splits merge exactly."""
    from gsa_kernels.triton import mixture as tm

    m = mixture_model(37, 33, r, 0.0 if r == 0 else None)
    x = _near_data(m, 5, 0.3)
    sigma = per_sample_sigma(5, 0.1, 1.0)
    args = (x, m.means, m.bases, m.eigvals, m.residual_var, m.log_weights, sigma, True, True)
    rden, rlogp, rw = _mixture_ref(x, sigma, m)
    for splits in (1, 2, 5, 37):
        den, logp, w = tm.mixture_posterior(*args, splits=splits)
        assert_close_maxnorm(den, rden, torch.float32, f"splits={splits}")
        assert tv(w, rw) <= 1e-5
        assert (logp.double() - rlogp).abs().max().item() <= 2e-6 * rlogp.abs().max().item()


@in_interpreter
@pytest.mark.parametrize("sigma", [0.002, 0.01, 80.0])
def test_empirical_mixture_small_sigma_weights(sigma):
    """Total variation of the weights <= 1e-3 vs float64 over the EDM range; includes near-ties:
    pairs of points 1.5 sigma apart, x between them (logits ~ 1/sigma^2 amplify errors in |x - mu|^2)."""
    D, B = 61, 12
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(20, D, dtype=torch.float64, generator=gen) * 2
    twins = base[:10] + 1.5 * sigma * torch.randn(10, D, dtype=torch.float64, generator=gen) / math.sqrt(D)
    m = gk.GaussianMixture.from_points(torch.cat([base, twins]).float())
    x = _near_data(m, B, sigma, seed=4)
    x[:6] = ((m.means[:6].double() + m.means[20:26].double()) / 2 + 0.3 * sigma * torch.randn(6, D, dtype=torch.float64, generator=gen) / math.sqrt(D)).float()
    den, w = gk.mixture_denoise(x, sigma, m, return_weights=True, backend="triton")
    rden, _, rw = _mixture_ref(x, sigma, m)
    assert tv(w, rw) <= 1e-3
    assert_close_maxnorm(den, rden, torch.float32, "denoised")


@in_interpreter
@pytest.mark.parametrize("sigma", [0.002, 80.0])
@pytest.mark.parametrize("r,residual_var", [(3, 0.05), (17, None), (33, None)])
def test_lowrank_mixture_sigma_extremes(sigma, r, residual_var):
    m = mixture_model(6, 33, r, residual_var)
    x = _near_data(m, 9, sigma)
    den, w = gk.mixture_denoise(x, sigma, m, return_weights=True, backend="triton")
    rden, rlogp, rw = _mixture_ref(x, sigma, m)
    assert tv(w, rw) <= 1e-3
    assert_close_maxnorm(den, rden, torch.float32, "denoised")
    logp = gk.mixture_logp(x, sigma, m, backend="triton")
    # at sigma = 0.002, |P_perp y|^2 / (lp + s^2) is a difference of two float32 sums scaled by up to 1/s^2
    assert (logp.double() - rlogp).abs().max().item() <= 1e-4 * max(1.0, rlogp.abs().max().item())


@in_interpreter
@pytest.mark.parametrize("sigma", [0.002, 0.01, 0.05])
def test_lowrank_mixture_near_tie_small_sigma(sigma):
    """Two components with the same mean and subspaces a sigma/8 rotation apart, residual_var 0,
    x near the data: the weights hinge on |P_perp y|^2 / sigma^2. The oracle is float64 with the
    residual summed directly, |y - U c|^2: with a float32-rounded basis (orthonormal to ~3e-8)
    the reference's |y|^2 - |c|^2 differs from it by c^T (U^T U - I) c / sigma^2, a property of
    the rounded model, not of the kernel (TV 3e-3 at sigma = 0.002 here)."""
    D, r, B = 33, 5, 8
    gen = torch.Generator().manual_seed(11)
    u1 = torch.linalg.qr(torch.randn(D, r, dtype=torch.float64, generator=gen))[0]
    u2 = torch.linalg.qr(u1 + sigma / 8 * torch.randn(D, r, dtype=torch.float64, generator=gen))[0]
    eig = torch.tensor([[4.0, 3, 2, 1, 0.5]] * 2)
    m = gk.GaussianMixture(torch.zeros(2, D), torch.stack([u1, u2]).float(), eig, torch.zeros(2), torch.log(torch.tensor([0.5, 0.5])))
    x = ((u1 @ (3 * torch.randn(r, B, dtype=torch.float64, generator=gen))).T
         + sigma * torch.randn(B, D, dtype=torch.float64, generator=gen)).float()
    _, w = gk.mixture_denoise(x, sigma, m, return_weights=True, backend="triton")
    m64 = as64(m)
    y = x.double()[:, None, :] - m64.means[None]
    c = torch.einsum("bkd,kdr->bkr", y, m64.bases)
    resid = (y - torch.einsum("bkr,kdr->bkd", c, m64.bases)).pow(2).sum(-1)
    v = m64.eigvals[None] + sigma**2
    logits = m64.log_weights - 0.5 * ((c * c / v).sum(-1) + resid / sigma**2 + torch.log(v).sum(-1))
    ref = torch.softmax(logits, 1)
    assert ref[:, 0].min() < 0.99  # a real near-tie
    assert tv(w, ref) <= 1e-3


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("r", [0, 5])
def test_mixture_dtypes(dtype, r):
    m = mixture_model(19, 33, r, 0.0 if r == 0 else None)
    x = _near_data(m, 17, 0.5).to(dtype)
    sigma = per_sample_sigma(17, 0.3, 2.0)
    md = m.to("cpu", torch.float64) if dtype == torch.float64 else m
    den, w = gk.mixture_denoise(x, sigma.to(md.means.dtype), md, return_weights=True, backend="triton")
    rden, _, rw = _mixture_ref(x, sigma, m)
    assert den.dtype == dtype and w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_maxnorm(den, rden, dtype, f"denoised {dtype}")
    # weights from the same rounded x; float64: see TOL (|y|^2 - |c|^2 vs the direct residual)
    assert tv(w, rw) <= (2e-9 if dtype == torch.float64 else 1e-5)


# ----------------------------------------------------------------------------- registration


@in_interpreter
def test_torch_compile_fullgraph():
    g = gaussian_model(40, 5, 0.1)
    m = mixture_model(7, 40, 3)
    e = mixture_model(20, 40, 0, 0.0)
    s = torch.full((4,), 0.6)  # per-sample tensor sigma (and float sigmas below)

    def f(x):
        traj = gk.gaussian_trajectory(x, torch.tensor([3.0, 1.0]), g, backend="triton")
        return (gk.gaussian_denoise(x, s, g, backend="triton") + traj[1] + gk.mixture_denoise(x, s, m, backend="triton")
                + gk.mixture_denoise(x, 0.3, e, backend="triton") + gk.mixture_logp(x, s, m, backend="triton")[:, None]
                + gk.gaussian_flow(x, 2.0, 0.5, g, backend="triton"))

    x = torch.randn(4, 40)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


@in_interpreter
def test_opcheck():
    from torch.library import opcheck

    from gsa_kernels.triton._library import ops

    g = gaussian_model(20, 3, 0.2)
    m = mixture_model(4, 20, 2)
    x = torch.randn(5, 20)
    s = torch.full((5,), 0.5)
    opcheck(ops.gaussian_map, (x, g.mean, g.basis, g.eigvals, 0.2, s, s, s, s, 0))
    opcheck(ops.gaussian_trajectory, (x, g.mean, g.basis, g.eigvals, 0.2, torch.rand(3, 5) + 0.1))
    for need in ((True, True), (False, False)):
        opcheck(ops.mixture_posterior, (x, m.means, m.bases, m.eigvals, m.residual_var, m.log_weights, s, *need))


def test_triton_op_traces_with_fake_cuda_tensors():
    """The GPU registration (triton_op + wrap_triton; here, without TRITON_INTERPRET) runs its
    launchers under FakeTensorMode on CUDA-device fake tensors, as torch.compile does: no GPU needed."""
    if INTERPRET:
        pytest.skip("checks the compiled-kernel registration: needs TRITON_INTERPRET unset")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from gsa_kernels.triton._library import ops

    B, D, r, K = 7, 64, 8, 5

    def f(x, mean, basis, eig, s, sigmas, means, bases, meig, lp, logw):
        return (ops.gaussian_map(x, mean, basis, eig, 0.1, s, s, s, s, 2),
                ops.gaussian_trajectory(x, mean, basis, eig, 0.1, sigmas),
                ops.mixture_posterior(x, means, bases, meig, lp, logw, s, True, True),
                ops.mixture_posterior(x, means, bases[:, :, :0], meig[:, :0], lp, logw, s, True, False))

    with FakeTensorMode():
        def e(*shape, dtype=torch.float32):
            return torch.empty(shape, device="cuda", dtype=dtype)

        args = (e(B, D, dtype=torch.bfloat16), e(D), e(D, r), e(r), e(B), e(3, B), e(K, D), e(K, D, r), e(K, r), e(K), e(K))
        gm = make_fx(f, tracing_mode="fake")(*args)
    outs = [n for n in gm.graph.nodes if n.op == "call_function" and "gsa_kernels_triton" in str(n.target)]
    assert len(outs) == 4


def _gpu_compile(kernel, types, constexprs, arch):
    """Compile a kernel's first autotune config for an NVIDIA arch without a GPU (Triton's
    bundled ptxas). Returns the compiled kernel (its metadata has the shared memory size)."""
    import triton
    from triton.backends.compiler import GPUTarget

    cfg = kernel.configs[0] if hasattr(kernel, "configs") else None
    jit = kernel.fn if cfg is not None else kernel
    consts = dict(constexprs, **(cfg.kwargs if cfg is not None else {}))
    signature = {name: "constexpr" if name in consts else types[name] for name in jit.arg_names}
    src = triton.compiler.ASTSource(fn=jit, signature=signature, constexprs=consts)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if cfg is not None else {"num_warps": 8}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_ampere_and_hopper(arch):
    """The compiled (non-interpreted) kernels lower to sm_80 / sm_90 cubins: catches what the
    interpreter cannot (types, layouts, tl.dot shapes, shared memory per block)."""
    if INTERPRET:
        pytest.skip("compiles the GPU kernels: needs TRITON_INTERPRET unset")
    pytest.importorskip("triton.backends.nvidia")
    from gsa_kernels.triton import gaussian, mixture

    smem_limit = {80: 163 * 1024, 90: 227 * 1024}[arch]
    f32, f64 = "*fp32", "*fp64"
    for x_t, c_t, precision in ((f32, f32, "ieee"), ("*bf16", f32, "tf32x3"), (f64, f64, "ieee")):
        types = dict(x_ptr=x_t, mean_ptr=c_t, basis_ptr=c_t, eigvals_ptr=c_t, lp_hi="fp32", lp_lo="fp32", sa_ptr=c_t,
                     ka_ptr=c_t, sb_ptr=c_t, kb_ptr=c_t, out_ptr=x_t, scratch_ptr=c_t, B="i32", D="i32", R="i32", T="i32")
        for registers in (True, False):  # map with r in registers; trajectory through the scratch
            k = _gpu_compile(gaussian._spectral_map_kernel, types, dict(
                KIND=2, HAS_SCALES=registers, HAS_BASIS=True, FULL_RANK=False, C_IN_REGISTERS=registers,
                CF_IN_REGISTERS=registers, R_PAD=64 if registers else 16, PRECISION=precision), arch)
            assert k.metadata.shared <= smem_limit
    types = dict(x_ptr=f32, means_ptr=f32, bases_ptr=f32, eigvals_ptr=f32, residual_var_ptr=f32, logw_ptr=f32,
                 sigma_ptr=f32, logits_ptr=f64, state_ptr=f64, acc_ptr=f32, scratch_ptr=f32, B="i32", D="i32", R="i32",
                 K="i32", K_PER_SPLIT="i32", S="i32")
    common = dict(NEED_DENOISED=True, NEED_WEIGHTS=True, PRECISION="ieee", LOG_2PI=mixture.LOG_2PI, BLOCK_B=mixture.BLOCK_B)
    for registers in (True, False):
        k = _gpu_compile(mixture._mixture_lowrank_kernel, types, dict(
            common, C_IN_REGISTERS=registers, R_PAD=32, FULL_RANK=False,
            EXACT_RESIDUAL_RATIO=mixture.EXACT_RESIDUAL_RATIO[torch.float32]), arch)
        assert k.metadata.shared <= smem_limit
    k = _gpu_compile(mixture._mixture_isotropic_kernel, types, dict(
        common, REFINE=True, LOGIT_TOL=mixture.LOGIT_TOL[torch.float32], CUTOFF=mixture.CUTOFF), arch)
    assert k.metadata.shared <= smem_limit
    types.update(weights_ptr=f32, denoised_ptr=f32, logp_ptr=f32)
    _gpu_compile(mixture._mixture_merge_kernel, types, dict(NEED_DENOISED=True, NEED_WEIGHTS=True, BLOCK_B=mixture.BLOCK_B, BLOCK_N=128), arch)
