"""Gradients of every public op (gsa_kernels/_core/_autograd.py) on every backend.

- torch.autograd.gradcheck in float64 for every op x differentiable argument x backend
  (reference, cpu, cuda through the SIMT emulation, triton through the interpreter);
- float32 gradients against the float64 ones;
- a sample of teleport + Heun differentiated w.r.t. its initial noise (against finite differences);
- gradient ascent on mixture_logp recovering a known 3-component mixture;
- torch.compile(fullgraph=True) of a forward + backward; clear errors for inputs with no gradient.

The triton cases need TRITON_INTERPRET=1 before triton's kernels are imported, so (as in
tests/test_triton_backend.py) test_triton_interpreter re-runs this module's triton cases in a
subprocess with it set. Model tensors are cloned inside each differentiated function: gradcheck
perturbs its inputs in place through .data (no version bump), which the CPU kernels' layout cache
(keyed by tensor identity and version) would not see.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

import gsa_kernels as gk
from tests._helpers import backend_param, orthonormal, rerun_under_interpreter

F64 = torch.float64


BACKENDS = [backend_param(b) for b in ("reference", "cpu", "cuda", "triton")]


@pytest.fixture(autouse=True)
def _emulate(monkeypatch):
    monkeypatch.setenv("GSA_KERNELS_CUDA_EMULATE", "1")  # read at call time; "auto" never picks it


# ----------------------------------------------------------------------------- models


def gaussian_tensors(D=6, r=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(D, dtype=F64, generator=gen), orthonormal(D, r, gen), torch.rand(r, dtype=F64, generator=gen) * 2 + 0.1


def mixture_tensors(K=3, D=6, r=2, seed=0):
    """means, bases, eigvals, residual_var, log_weights; r = 0 gives a delta-like isotropic mixture."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, dtype=F64, generator=gen) * 0.8
    bases = torch.stack([orthonormal(D, r, gen) for _ in range(K)]) if r else torch.zeros(K, D, 0, dtype=F64)
    eigvals = torch.rand(K, r, dtype=F64, generator=gen) * 2 + 0.1
    lp = torch.rand(K, dtype=F64, generator=gen) * 0.5 + 0.05
    return means, bases, eigvals, lp, torch.randn(K, dtype=F64, generator=gen)


B, D = 3, 6
SIGMA = torch.tensor([0.4, 1.0, 2.5], dtype=F64)  # per-row, where the posteriors are not one-hot
GAUSSIAN_OPS = {
    "denoise": lambda x, g, be: gk.gaussian_denoise(x, SIGMA, g, backend=be),
    "score": lambda x, g, be: gk.gaussian_score(x, SIGMA, g, backend=be),
    "flow": lambda x, g, be: gk.gaussian_flow(x, SIGMA, SIGMA * 0.3, g, scale_from=1.3, scale_to=0.7, backend=be),
    "flow_to_zero": lambda x, g, be: gk.gaussian_flow(x, 1.5, 0.0, g, backend=be),
    "flow_from_noise": lambda x, g, be: gk.gaussian_flow(x, math.inf, SIGMA, g, scale_to=0.8, backend=be),
    "trajectory": lambda x, g, be: gk.gaussian_trajectory(x, torch.tensor([2.0, 0.7, 0.1, 0.0], dtype=F64), g, backend=be),
}
MIXTURE_OPS = {
    "denoise": lambda x, m, be: gk.mixture_denoise(x, SIGMA, m, backend=be),
    "weights": lambda x, m, be: gk.mixture_denoise(x, SIGMA, m, return_weights=True, backend=be)[1],
    "score": lambda x, m, be: gk.mixture_score(x, SIGMA, m, backend=be),
    "logp": lambda x, m, be: gk.mixture_logp(x, SIGMA, m, backend=be),
}
GAUSSIAN_ARGS = ("x", "mean", "eigvals")
MIXTURE_ARGS = ("x", "means", "eigvals", "residual_var", "log_weights")


def _gaussian_case(op, arg, backend, r=3, dtype=F64):
    """(f, input) with f(input) the op's output as a function of the argument `arg` only."""
    mean, basis, eigvals = gaussian_tensors(D, r)
    x = torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(1)) * 1.5
    values = {"x": x, "mean": mean, "eigvals": eigvals}
    values = {k: v.to(dtype) for k, v in values.items()}

    def f(t):
        v = dict(values, **{arg: t})
        g = gk.GaussianModel(v["mean"].clone(), basis.to(dtype), v["eigvals"].clone(), 0.3)
        return GAUSSIAN_OPS[op](v["x"], g, backend)

    return f, values[arg].clone().requires_grad_()


