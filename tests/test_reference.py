"""The oracle checked against code nobody here wrote: torch.distributions log-densities and their
autograd gradients (scores, Tweedie denoisers, mixture posteriors), and scipy's numerical ODE
integration of the probability-flow ODE (closed-form flows and trajectories, VP and
rectified-flow scalings). Everything in float64."""
import math

import pytest
import torch
from scipy.integrate import solve_ivp
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

import gsa_kernels as gk
from gsa_kernels import reference as ref
from gsa_kernels._core._contract import SpectralKind

from ._helpers import SIGMAS, dense_covariance, dense_covariances, random_gaussian, random_mixture, rel_err

SHAPES = [(2, 0), (2, 1), (2, 2), (61, 0), (61, 1), (61, 15), (61, 61), (784, 0), (784, 1), (784, 196), (784, 784)]


def _args(g):
    return g.mean, g.basis, g.eigvals, g.residual_var


# the reference's kernel-level ops, called like the public ones
def _denoise(x, sigma, g):
    return ref.gaussian_map(x, *_args(g), sigma, sigma, sigma, sigma, SpectralKind.DENOISE)


def _score(x, sigma, g):
    return ref.gaussian_map(x, *_args(g), sigma, sigma, sigma, sigma, SpectralKind.SCORE)


def _flow(x, sigma_from, sigma_to, g, scale_from, scale_to):
    return ref.gaussian_map(x, *_args(g), sigma_from, sigma_to, scale_from, scale_to, SpectralKind.FLOW)


def _posterior(x, sigma, m):
    return ref.mixture_posterior(x, m.means, m.bases, m.eigvals, m.residual_var, m.log_weights, sigma, True, True)


def _noised_mvn(g, sigma):
    return MultivariateNormal(g.mean, dense_covariance(g) + sigma**2 * torch.eye(g.dim, dtype=torch.float64))


def _autograd_score(g, x, sigmas):
    """grad_x log N(x; mean, Sigma + sigma_b^2 I), row by row (per-sample sigma)."""
    out = []
    for xb, s in zip(x, sigmas.tolist()):
        xb = xb.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_noised_mvn(g, s).log_prob(xb), xb)
        out.append(grad)
    return torch.stack(out)


@pytest.mark.parametrize("D,r", SHAPES)
@pytest.mark.parametrize("residual_var", [0.0, 0.4])
def test_score_and_denoiser_match_autograd_of_mvn_logprob(D, r, residual_var):
    g = random_gaussian(D, r, residual_var)
    sig = torch.tensor(SIGMAS, dtype=torch.float64)  # per-sample sigma, both ends of the EDM range
    x = g.mean + sig[:, None] * torch.randn(len(SIGMAS), D, dtype=torch.float64) + 0.3 * torch.randn(len(SIGMAS), D, dtype=torch.float64)
    want = _autograd_score(g, x, sig)
    got = _score(x, sig, g)
    assert rel_err(got, want) < 1e-9
    # Tweedie: E[x0 | x] = x + sigma^2 grad log p_sigma(x)
    den = _denoise(x, sig, g)
    assert rel_err(den, x + sig[:, None] ** 2 * want) < 1e-8


def test_scalar_and_per_sample_sigma_agree():
    g = random_gaussian(61, 15)
    x = torch.randn(3, 61, dtype=torch.float64)
    per = _score(x, torch.full((3,), 0.7, dtype=torch.float64), g)
    row = torch.stack([_score(x[i : i + 1], torch.tensor([0.7], dtype=torch.float64), g)[0] for i in range(3)])
    assert torch.allclose(per, row, rtol=1e-13, atol=1e-13)


def _dense_denoiser(g):
    """D(x, s) from a dense eigendecomposition of Sigma (not via the basis/eigvals split)."""
    e, V = torch.linalg.eigh(dense_covariance(g))
    e, V, mu = e.clamp_min(0).numpy(), V.numpy(), g.mean.numpy()

    def denoise(x, s):  # x [..., D]
        y = (x - mu) @ V
        return mu + (y * (e / (e + s * s))) @ V.T

    return denoise


