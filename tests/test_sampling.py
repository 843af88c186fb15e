"""Samplers and analytical teleportation against closed forms and independent ODE integration.

All in float64 on the reference-capable CPU path, small D: the errors measured here are the
samplers' discretisation errors, not floating-point noise.
"""
import math

import pytest
import torch
from scipy.integrate import solve_ivp

import gsa_kernels as gk
from gsa_kernels import sampling, schedules

F64 = torch.float64
METHODS = ["euler", "heun", "dpmpp_2m"]


def make_gaussian(D=32, r=8, seed=0, top=25.0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, r, dtype=F64, generator=g))
    eigvals = torch.logspace(math.log10(top), -1, r, dtype=F64)  # 25 .. 0.1: structure matters at sigma ~ 5
    return gk.GaussianModel(torch.randn(D, dtype=F64, generator=g), U, eigvals, 0.01)


def make_mixture(K=5, D=32, r=4, sep=12.0, seed=0):
    """K well-separated low-rank components: means on a sphere of radius sep."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, dtype=F64, generator=g)
    means = sep * means / means.norm(dim=1, keepdim=True)
    bases = torch.linalg.qr(torch.randn(K, D, r, dtype=F64, generator=g))[0]
    eigvals = 0.2 + 2.0 * torch.rand(K, r, dtype=F64, generator=g)
    residual_var = torch.linspace(0.005, 0.05, K, dtype=F64)  # unequal: the moment match must weight them
    return gk.GaussianMixture(means, bases, eigvals, residual_var, torch.randn(K, dtype=F64, generator=g))


def max_err(a, b):
    return (a - b).reshape(a.shape[0], -1).norm(dim=1).max().item()


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("method", METHODS)
def test_samplers_converge_at_their_order(method):
    # Independent of any other implementation: the error against the closed-form ODE end point
    # must fall by 2^order when the number of steps doubles (euler 1, heun and dpmpp_2m 2).
    g = make_gaussian()
    x = 80.0 * torch.randn(8, g.dim, dtype=F64)
    exact = gk.gaussian_flow(x, 80.0, 0.0, g)
    errs = [max_err(sampling.SAMPLERS[method](g, x, schedules.karras(n)), exact) for n in (32, 64, 128)]
    order = math.log2(errs[1] / errs[2])
    want = 1 if method == "euler" else 2
    assert want - 0.3 < order < want + 0.6, (errs, order)


def test_heun_is_edm_algorithm_1():
    # one step written out by hand: Euler predictor, trapezoidal corrector; none on the step to 0
    g = make_gaussian(D=8, r=2)
    x = 3.0 * torch.randn(2, 8, dtype=F64)
    s0, s1 = 3.0, 1.5
    d0 = (x - g(x, s0)) / s0
    xe = x + (s1 - s0) * d0
    want = x + (s1 - s0) * 0.5 * (d0 + (xe - g(xe, s1)) / s1)
    torch.testing.assert_close(sampling.heun(g, x, [s0, s1]), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(sampling.heun(g, x, [s0, 0.0]), g(x, s0), rtol=1e-14, atol=1e-14)


def test_dpmpp_2m_step_by_hand():
    # second step of DPM-Solver++(2M): x1 = (s2/s1) x - expm1(-h) (D1 + (D1 - D0) / (2 r)), r = h_prev / h
    g = make_gaussian(D=8, r=2)
    x = 5.0 * torch.randn(2, 8, dtype=F64)
    s = [5.0, 2.0, 0.7]
    d0 = g(x, s[0])
    x1 = (s[1] / s[0]) * x + (1 - s[1] / s[0]) * d0
    d1 = g(x1, s[1])
    h, h_prev = math.log(s[1] / s[2]), math.log(s[0] / s[1])
    r = h_prev / h
    want = (s[2] / s[1]) * x1 + (1 - s[2] / s[1]) * (d1 + (d1 - d0) / (2 * r))
    torch.testing.assert_close(sampling.dpmpp_2m(g, x, s), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("last", [0.0, 0.01])
def test_nfe_counts_and_sigma_argument(method, last):
    g = make_gaussian(D=8, r=2)
    seen = []

    def denoiser(x, sigma):
        seen.append(sigma)
        return g(x, sigma)

    sigmas = torch.cat([schedules.karras(6, sigma_min=0.05)[:-1], torch.tensor([last], dtype=F64)])
    x = torch.randn(3, 2, 4, dtype=torch.float32) * 80  # [B, *shape] with float32 x
    counted = sampling.CountingDenoiser(denoiser)
    out = sampling.SAMPLERS[method](counted, x, sigmas)
    assert out.shape == x.shape and out.dtype == x.dtype
    want = {"euler": 6, "dpmpp_2m": 6, "heun": 11 if last == 0 else 12}[method]
    assert counted.nfe == len(seen) == want == sampling.expected_nfe(method, sigmas)
    # the documented convention: sigma is a [B] tensor on x's device, float32 for float32 x
    assert all(s.shape == (3,) and s.dtype == torch.float32 and s.device == x.device for s in seen)
    assert all(float(s[0]) > 0 for s in seen)


def test_sampler_rejects_bad_schedules():
    g = make_gaussian(D=8, r=2)
    x = torch.randn(2, 8, dtype=F64)
    for bad in ([1.0, 2.0], [1.0, 1.0, 0.0], [1.0, -0.5], [float("nan"), 0.0], [[1.0, 0.0]]):
        with pytest.raises(ValueError):
            sampling.heun(g, x, bad)
    torch.testing.assert_close(sampling.euler(g, x, [1.0]), x)  # no steps: x unchanged


# ----------------------------------------------------------------------------- teleport alone


def ode_solution(g, x, s_from, s_to):
    """Independent fine integration (scipy DOP853) of dx/ds = (x - D(x, s)) / s."""
    shape = x.shape

    def rhs(s, y):
        xt = torch.from_numpy(y).reshape(shape)
        return ((xt - g(xt, s)) / s).reshape(-1).numpy()

    sol = solve_ivp(rhs, (s_from, s_to), x.reshape(-1).numpy(), method="DOP853", rtol=1e-11, atol=1e-11)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


@pytest.mark.parametrize("s_from,s_to", [(80.0, 10.0), (80.0, 1.0), (20.0, 0.05)])
def test_teleport_matches_fine_ode_integration(s_from, s_to):
    g = make_gaussian(D=16, r=4)
    x = g.sample(4) + s_from * torch.randn(4, 16, dtype=F64)
    want = ode_solution(g, x, s_from, s_to)
    got = sampling.teleport(x, s_from, s_to, g)
    # tolerance: the integrator's rtol 1e-11 accumulated over |x| ~ 80
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    # a jump that ignores the data (pure-noise rescaling x * s_to / s_from) is detected
    assert max_err(x * (s_to / s_from), want) > 1e3 * 1e-8


def test_teleport_scaled_states_match_rectified_flow_ode():
    # Rectified flow x_t = (1 - t) x0 + t eps integrated in t with velocity eps_hat - x0_hat,
    # independently of the EDM form; teleport with the (scale, sigma) pairs must agree.
    g = make_gaussian(D=16, r=4)
    t_a, t_b = 0.95, 0.3
    (scale_from, sigma_from), (scale_to, sigma_to) = schedules.from_flow_t(t_a), schedules.from_flow_t(t_b)
    x = (1 - t_a) * g.sample(4) + t_a * torch.randn(4, 16, dtype=F64)

    def velocity(t, y):
        xt = torch.from_numpy(y).reshape(4, 16)
        x0 = g(xt / (1 - t), t / (1 - t))
        eps = (xt - (1 - t) * x0) / t
        return (eps - x0).reshape(-1).numpy()

    sol = solve_ivp(velocity, (t_a, t_b), x.reshape(-1).numpy(), method="DOP853", rtol=1e-11, atol=1e-11)
    want = torch.from_numpy(sol.y[:, -1]).reshape(4, 16)
    got = sampling.teleport(x, sigma_from, sigma_to, g, scale_from=scale_from, scale_to=scale_to)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    # skipping the scale conversion (treating the RF state as an EDM state) is detected
    assert max_err(sampling.teleport(x, sigma_from, sigma_to, g), want) > 1e-2


def test_teleport_from_unit_noise_is_the_large_sigma_limit():
    g = make_gaussian(D=16, r=4)
    eps = torch.randn(4, 16, dtype=F64)
    big = 1e6
    # x = big * eps at sigma = big differs from unit noise by the data term mean / big ~ 1e-6
    torch.testing.assert_close(sampling.teleport(eps, math.inf, 2.0, g), sampling.teleport(big * eps, big, 2.0, g),
                               rtol=0, atol=1e-5)
    # per-sample targets and the VP scale: x_vp = x_ve / sqrt(1 + sigma^2)
    to = torch.tensor([5.0, 1.0, 0.5, 0.0], dtype=F64)
    ve = sampling.teleport(eps, math.inf, to, g)
    vp = sampling.teleport(eps, math.inf, to, g, scale_to=schedules.to_alphas_cumprod(to).sqrt())
    torch.testing.assert_close(vp, ve / (1 + to**2).sqrt()[:, None], rtol=1e-13, atol=1e-13)


def test_teleport_type_errors():
    m = make_mixture()
    with pytest.raises(TypeError, match="gaussian_approximation"):
        sampling.teleport(torch.randn(2, m.dim, dtype=F64), 80.0, 1.0, m)


# ----------------------------------------------------------------------------- teleport + sampler


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("skip", [0.2, 0.4])
def test_teleport_then_sampler_matches_closed_form(method, skip):
    g = make_gaussian()
    x = 80.0 * torch.randn(16, g.dim, dtype=F64)
    exact = gk.gaussian_flow(x, 80.0, 0.0, g)
    n = 24
    sigmas = schedules.karras(n)
    full = sampling.sample(g, x, sigmas, method)
    tele = sampling.sample(g, x, sigmas, method, skip_fraction=skip)
    k = schedules.skip_index(n, skip)
    assert tele.teleport == (80.0, float(sigmas[k]))
    assert tele.nfe == sampling.expected_nfe(method, sigmas[k:]) < full.nfe
    # the teleport is exact, so only the remaining steps' discretisation error is left: never
    # more than the full run's (5 % slack for how errors of different steps combine)
    err_full, err_tele = max_err(full.x, exact), max_err(tele.x, exact)
    assert err_tele <= 1.05 * err_full, (err_tele, err_full)
    # and with many steps after the jump the error vanishes (a wrong jump would stay O(1))
    fine = schedules.truncate(schedules.karras(400 if method == "euler" else 200), float(sigmas[k]))
    x_skip = sampling.teleport(x, 80.0, float(sigmas[k]), g)
    tol = 0.1 if method == "euler" else 5e-3  # measured 0.06 resp. 2.5e-3: O(1/N), O(1/N^2)
    assert max_err(sampling.SAMPLERS[method](g, x_skip, fine), exact) < tol
    wrong = x * (float(sigmas[k]) / 80.0)  # noise rescaling without the data: error 0.5 .. 4
    assert max_err(sampling.SAMPLERS[method](g, wrong, fine), exact) > 4 * tol


def test_sample_teleport_to_off_grid_and_options():
    g = make_gaussian(D=16, r=4)
    x = 80.0 * torch.randn(4, 16, dtype=F64)
    sigmas = schedules.karras(20)
    res = sampling.sample(g, x, sigmas, "heun", teleport_to=7.0)
    assert res.sigmas[0] == 7.0 and (res.sigmas[1:] < 7.0).all() and res.teleport == (80.0, 7.0)
    assert res.nfe == sampling.expected_nfe("heun", res.sigmas)
    torch.testing.assert_close(res.x, sampling.heun(g, sampling.teleport(x, 80.0, 7.0, g), res.sigmas))
    assert sampling.sample(g, x, sigmas, "heun", skip_fraction=0.0).teleport is None
    analytic = sampling.sample(g, x, sigmas, "euler", teleport_to=0.0)  # jump to the end: no NFE
    assert analytic.nfe == 0
    torch.testing.assert_close(analytic.x, gk.gaussian_flow(x, 80.0, 0.0, g))
    calls = []
    sampling.sample(g, x, sigmas, "dpmpp_2m", skip_fraction=0.25, callback=calls.append)
    assert [c["i"] for c in calls] == list(range(15)) and set(calls[0]) == {"i", "x", "sigma", "denoised"}
    with pytest.raises(ValueError):
        sampling.sample(g, x, sigmas, "heun", teleport_to=5.0, skip_fraction=0.2)
    with pytest.raises(ValueError):
        sampling.sample(g, x, sigmas, "rk4")
    with pytest.raises(ValueError, match="gaussian="):
        sampling.sample(lambda x, s: g(x, s), x, sigmas, teleport_to=5.0)


# ----------------------------------------------------------------------------- mixtures


@pytest.mark.parametrize("r,K", [(4, 5), (12, 6)])  # K (r + 1) < D and >= D: both code paths
def test_gaussian_approximation_moments(r, K):
    m = make_mixture(K=K, D=32 if r == 4 else 24, r=r)
    g = sampling.gaussian_approximation(m)
    w = m.log_weights.exp()
    mean = w @ m.means
    cov = torch.zeros(m.dim, m.dim, dtype=F64)
    for k in range(K):  # dense, straight from the definition
        U = m.bases[k]
        comp = U @ torch.diag(m.eigvals[k]) @ U.T + m.residual_var[k] * (torch.eye(m.dim, dtype=F64) - U @ U.T)
        d = m.means[k] - mean
        cov += w[k] * (comp + torch.outer(d, d))
    g_cov = g.basis @ torch.diag(g.eigvals) @ g.basis.T + g.residual_var * (torch.eye(m.dim, dtype=F64) - g.basis @ g.basis.T)
    torch.testing.assert_close(g.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_cov, cov, rtol=1e-10, atol=1e-10)
    assert (g.eigvals[:-1] >= g.eigvals[1:]).all()


@pytest.mark.parametrize("method", ["heun", "dpmpp_2m"])
def test_mixture_teleport_moves_samples_far_less_than_mode_distance(method):
    m = make_mixture()
    mode_dist = torch.cdist(m.means, m.means).masked_fill(torch.eye(5, dtype=torch.bool), math.inf).min().item()
    x = 80.0 * torch.randn(64, m.dim, dtype=F64)
    sigmas = schedules.karras(30)
    ref = sampling.sample(m, x, sigmas, method).x
    tele = sampling.sample(m, x, sigmas, method, skip_fraction=0.3)  # jump to sigma ~ 12
    assert tele.teleport[1] > 5.0
    shift = (tele.x - ref).norm(dim=1)
    # measured: median shift 0.027, max 0.09, mode distance 14.8
    assert shift.median().item() < 0.01 * mode_dist and shift.max().item() < 0.05 * mode_dist, (shift, mode_dist)
    mode = lambda y: m.denoise(y, 0.01, return_weights=True)[1].argmax(1)
    assert (mode(tele.x) == mode(ref)).double().mean().item() >= 0.95
    # a wrong jump (rescaled noise, no data term) lands elsewhere
    k = schedules.skip_index(30, 0.3)
    wrong = sampling.SAMPLERS[method](m, x * (float(sigmas[k]) / 80.0), sigmas[k:])
    assert (wrong - ref).norm(dim=1).median().item() > 4 * shift.median().item()


# ----------------------------------------------------------------------------- hybrid denoiser


def test_hybrid_denoiser_routes_by_sigma():
    g = make_gaussian(D=16, r=4)
    net_sigmas = []

    def net(x, sigma, label=None):
        net_sigmas.append(sigma)
        assert label == "cond"
        return torch.zeros_like(x)

    h = sampling.HybridDenoiser(net, g, sigma_threshold=2.0)
    x = torch.randn(3, 16, dtype=F64)
    torch.testing.assert_close(h(x, torch.full((3,), 5.0, dtype=F64), label="cond"), g(x, 5.0))
    assert h.network_calls == 0 and h.analytic_calls == 1
    assert (h(x, 1.0, label="cond") == 0).all() and h.network_calls == 1
    mixed = torch.tensor([5.0, 2.0, 0.5], dtype=F64)  # threshold itself goes to the network
    out = h(x, mixed, label="cond")
    torch.testing.assert_close(out[0], g(x[:1], 5.0)[0])
    assert (out[1:] == 0).all() and h.network_calls == 2 and h.analytic_calls == 2
    with pytest.raises(TypeError):
        sampling.HybridDenoiser(net, lambda x, s: x, 1.0)


def test_sample_teleport_to_start_is_no_jump():
    g = make_gaussian(D=8, r=2)
    x = 80.0 * torch.randn(2, 8, dtype=F64)
    sigmas = schedules.karras(5)
    res = sampling.sample(g, x, sigmas, "euler", teleport_to=80.0)
    assert res.teleport is None and res.nfe == 5
