"""Property-based fuzzing (hypothesis) of every public op against the float64 reference.

Random shapes (image-shaped samples too), memory layouts (non-contiguous, expanded, channels-last),
dtypes, sigma from 1e-4 to 1e4 as float / 0-d / [B], ranks 0..D, 1..300 components, -inf log
weights, models in float32 and float64, on every backend that runs in this process (the C++ CPU
kernels, the CUDA kernels through the SIMT emulation). Each drawn case either matches the float64
reference within the error the dtypes allow, or raises a clear error (ValueError / TypeError) --
never a crash, a hang or a silently wrong number. Bounded: GSA_FUZZ_EXAMPLES examples per op
(default 40), derandomized so CI is repeatable.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import gsa_kernels as gk
from tests._helpers import orthonormal

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("GSA_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # monkeypatch: set once per test
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# unit roundoff of the compute dtype (float64 for float64 x, else float32) and of the output
COMPUTE_EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23}


def _backends():
    out = ["cpu"] if "cpu" in gk.available_backends() else []
    os.environ.setdefault("GSA_KERNELS_CUDA_EMULATE", "0")
    return out + ["cuda-emulated"]


def _run(backend, fn, monkeypatch):
    if backend == "cuda-emulated":
        monkeypatch.setenv("GSA_KERNELS_CUDA_EMULATE", "1")
        if "cuda" not in gk.available_backends():
            pytest.skip("the emulated CUDA kernels are not built here")
        return fn("cuda")
    return fn(backend)


# ----------------------------------------------------------------------------- strategies


@st.composite
def samples(draw, D, B):
    """x [B, *shape] with prod(shape) == D in a random dtype and memory layout."""
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "noncontiguous", "expanded", "channels_last"]))
    scale = draw(st.sampled_from([0.1, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(B, D, generator=gen, dtype=torch.float64) * scale
    if layout == "noncontiguous":
        x = torch.zeros(B, 2 * D, dtype=dtype)[:, ::2]
        return x.copy_(base.to(dtype))
    if layout == "expanded":
        return base[:1].to(dtype).expand(B, D)
    if layout == "channels_last":
        c = next((c for c in (3, 2) if D % c == 0), 1)
        hw = D // c
        h = next(h for h in range(int(math.isqrt(hw)), 0, -1) if hw % h == 0)
        return base.to(dtype).reshape(B, c, h, hw // h).contiguous(memory_format=torch.channels_last)
    return base.to(dtype)


def sigma_values(draw, B, lo=1e-4, hi=1e4):
    """sigma as a float, a 0-d tensor or a [B] tensor, log-uniform in [lo, hi]."""
    form = draw(st.sampled_from(["float", "0d", "rows"]))
    vals = [math.exp(draw(st.floats(math.log(lo), math.log(hi)))) for _ in range(max(B, 1))]
    if form == "float":
        return vals[0], torch.full((B,), vals[0], dtype=torch.float64)
    # a tensor sigma is taken as it is stored: the truth uses its (possibly float32-rounded) values
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    if form == "0d":
        t = torch.tensor(vals[0], dtype=dtype)
        return t, t.double().expand(B).clone()
    t = torch.tensor(vals[:B], dtype=dtype)
    return t, t.double()


@st.composite
def gaussians(draw, D):
    r = draw(st.sampled_from(sorted({0, 1, D // 2, D})))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rv = 0.0 if r == D else draw(st.sampled_from([0.0, 1e-3, 0.7]))
    eig = torch.exp(torch.rand(r, generator=gen, dtype=torch.float64) * 8 - 4)
    g = gk.GaussianModel(torch.randn(D, generator=gen, dtype=torch.float64), orthonormal(D, r, gen), eig, rv)
    return g, draw(st.sampled_from([torch.float32, torch.float64]))


@st.composite
def mixtures(draw, D):
    K = draw(st.sampled_from([1, 2, 7, 40, 300]))
    r = draw(st.sampled_from(sorted({0, 1, min(D, 3)})))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    means = torch.randn(K, D, generator=gen, dtype=torch.float64) * draw(st.sampled_from([0.5, 3.0]))
    bases = torch.stack([orthonormal(D, r, gen) for _ in range(K)]) if r else torch.zeros(K, D, 0, dtype=torch.float64)
    eig = torch.exp(torch.rand(K, r, generator=gen, dtype=torch.float64) * 4 - 2)
    rv = torch.full((K,), draw(st.sampled_from([0.0, 0.3])), dtype=torch.float64)
    if r == D:
        rv.zero_()
    logw = torch.log_softmax(torch.randn(K, generator=gen, dtype=torch.float64), 0)
    if K > 1 and draw(st.booleans()):  # some components switched off
        logw[torch.rand(K, generator=gen) < 0.3] = -math.inf
        logw[0] = max(logw[0].item(), -1.0)
    m = gk.GaussianMixture(means, bases, eig, rv, logw)
    return m, draw(st.sampled_from([torch.float32, torch.float64]))


def _draw_case(data, max_D, models, what, sigma_lo):
    """D, B, the model (in its drawn dtype) and the same model in float64 (as the kernel sees it,
    after its dtype cast), x and x in float64 [B, D], sigma (as passed) and in float64 [B]."""
    D = data.draw(st.integers(1, max_D), "D")
    B = data.draw(st.integers(0, 7), "B")
    model64, model_dtype = data.draw(models(D), what)
    x = data.draw(samples(D, B), "x")
    sig, sig64 = sigma_values(data.draw, B, lo=sigma_lo)
    if x.dtype == torch.float64:  # a float32-born basis is orthonormal to ~1e-8 only: float64 answers differ by that
        model_dtype = torch.float64
    model = model64.to(dtype=model_dtype)
    return D, B, model, model.to(dtype=torch.float64), x, x.double().reshape(B, D), sig, sig64


# ----------------------------------------------------------------------------- checks


def _check(out, truth, x, scale, what, extra=0.0):
    """out (x's dtype) against the float64 truth: |out - truth| <= tol * (|truth| + scale) + extra
    per row, tol from the output rounding and the compute dtype; non-representable results (beyond
    the dtype's range) must come out as +-inf, never as finite garbage."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_eps = torch.finfo(x.dtype).eps
    tol = 4 * out_eps + 2e3 * COMPUTE_EPS[compute]
    out64 = out.double().reshape(truth.shape)
    big = truth.abs() > torch.finfo(x.dtype).max / 2
    ok_big = ~torch.isfinite(out64[big]) | ((out64[big] - truth[big]).abs() <= tol * truth[big].abs())
    assert ok_big.all(), f"{what}: overflowing entries came out finite and wrong"
    t, o = truth.masked_fill(big, 0), out64.masked_fill(big, 0)
    err = (o - t).abs().amax(dim=tuple(range(1, t.dim())))
    spacing = torch.finfo(x.dtype).tiny * out_eps  # the output dtype's subnormal spacing
    bound = tol * (t.abs().amax(dim=tuple(range(1, t.dim()))) + scale) + extra + spacing
    assert torch.isfinite(o).all() and (err <= bound).all(), f"{what}: error {err.max():.3g} > bound {bound.min():.3g}"


def _expect_clear_error_or(fn):
    """Run fn; a ValueError/TypeError with a message is an acceptable answer to a fuzzed input."""
    try:
        return fn()
    except (ValueError, TypeError) as e:
        assert str(e), "an error without a message"
        return None


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("op", ["denoise", "score", "flow", "trajectory"])
@FUZZ
@given(data=st.data())
def test_gaussian_ops_fuzz(backend, op, data, monkeypatch):
    D, B, g, g_true, x, x64, sig, sig64 = _draw_case(data, 40, gaussians, "gaussian", sigma_lo=1e-4)
    mu = g_true.mean.abs().max().item()
    if op in ("denoise", "score"):
        f = gk.gaussian_denoise if op == "denoise" else gk.gaussian_score
        out = _expect_clear_error_or(lambda: _run(backend, lambda b: f(x, sig, g, backend=b), monkeypatch))
        if out is None:
            return
        truth = f(x64, sig64, g_true, backend="reference")
        s2 = sig64.min().item() ** 2 if B else 1.0
        lam_min = min([g_true.residual_var] + g_true.eigvals.tolist()) if D else 0.0
        gain = 1.0 if op == "denoise" else 1.0 / (lam_min + s2)  # |score| <= |x - mu| / (lam_min + s^2)
        _check(out, truth, x, gain * (x64.abs().max().item() if B else 0.0) + gain * mu, f"gaussian_{op} {backend}")
    elif op == "flow":
        s_to, s_to64 = sigma_values(data.draw, B, lo=1e-4, hi=1e3)
        k_to = data.draw(st.sampled_from([1.0, 0.5]))
        out = _expect_clear_error_or(lambda: _run(backend, lambda b: gk.gaussian_flow(x, sig, s_to, g, scale_to=k_to, backend=b), monkeypatch))
        if out is None:
            return
        truth = gk.gaussian_flow(x64, sig64, s_to64, g_true, scale_to=k_to, backend="reference")
        ratio = max(1.0, (s_to64.max() / sig64.min()).item()) if B else 1.0  # an expanding jump amplifies x
        _check(out, truth, x, ratio * (x64.abs().max().item() if B else 0.0) + mu, f"gaussian_flow {backend}")
    else:
        T = data.draw(st.integers(1, 5))
        sigmas = sorted((math.exp(data.draw(st.floats(math.log(1e-3), math.log(1e3)))) for _ in range(T)), reverse=True)
        out = _expect_clear_error_or(lambda: _run(backend, lambda b: gk.gaussian_trajectory(x, sigmas, g, backend=b), monkeypatch))
        if out is None:
            return
        truth = gk.gaussian_trajectory(x64, torch.tensor(sigmas, dtype=torch.float64), g_true, backend="reference")
        _check(out.reshape(T * B, D), truth.reshape(T * B, D), x, (x64.abs().max().item() if B else 0.0) + mu,
               f"gaussian_trajectory {backend}")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("op", ["denoise", "score", "logp"])
@FUZZ
@given(data=st.data())
def test_mixture_ops_fuzz(backend, op, data, monkeypatch):
    D, B, m, m_true, x, x64, sig, sig64 = _draw_case(data, 24, mixtures, "mixture", sigma_lo=1e-3)
    f = {"denoise": gk.mixture_denoise, "score": gk.mixture_score, "logp": gk.mixture_logp}[op]
    out = _expect_clear_error_or(lambda: _run(backend, lambda b: f(x, sig, m, backend=b), monkeypatch))
    if out is None:
        return
    truth = f(x64, sig64, m_true, backend="reference")
    if B == 0:
        assert out.shape[0] == 0
        return
    spread = (m_true.means.abs().max() + x64.abs().max()).item()
    if op == "logp":
        # log-density: error ~ eps * |logits|, logits ~ |x - mu|^2 / (2 s^2)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = 1.0 + (spread**2 + D) / (sig64.min().item() ** 2)
        err = (out.double() - truth).abs()
        bound = 1e3 * COMPUTE_EPS[compute] * (truth.abs() + scale)
        assert (err <= bound).all(), f"mixture_logp {backend}: error {err.max():.3g}"
        return
    # weights may move by ~1e-3 in total variation on near ties (the accuracy target), which moves
    # the posterior mean by up to 1e-3 * spread
    gain = 1.0 if op == "denoise" else 1.0 / sig64.min().item() ** 2
    _check(out, truth, x, gain * spread, f"mixture_{op} {backend}", extra=1e-3 * gain * spread)
