"""enable_teleport / disable_teleport on real diffusers pipelines built offline from tiny random
configs: the switched pipeline's own __call__ runs the network only for the steps after the
jump, equals teleport_latents followed by the pipeline's loop written out by hand (same
generator seed), and disable_teleport gives back the plain pipeline bit for bit."""
import warnings

import pytest
import torch

import gsa_kernels as gk

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    diffusers = pytest.importorskip("diffusers", reason="optional extra diffusers not installed (pip install diffusers)")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from gsa_kernels.integrations import diffusers as gd  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
VP = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEPS, SKIP, BEGIN = 10, 0.3, 3  # schedules.skip_index(10, 0.3) == 3
SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(**VP, clip_sample=False),  # clipping x0 to [-1, 1] is no ODE step
    "ddpm": lambda: diffusers.DDPMScheduler(**VP, clip_sample=False),
    "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**VP),
    "unipc": lambda: diffusers.UniPCMultistepScheduler(**VP),
    "euler": lambda: diffusers.EulerDiscreteScheduler(**VP),
    "flow_euler": lambda: diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
}


def tiny_unet(size, channels=3):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def tiny_vq():
    torch.manual_seed(1)
    return diffusers.VQModel(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=3, num_vq_embeddings=16,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def gaussian(D, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, 6, generator=g))
    return gk.GaussianModel(0.3 * torch.randn(D, generator=g), U, torch.logspace(0.5, -1.5, 6), 0.05)


def build(kind, sched):
    if kind == "ddim":
        return diffusers.DDIMPipeline(tiny_unet(8), SCHEDULERS["ddim"]())  # DDIMPipeline forces DDIM
    if kind == "ddpm":
        return diffusers.DDPMPipeline(tiny_unet(8), SCHEDULERS[sched]())
    return diffusers.LDMPipeline(tiny_vq(), tiny_unet(4), SCHEDULERS[sched]())


def run(pipe, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    kw = dict(batch_size=2, generator=gen, num_inference_steps=STEPS)
    with torch.no_grad():
        if kind == "ldm":  # the VQ decoder quantizes: compare the latents it is given
            seen, decode = [], pipe.vqvae.decode
            pipe.vqvae.decode = lambda z, **k: seen.append(z.clone()) or decode(z, **k)
            try:
                pipe(**kw, output_type="np")
            finally:
                del pipe.vqvae.decode
            return seen[0]
        return pipe(**kw, output_type="pt").images


def by_hand(pipe, kind, model, seed):
    """teleport_latents, then the loop of the pipeline's __call__ written out."""
    gen = torch.Generator().manual_seed(seed)
    unet, sched = pipe.unet, pipe.scheduler
    shape = (2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = randn_tensor(shape, generator=gen, dtype=unet.dtype)  # what the pipeline draws: unit noise
    sched.set_timesteps(STEPS)
    start = gd.teleport_latents(sched, model, x, skip_fraction=SKIP)
    x = start.latents
    with torch.no_grad():
        for t in start.timesteps:
            if kind == "ddim":
                x = sched.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=None, generator=gen).prev_sample
            elif kind == "ddpm":
                x = sched.step(unet(x, t).sample, t, x, generator=gen).prev_sample
            else:
                extra = {"eta": 0.0} if kind == "ldm" and isinstance(sched, diffusers.DDIMScheduler) else {}
                x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x, **extra).prev_sample
        if kind == "ldm":
            return x / pipe.vqvae.config.scaling_factor
        return (x / 2 + 0.5).clamp(0, 1)


CASES = [("ddim", "ddim"), ("ddpm", "ddpm"), ("ddpm", "dpmpp_2m"), ("ddpm", "flow_euler"), ("ldm", "unipc"),
         ("ldm", "ddim"), ("ldm", "euler")]


