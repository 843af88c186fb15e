"""The C++ CPU backend's internals (csrc/cpu): op registration (opcheck, torch.compile, clear
errors from C++), its caches of derived layouts, and its huge-page output buffers. Its results
against the reference, case by case, are the conformance suite's (tests/conformance)."""
import pytest
import torch

import gsa_kernels as gk
from gsa_kernels._core._contract import compute_dtype
from tests._helpers import orthonormal, requires_backend

pytestmark = requires_backend("cpu")


def make_gaussian(D, r, residual_var, seed=0):
    """A float32 GaussianModel with eigenvalues spread over 1e-3..10."""
    gen = torch.Generator().manual_seed(seed)
    basis = orthonormal(D, r, gen).float()
    eigvals = (10.0 ** (torch.rand(r, generator=gen) * 4 - 3)).float()
    mean = torch.randn(D, generator=gen).float()
    return gk.GaussianModel(mean, basis, eigvals, residual_var)


def make_mixture(K, D, r, residual_var, seed=0):
    """A float32 mixture with well separated means, eigenvalues in 0.01..3, random weights."""
    gen = torch.Generator().manual_seed(seed)
    bases = torch.stack([orthonormal(D, r, gen) for _ in range(K)]).float()
    eigvals = (torch.rand(K, r, generator=gen) * 3 + 0.01).float()
    means = (torch.randn(K, D, generator=gen) * 2).float()
    residual_vars = (torch.rand(K, generator=gen) * residual_var).float()
    return gk.GaussianMixture(means, bases, eigvals, residual_vars, torch.randn(K, generator=gen).float())


def near_points(m, B, spread, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, m.num_components, (B,), generator=gen)
    return (m.means[idx] + spread * torch.randn(B, m.dim, generator=gen)).to(dtype)


# ----------------------------------------------------------------------------- op level


def _gaussian_map_args(dtype=torch.float32, B=4, D=61, r=5):
    g = make_gaussian(D, r, 0.1).to(dtype=compute_dtype(dtype))
    cd = compute_dtype(dtype)
    rows = lambda v: torch.full((B,), v, dtype=cd)
    return [torch.randn(B, D).to(dtype), g.mean, g.basis, g.eigvals, 0.1, rows(0.5), rows(0.1), rows(1.0), rows(0.8), 2]


def _trajectory_args(dtype=torch.float32, B=3, D=61, r=5):
    g = make_gaussian(D, r, 0.1).to(dtype=compute_dtype(dtype))
    # finite start: out[0] of an infinite start is not finite (NaN != NaN would fail opcheck)
    sigmas = torch.tensor([[20.0] * B, [10.0] * B, [0.5] * B], dtype=compute_dtype(dtype))
    return [torch.randn(B, D).to(dtype), g.mean, g.basis, g.eigvals, 0.1, sigmas]


def _mixture_args(dtype=torch.float32, B=4, D=61, r=3, need_denoised=True, need_weights=True):
    m = make_mixture(5, D, r, 0.1).to(dtype=compute_dtype(dtype))
    x = near_points(m, B, 0.5, dtype)
    sigma = torch.full((B,), 0.3, dtype=compute_dtype(dtype))
    return [x, m.means, m.bases, m.eigvals, m.residual_var, m.log_weights, sigma, need_denoised, need_weights]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    ops = torch.ops.gsa_kernels
    torch.library.opcheck(ops.gaussian_map.default, _gaussian_map_args(dtype))
    torch.library.opcheck(ops.gaussian_trajectory.default, _trajectory_args(dtype))
    torch.library.opcheck(ops.mixture_posterior.default, _mixture_args(dtype))
    torch.library.opcheck(ops.mixture_posterior.default, _mixture_args(dtype, r=0, need_denoised=False, need_weights=False))


def _with(args, i, value):
    args = list(args)
    args[i] = value
    return args


