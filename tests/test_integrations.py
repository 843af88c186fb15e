"""Teleporting into the real k-diffusion and diffusers samplers.

A Gaussian data model with its exact denoiser wrapped as the library's model: every sampler,
started from the teleported latent, must end at the closed-form ODE end point (to within its own
discretisation error, measured by the same sampler without the teleport) after exactly the
expected number of model calls; a latent in the wrong scale must be caught.
"""
import math
import warnings

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import sampling, schedules

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch's pkg_resources deprecation warning
    diffusers = pytest.importorskip("diffusers", reason="optional extra diffusers not installed (pip install diffusers)")
    try:
        import k_diffusion as K

        from gsa_kernels.integrations import k_diffusion as gkd
        K_DIFFUSION_MISSING = None
    except ImportError:
        pytest.skip("optional extra k-diffusion not installed (pip install k-diffusion 'setuptools<81')",
                    allow_module_level=True)
    except RuntimeError as e:  # k-diffusion imports torchvision, whose PyPI build needs the CUDA torch
        K_DIFFUSION_MISSING = f"k-diffusion cannot be imported with this torch: its torchvision does not load ({e})"

from gsa_kernels.integrations import diffusers as gd  # noqa: E402

needs_k_diffusion = pytest.mark.skipif(K_DIFFUSION_MISSING is not None, reason=str(K_DIFFUSION_MISSING))

F64 = torch.float64
# diffusers 0.42 + numpy 2 warn inside set_timesteps (np.array(copy=False)); not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def gauss():
    g = torch.Generator().manual_seed(1)
    D, r = 16, 4
    U, _ = torch.linalg.qr(torch.randn(D, r, dtype=F64, generator=g))
    return gk.GaussianModel(torch.randn(D, dtype=F64, generator=g), U, torch.logspace(1, -1, r, dtype=F64), 0.01)


def max_err(a, b):
    return (a.double() - b.double()).reshape(a.shape[0], -1).norm(dim=1).max().item()


# ----------------------------------------------------------------------------- k-diffusion

K_SAMPLERS = {  # sampler, NFE for n steps ending at sigma = 0
    "heun": (lambda: K.sampling.sample_heun, lambda n: 2 * n - 1),
    "dpmpp_2m": (lambda: K.sampling.sample_dpmpp_2m, lambda n: n),
    "euler": (lambda: K.sampling.sample_euler, lambda n: n),
}


@needs_k_diffusion
@pytest.mark.parametrize("name", list(K_SAMPLERS))
def test_k_diffusion_sampler_from_teleported_latent(gauss, name):
    sampler, nfe = K_SAMPLERS[name][0](), K_SAMPLERS[name][1]
    n = 30
    sigmas = K.sampling.get_sigmas_karras(n, 0.002, 80.0)  # float32, as k-diffusion users have them
    x = 80.0 * torch.randn(8, 2, 8)  # [B, *shape], D = 16
    exact = gk.gaussian_flow(x, 80.0, 0.0, gauss)
    full_model, model = sampling.CountingDenoiser(gauss), sampling.CountingDenoiser(gauss)
    full = sampler(full_model, x, sigmas, disable=True)
    out = gkd.sample(model, x, sigmas, gauss, sampler, skip_fraction=0.3)
    k = schedules.skip_index(n, 0.3)
    assert full_model.nfe == nfe(n) and model.nfe == nfe(n - k)
    # only the remaining steps' discretisation error: <= the full run's (+5 %, + float32 noise)
    assert max_err(out, exact) <= 1.05 * max_err(full, exact) + 1e-4
    # the k-diffusion sampler on the truncated schedule == this library's sampler there
    if name in sampling.SAMPLERS:
        x_k = sampling.teleport(x.double(), 80.0, float(sigmas[k]), gauss)
        ours = sampling.SAMPLERS[name](gauss, x_k, sigmas[k:].double())
        assert max_err(out, ours) < 1e-3  # float32 run vs float64 run of the same steps
    # handing the sampler the un-teleported x on the truncated schedule is caught (error 35)
    wrong = sampler(gauss, x, sigmas[k:], disable=True)
    assert max_err(wrong, exact) > 20 * max_err(out, exact)