@pytest.mark.parametrize("kind,sched", CASES)
def test_pipeline_switch(kind, sched):
    pipe = build(kind, sched)
    pipe.set_progress_bar_config(disable=True)
    latent = pipe.unet.config
    model = gaussian(latent.in_channels * latent.sample_size ** 2)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))

    plain = run(pipe, kind, seed=5)
    assert len(calls) == STEPS
    gd.enable_teleport(pipe, model, skip_fraction=SKIP)
    assert isinstance(pipe.scheduler, SCHEDULERS[sched]().__class__)
    calls.clear()
    switched = run(pipe, kind, seed=5)
    assert len(calls) == STEPS - BEGIN  # the network runs only after the jump
    again = run(pipe, kind, seed=5)  # every call jumps afresh
    torch.testing.assert_close(again, switched, rtol=0, atol=0)
    gd.disable_teleport(pipe)
    ref = by_hand(pipe, kind, model, seed=5)
    # LDM + Euler: the pipeline multiplies its noise by init_noise_sigma, the switch divides it
    # back out before the jump (x * c / c: float32 rounding)
    exact = not (kind == "ldm" and sched == "euler")
    torch.testing.assert_close(switched, ref, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)
    assert (switched - plain).abs().max() > 1e-3  # the switch did change the result
    calls.clear()
    torch.testing.assert_close(run(pipe, kind, seed=5), plain, rtol=0, atol=0)  # off: the plain pipeline
    assert len(calls) == STEPS and not isinstance(pipe.scheduler, gd._TeleportingScheduler)


def test_switch_errors_and_vae_scaling():
    pipe = build("ldm", "ddim")
    model = gaussian(48)
    with pytest.raises(TypeError, match="GaussianModel"):
        gd.enable_teleport(pipe, "stats.safetensors")
    with pytest.raises(ValueError, match="skip fraction"):
        gd.enable_teleport(pipe, model, skip_fraction=1.0)
    with pytest.raises(ValueError, match="fitted_on"):
        gd.enable_teleport(pipe, model, fitted_on="pixels")
    pipe.scheduler = diffusers.LMSDiscreteScheduler(**VP)
    with pytest.raises(TypeError, match="unsupported scheduler"):
        gd.enable_teleport(pipe, model)
    pipe.scheduler = SCHEDULERS["ddim"]()
    gd.enable_teleport(pipe, model, fitted_on="vae")  # the VQ model's scaling_factor 0.18215
    c = pipe.vqvae.config.scaling_factor
    scaled = pipe._gk_teleport.model
    torch.testing.assert_close(scaled.mean, model.mean * c)
    torch.testing.assert_close(scaled.eigvals, model.eigvals * c * c)
    assert scaled.residual_var == pytest.approx(model.residual_var * c * c)
    gd.disable_teleport(pipe)
    gd.disable_teleport(pipe)  # idempotent


@pytest.mark.parametrize("sched", ["ddim", "ddpm"])
def test_teleport_latents_ddim_ddpm(sched):
    # the DDIM / DDPM state at timestep t: sqrt(abar) x0 + sqrt(1 - abar) eps
    s = SCHEDULERS[sched]()
    s.set_timesteps(20)
    model = gaussian(12)
    noise = torch.randn(3, 12, dtype=torch.float64)
    tele = gd.teleport_latents(s, model.to(dtype=torch.float64), noise, skip_fraction=0.25)
    abar = s.alphas_cumprod[s.timesteps[5]].double()
    assert tele.begin_index == 5 and torch.equal(tele.timesteps, s.timesteps[5:])
    expect = gk.gaussian_flow(noise, float("inf"), ((1 - abar) / abar).sqrt().item(),
                              model.to(dtype=torch.float64)) * abar.sqrt()
    torch.testing.assert_close(tele.latents, expect)