def _mixture_case(op, arg, backend, r=2, dtype=F64):
    means, bases, eigvals, lp, logw = mixture_tensors(3, D, r)
    x = torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(1))
    values = {"x": x, "means": means, "eigvals": eigvals, "residual_var": lp, "log_weights": logw}
    values = {k: v.to(dtype) for k, v in values.items()}

    def f(t):
        v = dict(values, **{arg: t})
        m = gk.GaussianMixture(v["means"].clone(), bases.to(dtype), v["eigvals"].clone(), v["residual_var"].clone(),
                               v["log_weights"].clone())
        return MIXTURE_OPS[op](v["x"], m, backend)

    return f, values[arg].clone().requires_grad_()


# ----------------------------------------------------------------------------- gradcheck


# (family, op, arg, r): the op's output as a function of one argument, model of rank r
CASES = [("gaussian", op, arg, 3) for op in GAUSSIAN_OPS for arg in GAUSSIAN_ARGS]
CASES += [("mixture", op, arg, 2) for op in MIXTURE_OPS for arg in MIXTURE_ARGS]
GRADCHECK_CASES = CASES + [
    # r = D: the kernels' full-basis form of the spectral map
    *[("gaussian", "score", arg, D) for arg in GAUSSIAN_ARGS],
    # r = 0: the empirical-mixture path of the kernels (here with residual variances)
    *[("mixture", op, arg, 0) for op in ("denoise", "logp") for arg in ("x", "means", "residual_var", "log_weights")],
]