@needs_k_diffusion
def test_k_diffusion_teleport_to_sigma_and_mixture(gauss):
    sigmas = K.sampling.get_sigmas_karras(20, 0.002, 80.0)
    rest = gkd.teleport_sigmas(sigmas, teleport_to=10.0)
    assert float(rest[0]) == 10.0 and rest.dtype == sigmas.dtype and (rest[1:] < 10.0).all()
    assert torch.equal(gkd.teleport_sigmas(sigmas, skip_fraction=0.25), sigmas[5:])
    with pytest.raises(ValueError):
        gkd.teleport_sigmas(sigmas)
    # a mixture as the teleport model: its moment-matched Gaussian is used
    m = gk.GaussianMixture(gauss.mean[None].clone(), gauss.basis[None].clone(), gauss.eigvals[None].clone(), 0.01)
    x = 80.0 * torch.randn(4, 16, dtype=F64)
    a = gkd.sample(m, x, sigmas, m, K.sampling.sample_dpmpp_2m, teleport_to=10.0)
    b = gkd.sample(gauss, x, sigmas, gauss, K.sampling.sample_dpmpp_2m, teleport_to=10.0)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@needs_k_diffusion
def test_hybrid_denoiser_as_k_diffusion_model(gauss):
    calls = []

    def network(x, sigma, class_labels=None):  # stands for a trained net: here the exact denoiser
        calls.append(float(sigma.max()))
        assert class_labels is not None and class_labels.shape == (6,)
        return gauss(x, sigma)

    hybrid = sampling.HybridDenoiser(network, gauss, sigma_threshold=2.0)
    sigmas = K.sampling.get_sigmas_karras(12, 0.002, 80.0)
    x = 80.0 * torch.randn(6, 16, dtype=F64)
    out = K.sampling.sample_heun(hybrid, x, sigmas, extra_args={"class_labels": torch.zeros(6)}, disable=True)
    torch.testing.assert_close(out, K.sampling.sample_heun(gauss, x, sigmas, disable=True))
    n_high = int((sigmas[:-1] > 2.0).sum())
    assert calls and max(calls) <= 2.0
    assert hybrid.network_calls == len(calls) and hybrid.network_calls + hybrid.analytic_calls == 2 * 12 - 1
    assert hybrid.analytic_calls >= 2 * n_high - 1


# ----------------------------------------------------------------------------- diffusers

VP = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = {
    "euler": lambda: diffusers.EulerDiscreteScheduler(**VP, prediction_type="epsilon"),
    "euler_karras": lambda: diffusers.EulerDiscreteScheduler(**VP, prediction_type="epsilon", use_karras_sigmas=True),
    "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**VP, prediction_type="epsilon"),
    "dpmpp_2m_v": lambda: diffusers.DPMSolverMultistepScheduler(**VP, prediction_type="v_prediction"),
    "unipc": lambda: diffusers.UniPCMultistepScheduler(**VP, prediction_type="epsilon"),
    "flow_euler": lambda: diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    # the multistep solvers in their flow-matching mode: latents (1 - t) x0 + t eps
    "dpmpp_2m_flow": lambda: diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    "unipc_flow": lambda: diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
}