@pytest.mark.parametrize(
    "op, make, index, bad, error, match",
    [
        ("gaussian_map", _gaussian_map_args, 0, torch.randn(4, 61, 2), ValueError, "x must be"),
        ("gaussian_map", _gaussian_map_args, 0, torch.randn(61, 4).t(), ValueError, "contiguous"),
        ("gaussian_map", _gaussian_map_args, 0, torch.randint(0, 3, (4, 61)), TypeError, "float16, bfloat16"),
        ("gaussian_map", _gaussian_map_args, 1, torch.randn(60), ValueError, "mean"),
        ("gaussian_map", _gaussian_map_args, 2, torch.randn(61, 5, dtype=torch.float64), TypeError, "basis"),
        ("gaussian_map", _gaussian_map_args, 2, torch.randn(5, 61).t(), ValueError, "contiguous"),
        ("gaussian_map", _gaussian_map_args, 3, torch.rand(4), ValueError, "eigvals"),
        ("gaussian_map", _gaussian_map_args, 4, -1.0, ValueError, "residual_var"),
        ("gaussian_map", _gaussian_map_args, 5, torch.ones(3), ValueError, "sigma_from"),
        ("gaussian_map", _gaussian_map_args, 9, 7, ValueError, "kind"),
        ("gaussian_trajectory", _trajectory_args, 5, torch.ones(3), ValueError, "sigmas"),
        ("gaussian_trajectory", _trajectory_args, 5, torch.ones(2, 5), ValueError, "sigmas"),
        ("mixture_posterior", _mixture_args, 1, torch.randn(5, 60), ValueError, "means"),
        ("mixture_posterior", _mixture_args, 2, torch.randn(5, 61, 2), ValueError, "eigvals"),
        ("mixture_posterior", _mixture_args, 4, torch.rand(5, dtype=torch.float64), TypeError, "residual_var"),
        ("mixture_posterior", _mixture_args, 5, torch.zeros(4), ValueError, "log_weights"),
        ("mixture_posterior", _mixture_args, 6, torch.ones(5), ValueError, "sigma"),
        ("mixture_posterior", _mixture_args, 0, torch.randn(61, 4).t(), ValueError, "contiguous"),
    ],
)
def test_clear_errors_from_cpp(op, make, index, bad, error, match):
    """Bad arguments straight to the compiled ops raise ValueError / TypeError, not a crash."""
    with pytest.raises(error, match=match):
        getattr(torch.ops.gsa_kernels, op)(*_with(make(), index, bad))


def test_torch_compile_fullgraph():
    g = make_gaussian(61, 7, 0.1)
    m = make_mixture(4, 61, 2, 0.1)

    def f(x, s):
        return gk.gaussian_denoise(x, s, g, backend="cpu") + gk.mixture_denoise(x, s, m, backend="cpu")

    x, s = torch.randn(3, 61), torch.tensor([0.1, 1.0, 10.0])
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, s), f(x, s))