def _integrate_edm(g, x, sigma_from, sigma_to):
    """Numerically integrate dx/ds = (x - D(x, s)) / s from sigma_from to sigma_to for rows x [B, D]."""
    den = _dense_denoiser(g)
    B, D = x.shape
    rhs = lambda s, v: ((v.reshape(B, D) - den(v.reshape(B, D), s)) / s).ravel()
    sol = solve_ivp(rhs, (sigma_from, sigma_to), x.numpy().ravel(), method="DOP853", rtol=1e-11, atol=1e-11)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1].reshape(B, D))


@pytest.mark.parametrize("D,r", [(2, 1), (61, 0), (61, 15), (61, 61), (784, 196)])
@pytest.mark.parametrize("sigma_from,sigma_to", [(80.0, 0.002), (5.0, 0.5), (0.5, 0.02), (0.3, 4.0)])
def test_flow_matches_numerical_ode(D, r, sigma_from, sigma_to):
    g = random_gaussian(D, r, 0.25)
    x = g.sample(2) + sigma_from * torch.randn(2, D, dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    got = _flow(x, sigma_from * one, sigma_to * one, g, one, one)
    want = _integrate_edm(g, x, sigma_from, sigma_to)
    assert rel_err(got, want) < 1e-7


def _integrate_scaled(g, x, t_a, t_b, scale, dscale, sigma, dsigma):
    """EDM eq. 4 in t for x_t = s(t) (x0 + sigma(t) eps):
    dx/dt = s'/s x - s sigma' sigma score(x / s; sigma)  (EDM's s^2 is with the gradient taken
    w.r.t. x, which brings 1/s), with the score from autograd-free
    dense algebra -- independent of the closed form's scale bookkeeping."""
    den = _dense_denoiser(g)
    B, D = x.shape

    def rhs(t, v):
        v = v.reshape(B, D)
        s, sg = scale(t), sigma(t)
        score = (den(v / s, sg) - v / s) / sg**2
        return (dscale(t) / s * v - s * dsigma(t) * sg * score).ravel()

    sol = solve_ivp(rhs, (t_a, t_b), x.numpy().ravel(), method="DOP853", rtol=1e-11, atol=1e-11)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1].reshape(B, D))


VP_BETA = (0.1, 20.0)  # the DDPM/score-SDE linear beta schedule in continuous time


def _vp():
    b0, b1 = VP_BETA
    log_abar = lambda t: -(b0 * t + 0.5 * (b1 - b0) * t * t)
    dlog_abar = lambda t: -(b0 + (b1 - b0) * t)
    scale = lambda t: math.exp(0.5 * log_abar(t))
    dscale = lambda t: 0.5 * dlog_abar(t) * scale(t)
    sigma = lambda t: math.sqrt(math.expm1(-log_abar(t)))
    dsigma = lambda t: -0.5 * dlog_abar(t) * math.exp(-log_abar(t)) / sigma(t)
    return scale, dscale, sigma, dsigma


def _rectified():
    return (lambda t: 1 - t), (lambda t: -1.0), (lambda t: t / (1 - t)), (lambda t: 1 / (1 - t) ** 2)


@pytest.mark.parametrize("schedule,t_a,t_b", [(_vp, 0.9, 0.05), (_vp, 0.5, 0.02), (_rectified, 0.95, 0.05), (_rectified, 0.6, 0.2)])
@pytest.mark.parametrize("D,r", [(61, 15), (61, 61)])
def test_scaled_flow_matches_numerical_ode(schedule, t_a, t_b, D, r):
    scale, dscale, sigma, dsigma = schedule()
    g = random_gaussian(D, r, 0.25)
    x = scale(t_a) * (g.sample(2) + sigma(t_a) * torch.randn(2, D, dtype=torch.float64))
    one = torch.ones(2, dtype=torch.float64)
    got = _flow(x, sigma(t_a) * one, sigma(t_b) * one, g, scale(t_a) * one, scale(t_b) * one)
    want = _integrate_scaled(g, x, t_a, t_b, scale, dscale, sigma, dsigma)
    assert rel_err(got, want) < 1e-7
    # the wrong bookkeeping (ignoring the scales) is far off: the test can fail
    wrong = _flow(x, sigma(t_a) * one, sigma(t_b) * one, g, one, one)
    assert rel_err(wrong, want) > 1e-2