def run_diffusers(scheduler, model, latents, timesteps):
    for t in timesteps:
        inp = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        latents = scheduler.step(model(inp, t), t, latents).prev_sample
    return latents


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_diffusers_scheduler_from_teleported_latent(gauss, name):
    n = 30
    noise = torch.randn(8, 16)  # unit noise, float32 as in pipelines
    exact = gk.gaussian_flow(noise, math.inf, 0.0, gauss)

    full_sched = SCHEDULERS[name]()
    full_sched.set_timesteps(n)
    start = gd.teleport_latents(full_sched, gauss, noise, begin_index=0)  # the exact state at timesteps[0]
    full_model = gd.DenoiserAsDiffusersModel(gauss, full_sched)
    full = run_diffusers(full_sched, full_model, start.latents, start.timesteps)

    sched = SCHEDULERS[name]()
    sched.set_timesteps(n)
    tele = gd.teleport_latents(sched, gauss, noise, skip_fraction=0.3)
    model = gd.DenoiserAsDiffusersModel(gauss, sched)
    out = run_diffusers(sched, model, tele.latents, tele.timesteps)

    assert tele.begin_index == 9 and sched.begin_index == 9 and len(tele.timesteps) == n - 9
    assert full_model.calls == n and model.calls == n - 9  # one model call per timestep
    err, err_full = max_err(out, exact), max_err(full, exact)
    assert err <= 1.05 * err_full + 1e-4, (err, err_full)
    assert err < 0.3  # data spread ~3.5; the schedules end with one denoising jump from sigma ~0.1
    # the teleported latent lies on the exact trajectory: a fine closed-form check at its level
    scale, sigma = gd.noise_level(sched, 9)
    torch.testing.assert_close(tele.latents, gk.gaussian_flow(noise, math.inf, sigma, gauss, 1.0, scale))
    # the same latent without the scheduler's scale conversion (VE <-> VP / flow) is caught (measured 20-180x)
    wrong_scale = 1.0 / scale if scale != 1.0 else 1.0 / math.sqrt(1 + sigma**2)
    sched.set_timesteps(n)
    sched.set_begin_index(9)
    wrong = run_diffusers(sched, gd.DenoiserAsDiffusersModel(gauss, sched), tele.latents * wrong_scale, tele.timesteps)
    assert max_err(wrong, exact) > 5 * err


@pytest.mark.parametrize("name,ours", [("euler", "euler"), ("dpmpp_2m", "dpmpp_2m")])
def test_diffusers_matches_library_sampler(gauss, name, ours):
    # the diffusers run after the teleport == this library's sampler on the scheduler's sigmas
    sched = SCHEDULERS[name]()
    sched.set_timesteps(20)
    noise = torch.randn(4, 16)
    tele = gd.teleport_latents(sched, gauss, noise, skip_fraction=0.25)
    out = run_diffusers(sched, gd.DenoiserAsDiffusersModel(gauss, sched), tele.latents, tele.timesteps)
    sig = sched.sigmas[tele.begin_index:].double()
    x_ve = gk.gaussian_flow(noise.double(), math.inf, float(sig[0]), gauss)
    assert max_err(out, sampling.SAMPLERS[ours](gauss, x_ve, sig)) < 1e-4  # float32 vs float64 steps


def test_diffusers_errors(gauss):
    s = diffusers.LMSDiscreteScheduler(**VP)  # DDIM / DDPM are supported (tests/test_diffusers_pipeline.py)
    s.set_timesteps(10)
    with pytest.raises(TypeError, match="unsupported scheduler"):
        gd.teleport_latents(s, gauss, torch.randn(2, 16), skip_fraction=0.2)
    e = diffusers.EulerDiscreteScheduler(**VP)
    with pytest.raises(ValueError, match="set_timesteps"):
        gd.teleport_latents(e, gauss, torch.randn(2, 16), skip_fraction=0.2)
    e.set_timesteps(10)
    with pytest.raises(ValueError):
        gd.teleport_latents(e, gauss, torch.randn(2, 16), skip_fraction=0.2, begin_index=2)
    with pytest.raises(ValueError):
        gd.teleport_latents(e, gauss, torch.randn(2, 16), begin_index=10)


# ----------------------------------------------------------------------------- class labels


@pytest.fixture(scope="module")
def per_class(gauss):
    """Three classes: the fixture Gaussian shifted by 0, 3, -3 along one axis, its spectrum scaled."""
    shift = torch.zeros(3, 16, dtype=F64)
    shift[1, 0], shift[2, 0] = 3.0, -3.0
    return gk.GaussianMixture(gauss.mean + shift, gauss.basis.expand(3, -1, -1).clone(),
                              gauss.eigvals * torch.tensor([[1.0], [0.5], [2.0]], dtype=F64), 0.01)


def class_model(m, k):
    return gk.GaussianModel(m.means[k], m.bases[k], m.eigvals[k], float(m.residual_var[k]))