@pytest.mark.parametrize("sched", ["ddim", "ddpm"])
def test_ddim_ddpm_with_gaussian_denoiser(sched):
    # DenoiserAsDiffusersModel on DDIM (deterministic, eta 0) lands near the closed-form end point
    model = gaussian(12).to(dtype=torch.float64)
    noise = torch.randn(2000, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = gk.gaussian_flow(noise, float("inf"), 0.0, model)
    s = SCHEDULERS[sched]()
    s.set_timesteps(50)
    tele = gd.teleport_latents(s, model, noise, skip_fraction=0.2)
    net = gd.DenoiserAsDiffusersModel(model, s)
    x = tele.latents
    gen = torch.Generator().manual_seed(0)
    for t in tele.timesteps:
        x = s.step(net(x, t), t, x, generator=gen).prev_sample
    assert net.calls == 40
    if sched == "ddim":  # DDIM (eta 0) is Euler in sigma: equal to this library's Euler on its sigmas
        abar = s.alphas_cumprod.double()[s.timesteps[10:]]
        sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
        ours = gk.sampling.euler(model, gk.gaussian_flow(noise, float("inf"), sigmas[0].item(), model), sigmas)
        torch.testing.assert_close(x, ours, rtol=1e-6, atol=1e-6)  # DDIM keeps alphas in float32
        assert (x - exact).norm(dim=1).max() < 0.3  # data spread ~3
    else:  # DDPM is stochastic: the model's moments, not the ODE end point
        cov = model.basis @ torch.diag(model.eigvals) @ model.basis.T + model.residual_var * (
            torch.eye(12, dtype=torch.float64) - model.basis @ model.basis.T)
        assert (x.mean(0) - model.mean).norm() < 0.15
        torch.testing.assert_close(torch.cov(x.T), cov, atol=0.15, rtol=0)


class TinyGuidedPipeline(diffusers.DiffusionPipeline):
    """The Stable-Diffusion loop shape, without text: prepare_latents (latents= or noise, times
    init_noise_sigma), then classifier-free guidance on torch.cat([latents] * 2)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def prepare_latents(self, batch, generator, latents=None):
        shape = (batch, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        latents = randn_tensor(shape, generator=generator) if latents is None else latents
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def __call__(self, batch=2, generator=None, latents=None, steps=STEPS, scale=3.0):
        self.scheduler.set_timesteps(steps)
        latents = self.prepare_latents(batch, generator, latents)
        for t in self.scheduler.timesteps:
            inp = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = self.unet(inp, t).sample.chunk(2)
            latents = self.scheduler.step(uncond + scale * (cond - uncond), t, latents).prev_sample
        return latents


@pytest.mark.parametrize("sched", ["euler", "dpmpp_2m"])
def test_prepare_latents_pipeline_with_guidance(sched):
    pipe = TinyGuidedPipeline(tiny_unet(8), SCHEDULERS[sched]())
    model = gaussian(192)
    user = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    kept = user.clone()
    plain = pipe(latents=user)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    gd.enable_teleport(pipe, model, skip_fraction=SKIP)
    switched = pipe(latents=user)
    assert len(calls) == STEPS - BEGIN and torch.equal(user, kept)  # user latents= are read, never written
    gd.disable_teleport(pipe)
    s = pipe.scheduler  # by hand: teleport the user's noise, then the guided loop over the remaining steps
    s.set_timesteps(STEPS)
    start = gd.teleport_latents(s, model, user, skip_fraction=SKIP)
    x = start.latents
    with torch.no_grad():
        for t in start.timesteps:
            uncond, cond = pipe.unet(s.scale_model_input(torch.cat([x] * 2), t), t).sample.chunk(2)
            x = s.step(uncond + 3.0 * (cond - uncond), t, x).prev_sample
    # Euler: prepare_latents multiplied by init_noise_sigma, the switch divided it out (x * c / c)
    torch.testing.assert_close(switched, x, rtol=1e-5, atol=1e-5)
    assert (switched - plain).abs().max() > 1e-3
    torch.testing.assert_close(pipe(latents=user), plain, rtol=0, atol=0)


def test_image_to_image_pipelines_are_refused():
    class ImageToImage(TinyGuidedPipeline):
        def prepare_latents(self, image, timestep, batch, generator):
            return image

    with pytest.raises(TypeError, match="img2img"):
        gd.enable_teleport(ImageToImage(tiny_unet(8), SCHEDULERS["euler"]()), gaussian(192))