@pytest.mark.parametrize("D,r", [(61, 0), (61, 15), (784, 196)])
def test_flow_from_unit_noise_is_the_large_sigma_limit(D, r):
    g = random_gaussian(D, r, 0.25)
    eps = torch.randn(3, D, dtype=torch.float64)
    one = torch.ones(3, dtype=torch.float64)
    big = 1e7
    from_inf = _flow(eps, math.inf * one, 0.5 * one, g, one, one)
    from_big = _flow(big * eps, big * one, 0.5 * one, g, one, one)
    assert rel_err(from_inf, from_big) < 1e-6
    # with a VP-style scaling at the end, the scale multiplies the EDM state
    scaled = _flow(eps, math.inf * one, 0.5 * one, g, one, 0.8 * one)
    assert rel_err(scaled, 0.8 * from_inf) < 1e-13


def test_trajectory_matches_dense_ode_solution():
    D, r = 61, 15
    g = random_gaussian(D, r, 0.25)
    sigmas = torch.tensor([20.0, 5.0, 1.0, 0.2, 0.002], dtype=torch.float64)
    x = g.sample(2) + sigmas[0] * torch.randn(2, D, dtype=torch.float64)
    traj = ref.gaussian_trajectory(x, *_args(g), sigmas[:, None].expand(5, 2))
    assert traj.shape == (5, 2, D)
    one = torch.ones(2, dtype=torch.float64)
    assert rel_err(traj[0], _flow(x, sigmas[0].expand(2), sigmas[0].expand(2), g, one, one)) < 1e-14
    for t in range(1, 5):
        assert rel_err(traj[t], _integrate_edm(g, x, 20.0, sigmas[t].item())) < 1e-7


def _mixture_dist(m, sigma):
    covs = dense_covariances(m) + sigma**2 * torch.eye(m.dim, dtype=torch.float64)
    return MixtureSameFamily(Categorical(logits=m.log_weights), MultivariateNormal(m.means, covs))


@pytest.mark.parametrize("K,D,r", [(1, 2, 1), (4, 2, 0), (5, 61, 0), (5, 61, 15), (3, 61, 61), (3, 784, 16)])
@pytest.mark.parametrize("sigma", [0.05, 1.0, 80.0])
def test_mixture_logp_score_weights_match_torch_distributions(K, D, r, sigma):
    m = random_mixture(K, D, r, residual_var=0.0 if r == 0 else 0.2)
    x = m.sample(3) + sigma * torch.randn(3, D, dtype=torch.float64)
    sig = torch.full((3,), sigma, dtype=torch.float64)
    den, logp, w = _posterior(x, sig, m)
    dist = _mixture_dist(m, sigma)
    xg = x.clone().requires_grad_(True)
    want_logp = dist.log_prob(xg)
    (score,) = torch.autograd.grad(want_logp.sum(), xg)
    assert torch.allclose(logp, want_logp.detach(), rtol=1e-10, atol=1e-8)
    assert rel_err((den - x) / sigma**2, score) < 1e-8
    comp = dist.component_distribution.log_prob(x[:, None, :]) + m.log_weights
    assert torch.allclose(w, torch.softmax(comp, 1), atol=1e-10)


def test_delta_mixture_posterior_is_exact_at_small_sigma():
    """Empirical mixture: weights = softmax(-|x - mu_k|^2 / 2 s^2) from direct differences."""
    pts = torch.randn(50, 64, dtype=torch.float64)
    m = gk.GaussianMixture.from_points(pts)
    x = 0.5 * (pts[:4] + pts[4:8]) + 1e-4 * torch.randn(4, 64, dtype=torch.float64)  # near ties
    s = torch.full((4,), 0.05, dtype=torch.float64)
    den, logp, w = _posterior(x, s, m)
    d2 = ((x[:, None, :] - pts[None]) ** 2).sum(-1)
    want = torch.softmax(-d2 / (2 * 0.05**2), 1)
    assert torch.allclose(w, want, atol=1e-12)
    assert torch.allclose(den, want @ pts, atol=1e-12)
    assert (w.max(1).values < 0.999).any()  # the near-tie queries really split their mass