LABELS = torch.tensor([0, 2, 1, 1, 2, 0])


def per_row(m, labels, fn):
    """fn(class k's GaussianModel, its rows) assembled row by row."""
    out = None
    for k in labels.unique().tolist():
        rows = (labels == k).nonzero()[:, 0]
        v = fn(class_model(m, k), rows)
        out = v.new_empty((labels.shape[0],) + v.shape[1:]) if out is None else out
        out[rows] = v
    return out


@needs_k_diffusion
def test_k_diffusion_sample_with_class_labels(per_class):
    sigmas = K.sampling.get_sigmas_karras(12, 0.002, 80.0).double()
    x = 80.0 * torch.randn(6, 16, dtype=F64)
    seen = []

    def model(x, sigma, class_cond):  # k-diffusion's name for class labels
        seen.append(class_cond)
        return gk.gaussian_denoise(x, sigma, per_class, labels=class_cond)

    out = gkd.sample(model, x, sigmas, per_class, K.sampling.sample_heun, skip_fraction=0.3, labels=LABELS)
    assert seen and all(s is LABELS for s in seen)
    want = per_row(per_class, LABELS, lambda g, rows: gkd.sample(g, x[rows], sigmas, g, K.sampling.sample_heun,
                                                                 skip_fraction=0.3))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    # another name, or the labels left to extra_args; twice is an error
    alt = gkd.sample(lambda x, s, y: model(x, s, y), x, sigmas, per_class, K.sampling.sample_heun, skip_fraction=0.3,
                     labels=LABELS, labels_key="y")
    torch.testing.assert_close(alt, out, rtol=0, atol=0)
    own = gkd.sample(model, x, sigmas, per_class, K.sampling.sample_heun, skip_fraction=0.3, labels=LABELS,
                     labels_key=None, extra_args={"class_cond": LABELS})
    torch.testing.assert_close(own, out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="given twice"):
        gkd.sample(model, x, sigmas, per_class, skip_fraction=0.3, labels=LABELS, extra_args={"class_cond": LABELS})


@needs_k_diffusion
def test_hybrid_denoiser_with_class_labels_in_k_diffusion(per_class):
    def network(x, sigma, class_cond):
        return gk.gaussian_denoise(x, sigma, per_class, labels=class_cond)

    hybrid = sampling.HybridDenoiser(network, per_class, sigma_threshold=2.0, labels_key="class_cond")
    sigmas = K.sampling.get_sigmas_karras(10, 0.002, 80.0).double()
    x = 80.0 * torch.randn(6, 16, dtype=F64)
    out = K.sampling.sample_heun(hybrid, x, sigmas, extra_args={"class_cond": LABELS}, disable=True)
    want = per_row(per_class, LABELS, lambda g, rows: K.sampling.sample_heun(g, x[rows], sigmas, disable=True))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert hybrid.network_calls > 0 and hybrid.analytic_calls > 0


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_v", "flow_euler"])
def test_diffusers_with_class_labels(per_class, name):
    noise = torch.randn(6, 16, dtype=F64)

    def run(gaussian, noise, labels):
        sched = SCHEDULERS[name]()
        sched.set_timesteps(12)
        tele = gd.teleport_latents(sched, gaussian, noise, skip_fraction=0.3, labels=labels)
        model = gd.DenoiserAsDiffusersModel(gaussian, sched)
        latents = tele.latents
        for t in tele.timesteps:  # as a pipeline calls a class-conditional UNet
            inp = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
            eps = model(inp, t, class_labels=labels) if labels is not None else model(inp, t)
            latents = sched.step(eps, t, latents).prev_sample
        return tele.latents, latents

    start, out = run(per_class, noise, LABELS)
    want_start = per_row(per_class, LABELS, lambda g, rows: run(g, noise[rows], None)[0])
    want = per_row(per_class, LABELS, lambda g, rows: run(g, noise[rows], None)[1])
    torch.testing.assert_close(start, want_start, rtol=1e-10, atol=1e-10)
    # diffusers' step upcasts the sample to float32: rows may round differently in the last bit
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