def _case(family, op, arg, r, backend, dtype=F64):
    make = _gaussian_case if family == "gaussian" else _mixture_case
    return make(op, arg, backend, r=r, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,op,arg,r", GRADCHECK_CASES)
def test_gradcheck(family, op, arg, r, backend):
    f, t = _case(family, op, arg, r, backend)
    assert gradcheck(f, (t,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg", ["x", "means", "eigvals"])
def test_gradcheck_one_hot_rows(arg, backend):
    """Rows whose posterior is exactly one component (the others > 50 logits below): there
    a_k = 0 and the whole gradient is w_k A_k gD (kernels must not skip its back-projection)."""
    means, bases, eigvals, lp, logw = mixture_tensors(3, D, 2)
    means = means * 12
    x = means + 0.1 * torch.randn(3, D, dtype=F64, generator=torch.Generator().manual_seed(5))
    values = {"x": x, "means": means, "eigvals": eigvals}
    sigma = torch.tensor([0.3, 0.5, 0.2], dtype=F64)

    def f(t):
        v = dict(values, **{arg: t})
        m = gk.GaussianMixture(v["means"].clone(), bases, v["eigvals"].clone(), lp, logw)
        return gk.mixture_denoise(v["x"], sigma, m, backend=backend)

    _, w = gk.mixture_denoise(x, sigma, gk.GaussianMixture(means, bases, eigvals, lp, logw), return_weights=True)
    assert ((w == 0) | (w == 1)).all()
    assert gradcheck(f, (values[arg].clone().requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg", ["x", "points", "log_weights"])
@pytest.mark.parametrize("op", ["denoise", "logp"])
def test_gradcheck_delta_mixture(op, arg, backend):
    """The empirical mixture of 40 points at small sigma: each row's posterior sits on a few
    points (the CPU kernels' sparse path: dot products and axpys instead of GEMMs)."""
    gen = torch.Generator().manual_seed(4)
    points = torch.randn(40, D, dtype=F64, generator=gen)
    x = points[:B] + 0.05 * torch.randn(B, D, dtype=F64, generator=gen)
    values = {"x": x, "points": points, "log_weights": torch.randn(40, dtype=F64, generator=gen)}
    sigma = torch.tensor([0.08, 0.1, 0.12], dtype=F64)

    def f(t):
        v = dict(values, **{arg: t})
        m = gk.GaussianMixture.from_points(v["points"].clone(), v["log_weights"].clone())
        if op == "logp":
            return gk.mixture_logp(v["x"], sigma, m, backend=backend)
        return gk.mixture_denoise(v["x"], sigma, m, backend=backend)

    assert gradcheck(f, (values[arg].clone().requires_grad_(),), fast_mode=True)


# ----------------------------------------------------------------------------- labelled (class-conditional)

LABELS = torch.tensor([2, 0, 2])  # component 1 unused: its gradients are 0
LABELED_OPS = {
    "denoise": lambda x, m, be: gk.gaussian_denoise(x, SIGMA, m, backend=be, labels=LABELS),
    "score": lambda x, m, be: gk.gaussian_score(x, SIGMA, m, backend=be, labels=LABELS),
    "flow": lambda x, m, be: gk.gaussian_flow(x, SIGMA, SIGMA * 0.3, m, scale_from=1.3, scale_to=0.7, backend=be,
                                              labels=LABELS),
    "flow_from_noise": lambda x, m, be: gk.gaussian_flow(x, math.inf, SIGMA, m, scale_to=0.8, backend=be, labels=LABELS),
    "trajectory": lambda x, m, be: gk.gaussian_trajectory(x, torch.tensor([2.0, 0.7, 0.1, 0.0], dtype=F64), m, backend=be,
                                                          labels=LABELS),
}


def _labeled_case(op, backend, r=2):
    """(f, inputs) with f(x, means, eigvals, residual_var) the op's output: all four differentiated
    at once (one gradcheck per op keeps the interpreted triton run short)."""
    means, bases, eigvals, lp, _ = mixture_tensors(3, D, r)
    x = torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(1)) * 1.5

    def f(x, means, eigvals, residual_var):
        m = gk.GaussianMixture(means.clone(), bases, eigvals.clone(), residual_var.clone())
        return LABELED_OPS[op](x, m, backend)

    return f, tuple(t.clone().requires_grad_() for t in (x, means, eigvals, lp))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LABELED_OPS)
def test_gradcheck_labeled(op, backend):
    """x, means, eigvals and residual_var of the labelled ops (component 1 unused: zero gradients)."""
    f, inputs = _labeled_case(op, backend)
    assert gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_labeled_full_rank(backend):
    """r = D: no residual directions (the residual_var gradient is 0)."""
    f, inputs = _labeled_case("score", backend, r=D)
    assert gradcheck(f, inputs, fast_mode=True)


# ----------------------------------------------------------------------------- float32


def _grad(f, t, seed=2):
    t = t.detach().clone().requires_grad_()
    out = f(t)
    v = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (grad,) = torch.autograd.grad((out * v).sum(), t)
    return grad


# float32 gradients against float64: relative to the largest float64 gradient entry. The
def _stable_score_case(arg, backend, dtype=F64):
    """mixture_score where (D - x) / sigma^2 cancels (x near the components' data, sigma 0.05,
    residual variances >> sigma^2): the rows take sum_k w_k s_k (ops.stable_score). Returns
    (f, input, x, mixture)."""
    means, bases, eigvals, lp, logw = mixture_tensors(3, D, 2)
    means = means + 4.0  # |x| ~ 10, |D - x| ~ sigma^2 |y| / residual_var
    x = means + 0.3 * torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(2))
    values = {k: v.to(dtype) for k, v in {"x": x, "means": means, "eigvals": eigvals, "residual_var": lp,
                                          "log_weights": logw}.items()}

    def f(t):
        v = dict(values, **{arg: t})
        m = gk.GaussianMixture(v["means"].clone(), bases.to(dtype), v["eigvals"].clone(), v["residual_var"].clone(),
                               v["log_weights"].clone())
        return gk.mixture_score(v["x"], 0.05, m, backend=backend)

    return f, values[arg].clone().requires_grad_(), x, gk.GaussianMixture(means, bases, eigvals, lp, logw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg", MIXTURE_ARGS)
def test_gradcheck_stable_score_rows(arg, backend):
    """The corrected rows' gradient is that of sum_k w_k s_k (the weights through the posterior op,
    s_k through the labelled Gaussian op): gradcheck in float64, every differentiable argument."""
    from gsa_kernels import ops

    f, t, x, m = _stable_score_case(arg, backend)
    den = gk.mixture_denoise(x, 0.05, m, backend=backend)
    assert (2**ops.CANCELLATION_BITS * (den - x).norm(dim=1) < x.norm(dim=1)).all()  # every row corrected
    assert gradcheck(f, (t,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stable_score_float64_fallback_gradient(backend, monkeypatch):
    """Past the pairs cap (here 0) a float32 row is recomputed in float64; its gradient w.r.t. x
    (through the casts) matches the float64 one of the pairs form."""
    from gsa_kernels import ops

    f64, t64, _, _ = _stable_score_case("x", backend)
    want = _grad(f64, t64)
    monkeypatch.setattr(ops, "PAIRS_PER_ROW", 0)
    f32, t32, _, _ = _stable_score_case("x", backend, dtype=torch.float32)
    got = _grad(f32, t32)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= F32_TOL * want.abs().max()


# backward passes are one or two float32 GEMMs over D <= 6 terms after a float32 forward,
# plus the cancellation of a_k (w_k times differences of O(1) terms): 1e-5 leaves ~10x margin.
F32_TOL = 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,op,arg,r", CASES)
def test_float32(family, op, arg, r, backend):
    f64, t64 = _case(family, op, arg, r, backend)
    f32, t32 = _case(family, op, arg, r, backend, dtype=torch.float32)
    want, got = _grad(f64, t64), _grad(f32, t32)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= F32_TOL * want.abs().max()


# ----------------------------------------------------------------------------- uses


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_gradient_wrt_initial_noise(backend):
    """Teleport (the closed-form flow from sigma_max) + Heun through a mixture denoiser,
    differentiated w.r.t. the initial noise: gradcheck's finite differences in float64."""
    means, bases, eigvals, lp, logw = mixture_tensors(3, D, 2)
    m = gk.GaussianMixture(means, bases, eigvals, lp, logw)
    g = gk.sampling.gaussian_approximation(m)
    sigmas = gk.schedules.karras(6, sigma_min=0.05, sigma_max=20.0)

    def denoiser(x, sigma):
        return gk.mixture_denoise(x, sigma, m, backend=backend)

    def run(eps):
        res = gk.sampling.sample(denoiser, eps * 20.0, sigmas, "heun", skip_fraction=0.3, gaussian=g)
        assert res.teleport is not None
        return res.x

    eps = torch.randn(2, D, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    assert gradcheck(run, (eps,), fast_mode=True)


def test_gradient_ascent_recovers_mixture():
    """Maximum likelihood by gradient ascent on mixture_logp: 3 components in D = 2 with a rank-1
    basis along the first axis (eigvals along it, residual_var across), known weights."""
    gen = torch.Generator().manual_seed(0)
    true_means = torch.tensor([[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], dtype=F64)
    true_lam = torch.tensor([[1.0], [0.3], [2.0]], dtype=F64)
    true_lp = torch.tensor([0.2, 0.6, 0.1], dtype=F64)
    true_w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    N = 2000
    comp = torch.multinomial(true_w, N, replacement=True, generator=gen)
    noise = torch.randn(N, 2, dtype=F64, generator=gen)
    data = true_means[comp] + noise * torch.stack([true_lam[comp, 0], true_lp[comp]], 1).sqrt()
    bases = torch.tensor([[1.0], [0.0]], dtype=F64).expand(3, 2, 1)

    means = (true_means + torch.tensor([[1.0, -0.8], [-0.7, 0.9], [0.8, 0.8]], dtype=F64)).requires_grad_()
    log_lam = torch.zeros(3, 1, dtype=F64, requires_grad=True)
    log_lp = torch.zeros(3, dtype=F64, requires_grad=True)
    logits = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([means, log_lam, log_lp, logits], lr=0.08)
    sigma = 1e-3  # the noised model at sigma: variances lam + sigma^2, negligible here
    for _ in range(200):
        m = gk.GaussianMixture(means, bases, log_lam.exp(), log_lp.exp(), logits, _validate=False)
        loss = -gk.mixture_logp(data, sigma, m).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(means.detach(), true_means, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.softmax(logits.detach(), 0), true_w, atol=0.03, rtol=0)
    torch.testing.assert_close(log_lam.detach().exp(), true_lam, atol=0, rtol=0.15)
    torch.testing.assert_close(log_lp.detach().exp(), true_lp, atol=0, rtol=0.15)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in ("cpu", "triton")])
def test_compile_forward_and_backward(backend):
    """torch.compile(fullgraph=True) traces the ops and their backward formulas (AOTAutograd's
    joint graph; the aot_eager backend skips Inductor's C++ code generation, minutes here)."""
    torch._dynamo.reset()
    mean, basis, eigvals = gaussian_tensors(D, 3)
    means, bases, mix_eig, lp, logw = mixture_tensors(3, D, 2)
    means.requires_grad_()
    x = torch.randn(B, D, dtype=F64, requires_grad=True)
    g = gk.GaussianModel(mean, basis, eigvals, 0.3)
    m = gk.GaussianMixture(means, bases, mix_eig, lp, logw)

    def loss(x):
        y = gk.gaussian_flow(x, math.inf, 2.0, g, backend=backend)
        return gk.mixture_logp(y, 0.7, m, backend=backend).sum() + gk.mixture_denoise(y, 0.7, m, backend=backend).square().sum()

    want = torch.autograd.grad(loss(x), (x, m.means))
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(x), (x, m.means))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_without_gradient_raise(backend):
    mean, basis, eigvals = gaussian_tensors(D, 3)
    x = torch.randn(B, D, dtype=F64)
    g = gk.GaussianModel(mean, basis.clone().requires_grad_(), eigvals, 0.3)
    with pytest.raises(RuntimeError, match="basis requires grad"):
        gk.gaussian_denoise(x, 1.0, g, backend=backend)
    g = gk.GaussianModel(mean, basis, eigvals, 0.3)
    s = torch.tensor(1.0, dtype=F64, requires_grad=True)
    for call, name in ((lambda: gk.gaussian_score(x, s, g, backend=backend), "sigma"),
                       (lambda: gk.gaussian_flow(x, 2.0, s, g, backend=backend), "sigma_to"),
                       (lambda: gk.gaussian_flow(x, 2.0, 1.0, g, scale_to=s, backend=backend), "scale_to"),
                       (lambda: gk.gaussian_trajectory(x, torch.stack([2 * s, s]), g, backend=backend), "sigmas")):
        with pytest.raises(RuntimeError, match=f"{name} requires grad"):
            call()
    means, bases, eig, lp, logw = mixture_tensors(3, D, 2)
    m = gk.GaussianMixture(means, bases.clone().requires_grad_(), eig, lp, logw)
    with pytest.raises(RuntimeError, match="bases requires grad"):
        gk.mixture_logp(x, 1.0, m, backend=backend)
    with pytest.raises(RuntimeError, match="sigma requires grad"):
        gk.mixture_score(x, s, gk.GaussianMixture(means, bases, eig, lp, logw), backend=backend)
    with torch.no_grad():  # no graph is built: nothing to refuse
        gk.mixture_logp(x, s, m, backend=backend)
    labels = torch.tensor([0, 2, 1])
    with pytest.raises(RuntimeError, match="bases requires grad"):
        gk.gaussian_denoise(x, 1.0, m, backend=backend, labels=labels)
    with pytest.raises(RuntimeError, match="sigmas requires grad"):
        gk.gaussian_trajectory(x, torch.stack([2 * s, s]), gk.GaussianMixture(means, bases, eig, lp), backend=backend,
                               labels=labels)


def test_kernel_level_op_names_the_input():
    if "cpu" not in gk.available_backends():
        pytest.skip("cpu backend not built")
    mean, basis, eigvals = gaussian_tensors(D, 3)
    x = torch.randn(B, D, dtype=F64)
    ones = torch.ones(B, dtype=F64)
    with pytest.raises(RuntimeError, match="gsa_kernels::gaussian_map: sigma_to requires grad"):
        torch.ops.gsa_kernels.gaussian_map(x, mean, basis, eigvals, 0.3, ones, ones.clone().requires_grad_(), ones, ones, 2)


def test_gaussian_residual_var_has_no_gradient():
    mean, basis, eigvals = gaussian_tensors(D, 3)
    with pytest.raises(TypeError, match="one-component GaussianMixture"):
        gk.GaussianModel(mean, basis, eigvals, torch.tensor(0.3, requires_grad=True))


# ----------------------------------------------------------------------------- triton


def test_triton_interpreter():
    """This module's triton cases, in a subprocess with TRITON_INTERPRET=1."""
    print(rerun_under_interpreter(__file__, "-k", "triton"))


def test_readme_gradient_example():
    """The README's gradient example runs as written, and its claim x.grad == score holds."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Gradients\n.*?```python\n(.*?)```", readme, re.S).group(1)
    ns = {}
    exec(compile(block, "README.md (gradients)", "exec"), ns)
    x, m = ns["x"], ns["m"]
    torch.testing.assert_close(x.grad, gk.mixture_score(x.detach(), 2.0, m), rtol=1e-4, atol=1e-5)
    assert ns["eps"].grad is not None and torch.isfinite(ns["loss"])