@pytest.mark.parametrize("D,r", SHAPES)
def test_float32_reference_tracks_float64(D, r):
    """float32 inputs (computed in float32) against the float64 oracle on the same
    float32-representable values. Relative error bound: a few ulp (6e-8) times the conditioning
    of the spectral map, which reaches ~1e2-1e3 when sigma^2 is far below the smallest variance."""
    g = random_gaussian(D, r, 0.4).to(dtype=torch.float32)
    g64 = g.to(dtype=torch.float64)
    sig = torch.tensor(SIGMAS, dtype=torch.float32)
    x = (g.mean + sig[:, None] * torch.randn(len(SIGMAS), D)).float()
    one = torch.ones(len(SIGMAS))
    for fn in (_denoise, _score):
        a32 = fn(x, sig, g)
        a64 = fn(x.double(), sig.double(), g64)
        assert a32.dtype == torch.float32
        assert rel_err(a32, a64) < 1e-4
    f32 = _flow(x, sig, 0.1 * sig, g, one, one)
    f64 = _flow(x.double(), sig.double(), 0.1 * sig.double(), g64, one.double(), one.double())
    assert rel_err(f32, f64) < 1e-5


# ----------------------------------------------------------------------------- accuracy of the fallback
# The reference is also the backend when the extension is missing: in float32 it must be as
# accurate as the kernels (issue 11), and NaN rows must stay NaN.


def _exact_full_rank(D, seed=0):
    """A full-rank model with eigenvalues 1e-3..10 and an orthonormal float64 basis."""
    g = random_gaussian(D, D, 0.0, seed=seed)
    return gk.GaussianModel(g.mean, g.basis, 10.0 ** torch.linspace(-3, 1, D, dtype=torch.float64), 0.0)


@pytest.mark.parametrize("sigma", [1e-6, 0.002])
def test_full_rank_score_at_small_sigma_float64(sigma):
    """-(Sigma + s^2 I)^-1 (x - mu) by a dense float64 solve (Sigma's condition number ~1e4)."""
    g = _exact_full_rank(40)
    x = g.sample(3) + sigma * torch.randn(3, 40, dtype=torch.float64)
    s = torch.full((3,), sigma, dtype=torch.float64)
    want = -torch.linalg.solve(dense_covariance(g) + sigma**2 * torch.eye(40, dtype=torch.float64), (x - g.mean).T).T
    assert rel_err(_score(x, s, g), want) < 1e-10


def test_full_rank_score_at_small_sigma_float32():
    """float32 inputs, float32 computation: within float32 accuracy of the float64 solve on the
    same rounded model (the full-rank form: no residual term of a rounded basis / sigma^2)."""
    g32 = _exact_full_rank(40).to(dtype=torch.float32)
    g64 = g32.to(dtype=torch.float64)
    x = (g64.sample(3) + 0.002 * torch.randn(3, 40, dtype=torch.float64)).float()
    want = -torch.linalg.solve(dense_covariance(g64) + 0.002**2 * torch.eye(40, dtype=torch.float64), (x.double() - g64.mean).T).T
    got = _score(x, torch.full((3,), 0.002), g32)
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-4


@pytest.mark.parametrize("sigma", [0.01, 0.03, 0.1])
def test_float32_delta_near_ties(sigma):
    """Empirical mixture, D = 3072, queries at midpoints of two points + 1e-3 noise: float32
    weights within total variation 1e-3 of float64 softmax(-|x - mu|^2 / 2 s^2)."""
    gen = torch.Generator().manual_seed(0)
    pts = (torch.rand(24, 3072, generator=gen) * 2 - 1).float()
    x = ((pts[:8] + pts[8:16]) / 2 + 1e-3 * torch.randn(8, 3072, generator=gen)).float()
    m = gk.GaussianMixture.from_points(pts)
    _, _, w = _posterior(x, torch.full((8,), sigma), m)
    d2 = ((x.double()[:, None, :] - pts.double()[None]) ** 2).sum(-1)
    want = torch.softmax(-d2 / (2 * sigma**2), 1)
    assert w.dtype == torch.float32
    assert 0.5 * (w.double() - want).abs().sum(1).max() < 1e-3


def test_nan_rows_give_nan_outputs():
    g = random_gaussian(20, 4, 0.2)
    m = random_mixture(5, 20, 2)
    x = torch.randn(3, 20, dtype=torch.float64)
    x[1, 7] = math.nan
    s = torch.full((3,), 0.5, dtype=torch.float64)
    for out in (_denoise(x, s, g), _score(x, s, g), *_posterior(x, s, m)):
        assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()