def test_cached_transposed_basis_follows_in_place_edits():
    """The CPU kernels cache U^T per basis tensor; an in-place edit of the basis must miss."""
    D, r = 61, 6
    g = make_gaussian(D, r, residual_var=0.05)
    x = torch.randn(4, D)
    before = gk.gaussian_denoise(x, 0.3, g, backend="cpu")
    with torch.no_grad():
        g.basis.copy_(g.basis[:, torch.arange(r).roll(1)].clone())  # same span, eigvals now misassigned
    after = gk.gaussian_denoise(x, 0.3, g, backend="cpu")
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, gk.gaussian_denoise(x, 0.3, g, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("edit", ["means", "bases"])
def test_cached_component_panels_follow_in_place_edits(edit):
    """The mixture kernel caches its component panels per (means, bases); an in-place edit of
    either must miss, for both the forward (logits) and the backward (denoiser) panel."""
    m = make_mixture(5, 61, 3, 0.1)
    x = torch.randn(7, 61)
    before = gk.mixture_denoise(x, 0.5, m, backend="cpu", return_weights=True)
    with torch.no_grad():
        if edit == "means":
            m.means.copy_(m.means.roll(1, dims=0))
        else:
            m.bases.copy_(m.bases.roll(1, dims=0))
    after = gk.mixture_denoise(x, 0.5, m, backend="cpu", return_weights=True)
    ref = gk.mixture_denoise(x, 0.5, m, backend="reference", return_weights=True)
    assert not torch.allclose(before[0], after[0], atol=1e-3)
    for a, b in zip(after, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("write", ["in_place", "numpy"])
def test_constant_coordinates_hint_follows_edits(write):
    """The empirical kernel keeps the last points' constant coordinates as a hint and checks them
    against every point on each call: a point written to vary in one of them (in place, or
    through numpy, which no version counter sees) must be looked at again, not left out."""
    gen = torch.Generator().manual_seed(5)
    K, D, B = 300, 64, 64
    points = torch.randn(K, D, generator=gen)
    points[:, torch.arange(D) % 3 != 0] = 0.25  # 42 of 64 constant: B 64 takes the gathered form
    m = gk.GaussianMixture.from_points(points)
    x = m.means[torch.randint(0, K, (B,), generator=gen)] + 0.5 * torch.randn(B, D, generator=gen)
    x[:, 1] = 2.0
    before = gk.mixture_denoise(x, 0.5, m, backend="cpu")
    k = int(before.sub(m.means[:, None]).norm(dim=2).argmin(0)[0])  # row 0's nearest point
    if write == "numpy":
        m.means.numpy()[k, 1] = 2.0
    else:
        with torch.no_grad():
            m.means[k, 1] = 2.0
    after = gk.mixture_denoise(x, 0.5, m, backend="cpu")
    truth = gk.mixture_denoise(x.double(), 0.5, m.to(dtype=torch.float64), backend="reference")
    assert (after[0, 1] - before[0, 1]).abs() > 0.1  # the edit moved row 0's posterior
    torch.testing.assert_close(after.double(), truth, rtol=1e-4, atol=1e-5)


def test_large_outputs_reuse_freed_buffers_safely():
    """Outputs >= 32 MiB come from huge-page buffers that are reused once freed: the values stay
    right, a live output is never handed out again, and the result behaves as a normal tensor."""
    D, B, T = 8192, 256, 5  # 40 MiB of float32 trajectory
    g = make_gaussian(D, 4, residual_var=0.05)
    x = torch.randn(B, D) * 3
    sigmas = torch.tensor([3.0, 1.0, 0.3, 0.1, 0.03])[:, None].expand(T, B).contiguous()
    ref = gk.gaussian_trajectory(x.double(), sigmas.double(), g.to("cpu", torch.float64), backend="reference")

    first = gk.gaussian_trajectory(x, sigmas, g, backend="cpu")
    ptr = first.data_ptr()
    torch.testing.assert_close(first.double(), ref, rtol=1e-4, atol=1e-4)
    first.fill_(float("nan"))  # stale contents must be overwritten on reuse
    del first
    second = gk.gaussian_trajectory(x, sigmas, g, backend="cpu")
    assert second.data_ptr() == ptr  # the freed buffer was reused
    third = gk.gaussian_trajectory(x, sigmas, g, backend="cpu")
    assert third.data_ptr() != second.data_ptr()  # a live one never is
    for out in (second, third):
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    second.resize_(T + 1, B, D)  # storage grows through the default allocator
    torch.testing.assert_close(second[:T].double(), ref, rtol=1e-4, atol=1e-4)


def test_cached_mean_projection_follows_in_place_edits():
    """Denoising caches U^T mu per (basis, mean); an in-place edit of the mean must miss."""
    g = make_gaussian(61, 6, residual_var=0.05)
    x = torch.randn(4, 61)
    before = gk.gaussian_denoise(x, 0.3, g, backend="cpu")
    with torch.no_grad():
        g.mean.add_(1.0)
    after = gk.gaussian_denoise(x, 0.3, g, backend="cpu")
    assert not torch.allclose(before, after, atol=1e-2)
    torch.testing.assert_close(after, gk.gaussian_denoise(x, 0.3, g, backend="reference"), rtol=1e-5, atol=1e-5)


def test_flush_denormal_reaches_every_intra_op_thread():
    """The benchmarks' eager baselines get denormals flushed in the whole intra-op pool
    (torch.set_flush_denormal reaches the calling thread only)."""
    flush = torch.ops.gsa_kernels._set_flush_denormal_all_threads
    x = torch.full((1 << 22,), 1e-39)  # a float32 denormal, enough elements for every thread
    try:
        assert flush(True)
        assert torch.count_nonzero(x * 1.0) == 0
    finally:
        flush(False)
    assert torch.equal(x * 1.0, x)


@requires_backend("cpu")
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_forced_dense_or_sparse_forms_meet_the_conformance_bounds(mode, monkeypatch):
    """GSA_KERNELS_DENSE forces the low-rank mixture kernel's sparse / dense forms one way (the
    refinement: per component or one float64 GEMM, chosen by measured costs; the back-projection:
    one GEMM, or an axpy per nonzero weight), so both meet the conformance bounds on any host:
    the cases near the switch points (sigma, dense posteriors, ties, few queries)."""
    from tests.conformance import harness
    from tests.conformance.cases import CASES

    monkeypatch.setenv("GSA_KERNELS_DENSE", mode)
    run = harness.kernel("cpu", "mixture_posterior")
    cases = [c for c in CASES["mixture_posterior"][0] if c.family in ("sigma", "dense", "split", "tie")]
    assert any(c.family == "split" for c in cases) and any(c.family == "dense" and c.r > 0 for c in cases)
    for case in cases:
        args64 = CASES["mixture_posterior"][1](case)
        args = harness.cast(args64, case.dtype)
        args64 = harness.as_f64(args)
        den, logp1, w_empty = run(*args, True, False)
        den_empty, logp2, weights = run(*args, False, True)
        harness.check_mixture(den, logp1, w_empty, den_empty, logp2, weights, args, args64, case.dtype,
                              f"{mode}: {case.id}", weights_tv=case.extra.get("weights_tv"))


@requires_backend("cpu")
def test_few_query_parts_of_several_chunks_meet_the_conformance_bounds():
    """The few-query split on one thread: 4 parts of the 7 chunks of K 301 at D 1046, so a part
    streams 2 chunks and the back-projection rescales what the first left when a row's max moves
    (the conformance run's threads may give every chunk its own part: no rescale to check)."""
    from tests.conformance import harness
    from tests.conformance.cases import CASES

    run = harness.kernel("cpu", "mixture_posterior")
    cases = [c for c in CASES["mixture_posterior"][0] if c.family == "split" and "D1046_r0_K301_s0.3" in c.id]
    assert len(cases) == 3  # B 1, 13, 6
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in cases:
            args = harness.cast(CASES["mixture_posterior"][1](case), case.dtype)
            den, logp1, w_empty = run(*args, True, False)
            den_empty, logp2, weights = run(*args, False, True)
            harness.check_mixture(den, logp1, w_empty, den_empty, logp2, weights, args, harness.as_f64(args), case.dtype,
                                  f"one thread: {case.id}", weights_tv=case.extra.get("weights_tv"))
    finally:
        torch.set_num_threads(before)


@requires_backend("cpu")
def test_bad_dense_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GSA_KERNELS_DENSE", "sometimes")
    with pytest.raises(ValueError, match="GSA_KERNELS_DENSE must be auto, dense or sparse"):
        torch.ops.gsa_kernels.mixture_posterior(*_mixture_args(r=3))
