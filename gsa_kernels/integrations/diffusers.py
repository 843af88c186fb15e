"""Teleport a latent into a diffusers scheduler and let it run the remaining timesteps.

Supported schedulers and the state their `sample` holds at noise level s = scheduler.sigmas[i]:

    EulerDiscreteScheduler                       x0 + s eps                        (scale 1, sigma s)
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler                      (x0 + s eps) / sqrt(1 + s^2)      (VP; sigma s)
    FlowMatchEulerDiscreteScheduler (and the two
    above with use_flow_sigmas=True)             (1 - s) x0 + s eps                (rectified flow, t = s)
    DDIMScheduler, DDPMScheduler                 sqrt(abar) x0 + sqrt(1 - abar) eps, abar = alphas_cumprod[t]
                                                 (VP; sigma sqrt((1 - abar) / abar); these have no sigmas)

Usage (after `scheduler.set_timesteps(...)`, instead of `latents = noise * init_noise_sigma`):

    start = teleport_latents(scheduler, g, noise, skip_fraction=0.3)   # noise: unit randn
    latents = start.latents            # already in the scheduler's scale: do not multiply by init_noise_sigma
    for t in start.timesteps:          # scheduler.timesteps[begin_index:], set_begin_index done
        eps = unet(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents).prev_sample

Class-conditional (a UNet taking class_labels=y): m = GaussianMixture.fit_per_class(data, labels)
and `teleport_latents(scheduler, m, noise, skip_fraction=0.3, labels=y)`: each row jumps with its
class's Gaussian; then `unet(..., t, class_labels=y)` as usual.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import diffusers  # noqa: F401  (fail early with ImportError when the extra is missing)
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from .. import schedules
from .._core._format import check_shape
from ..models import GaussianMixture, GaussianModel
from ..sampling import teleport_with_model

__all__ = ["noise_level", "teleport_latents", "TeleportedLatents", "DenoiserAsDiffusersModel", "enable_teleport",
           "disable_teleport"]

_VE = (EulerDiscreteScheduler,)
_VP = (DPMSolverMultistepScheduler, UniPCMultistepScheduler)
_FLOW = (FlowMatchEulerDiscreteScheduler,)
_ALPHAS = (DDIMScheduler, DDPMScheduler)  # indexed by integer timestep into alphas_cumprod


def _convention(scheduler) -> str:
    if isinstance(scheduler, _FLOW) or (isinstance(scheduler, _VP) and scheduler.config.get("use_flow_sigmas", False)):
        return "flow"
    if isinstance(scheduler, _VE):
        return "ve"
    if isinstance(scheduler, _VP):
        return "vp"
    if isinstance(scheduler, _ALPHAS):
        return "alphas"
    raise TypeError(f"unsupported scheduler {type(scheduler).__name__}: supported are "
                    + ", ".join(c.__name__ for c in _VE + _VP + _FLOW + _ALPHAS))


def _alphas_level(scheduler, timestep):
    """(scale, sigma) of DDIM / DDPM at integer timestep(s): sqrt(abar), sqrt((1 - abar) / abar)."""
    abar = scheduler.alphas_cumprod.double().cpu()[torch.as_tensor(timestep).long().cpu()]
    return abar.sqrt(), ((1 - abar) / abar).sqrt()


def _check_ready(scheduler):
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(...) first")


def noise_level(scheduler, index: int):
    """(scale, sigma) of the scheduler's sample at timesteps[index] in the EDM form
    sample = scale * (x0 + sigma * eps); sigma = math.inf (scale 0) for the pure-noise start of
    a flow-matching schedule."""
    kind = _convention(scheduler)
    _check_ready(scheduler)
    if kind == "alphas":
        scale, sigma = _alphas_level(scheduler, scheduler.timesteps[index])
        return scale.item(), sigma.item()
    s = float(scheduler.sigmas[index])
    if kind == "ve":
        return 1.0, s
    if kind == "vp":
        return 1.0 / math.sqrt(1.0 + s * s), s
    if s >= 1.0:
        return 0.0, math.inf
    return schedules.from_flow_t(s)


@dataclass
class TeleportedLatents:
    """latents: the sample at timesteps[begin_index], in the scheduler's scale; timesteps: the
    timesteps still to run (scheduler.timesteps[begin_index:]); sigma: its EDM noise level."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    begin_index: int
    sigma: float


def teleport_latents(scheduler, gaussian, noise: torch.Tensor, *, skip_fraction: Optional[float] = None,
                     begin_index: Optional[int] = None, labels: Optional[torch.Tensor] = None) -> TeleportedLatents:
    """Jump unit noise [B, *shape] along the closed-form PF-ODE of `gaussian` (a GaussianModel,
    or a GaussianMixture: its moment-matched Gaussian) to the noise level of
    scheduler.timesteps[begin_index] (or begin_index = schedules.skip_index(steps, skip_fraction)),
    scaled for this scheduler, and set the scheduler's begin index. Call after set_timesteps.
    labels [B] int64 (class-conditional): a GaussianMixture `gaussian` is one component per class
    (GaussianMixture.fit_per_class) and row b jumps with component labels[b]."""
    _check_ready(scheduler)
    n = len(scheduler.timesteps)
    if (skip_fraction is None) == (begin_index is None):
        raise ValueError("give exactly one of skip_fraction and begin_index")
    if begin_index is None:
        begin_index = schedules.skip_index(n, skip_fraction)
    if not 0 <= begin_index < n:
        raise ValueError(f"begin_index must be in [0, {n}), got {begin_index}")
    scale, sigma = noise_level(scheduler, begin_index)
    if math.isinf(sigma):  # the flow schedule's t = 1: the state is the noise itself
        latents = noise.clone()
    else:
        latents = teleport_with_model(noise, math.inf, sigma, None, gaussian, labels, 1.0, scale)
    if hasattr(scheduler, "set_begin_index"):  # DDIM / DDPM step from the timestep itself
        scheduler.set_begin_index(begin_index)
    return TeleportedLatents(latents, scheduler.timesteps[begin_index:], begin_index, sigma)


class DenoiserAsDiffusersModel:
    """A denoiser f(x, sigma) -> x0 in the EDM convention (GaussianModel, GaussianMixture, an
    EDM network) as a diffusers model `model(model_input, timestep) -> prediction` for one
    scheduler: it maps the (scaled) model input and timestep to (x, sigma), and answers in the
    scheduler's prediction_type ("epsilon", "v_prediction", "sample", "flow_prediction";
    flow-matching schedulers: velocity eps - x0). timestep: a scalar or [B] from
    scheduler.timesteps. Class-conditional as diffusers' UNets are: `class_labels=y` reaches the
    denoiser as `denoiser(x, sigma, labels=y)`. `calls` counts evaluations."""

    def __init__(self, denoiser, scheduler):
        self.denoiser, self.scheduler = denoiser, scheduler
        self.kind = _convention(scheduler)
        self.calls = 0

    def _sigmas(self, timestep, batch):
        ts = self.scheduler.timesteps.double().cpu()
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu().expand(batch)
        index = (ts[None, :] - t[:, None]).abs().argmin(1)
        return self.scheduler.sigmas.double().cpu()[index]

    def __call__(self, model_input: torch.Tensor, timestep, class_labels=None, **kwargs):
        self.calls += 1
        if class_labels is not None:
            kwargs["labels"] = class_labels
        B = model_input.shape[0]
        if self.kind == "alphas":
            t = torch.as_tensor(timestep).reshape(-1).expand(B)
            scale, sigma = _alphas_level(self.scheduler, t)
        else:
            s = self._sigmas(timestep, B)
        if self.kind == "alphas":
            pass
        elif self.kind == "flow":
            # t = 1 is the pure-noise end (sigma = inf); evaluate just below it
            t = s.clamp(max=1 - 1e-7)
            sigma, scale = t / (1 - t), 1 - t
        else:  # Euler's scale_model_input and the VP schedulers both hand over x_ve / sqrt(1 + s^2)
            sigma, scale = s, 1 / (1 + s * s).sqrt()
        cd = torch.float64 if model_input.dtype == torch.float64 else torch.float32
        sigma, scale = sigma.to(model_input.device, cd), scale.to(model_input.device, cd)
        view = (B,) + (1,) * (model_input.dim() - 1)
        x = model_input.to(cd) / scale.reshape(view)
        x0 = self.denoiser(x, sigma, **kwargs).to(cd)
        eps = (x - x0) / sigma.reshape(view)
        pred = self.scheduler.config.get("prediction_type", "epsilon")
        if self.kind == "flow" or pred == "flow_prediction":
            out = eps - x0
        elif pred == "epsilon":
            out = eps
        elif pred == "sample":
            out = x0
        elif pred == "v_prediction":  # v = alpha_t eps - sigma_t x0 with alpha_t = scale, sigma_t = sigma * scale
            out = scale.reshape(view) * (eps - sigma.reshape(view) * x0)
        else:
            raise ValueError(f"unsupported prediction_type {pred!r}")
        return out.to(model_input.dtype)


# ----------------------------------------------------------------------------- the pipeline switch


class _Teleport:
    """What enable_teleport attached to a pipeline: the model, the skip, the wrapped scheduler,
    the hooks; per call, the begin index (set by set_timesteps) and whether the jump is pending."""

    def __init__(self, pipe, model, skip_fraction, labels):
        self.model, self.skip_fraction, self.labels = model, skip_fraction, labels
        self.data_meta = {}  # fit_cli.load_stats's metadata: the shape the statistics were fitted on
        self.real = pipe.scheduler
        self.proxy = _TeleportingScheduler(self.real, self)
        self.begin, self.pending, self.noise_scale = None, False, 1.0
        self.hooks, self.wrapped_prepare = [], False

    def arm(self):
        """After the pipeline's set_timesteps: pick the begin index, arm the jump."""
        n = len(self.real.timesteps)
        self.begin = schedules.skip_index(n, self.skip_fraction)
        self.pending = True
        if hasattr(self.real, "set_begin_index"):
            self.real.set_begin_index(self.begin)

    def jumped(self, start: torch.Tensor) -> torch.Tensor:
        """The pipeline's starting latents (unit noise times the init_noise_sigma it read) jumped
        to timesteps[begin], in the scheduler's scale, in start's dtype."""
        self.pending = False
        check_shape(self.data_meta, start.shape[1:], "enable_teleport")
        cd = torch.float64 if start.dtype == torch.float64 else torch.float32
        noise = start.to(cd) if self.noise_scale == 1.0 else start.to(cd) / self.noise_scale
        if self.model.device != start.device:  # pipe.to("cuda") after enable_teleport: follow the latents
            self.model = self.model.to(start.device)
        labels = self.labels.to(start.device) if isinstance(self.labels, torch.Tensor) else self.labels
        out = teleport_latents(self.real, self.model, noise, begin_index=self.begin, labels=labels)
        return out.latents.to(start.dtype)

    def jump_in_place(self, sample):
        # DDIM / DDPM / LDM pipelines keep their starting tensor in a local variable and hand that
        # very tensor to scale_model_input or the network first: it is overwritten where it lies
        if self.pending and isinstance(sample, torch.Tensor):
            sample.copy_(self.jumped(sample))


class _TeleportingScheduler:
    """pipe.scheduler while teleport is on: the pipeline's own scheduler (its methods run on it,
    with every timestep), except that set_timesteps also sets the begin index, `timesteps` lists
    only the timesteps still to run (what the pipeline's loop iterates), init_noise_sigma is
    remembered as read, and the first scale_model_input does the jump."""

    def __init__(self, real, state):
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_state", state)

    @property
    def __class__(self):  # isinstance(pipe.scheduler, DDIMScheduler) still holds
        return type(self._real)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __setattr__(self, name, value):
        setattr(self._real, name, value)

    @property
    def timesteps(self):
        ts = self._real.timesteps
        return ts if self._state.begin is None else ts[self._state.begin:]

    @property
    def init_noise_sigma(self):
        value = self._real.init_noise_sigma
        self._state.noise_scale = float(value)
        return value

    def set_timesteps(self, *args, **kwargs):
        out = self._real.set_timesteps(*args, **kwargs)
        self._state.arm()
        return out

    def scale_model_input(self, sample, *args, **kwargs):
        self._state.jump_in_place(sample)
        return self._real.scale_model_input(sample, *args, **kwargs)

    def __repr__(self):
        return f"teleporting({self._real!r})"


_NETWORKS = ("unet", "transformer")


def _rescaled(model, scale, shift):
    """The model of (x - shift) * scale for a model of x (GaussianModel or GaussianMixture)."""
    c2 = scale * scale
    if isinstance(model, GaussianModel):
        return GaussianModel((model.mean - shift) * scale, model.basis, model.eigvals * c2, model.residual_var * c2)
    return GaussianMixture((model.means - shift) * scale, model.bases, model.eigvals * c2,
                           model.residual_var * c2, model.log_weights)


def enable_teleport(pipe, model, skip_fraction: float = 0.2, labels: Optional[torch.Tensor] = None, *,
                    fitted_on: str = "latents"):
    """Switch a diffusers pipeline to analytical teleportation: from now on the pipeline's own
    __call__ draws its starting noise as usual (generator= / latents= as given), jumps it along
    the closed-form PF-ODE of `model` (GaussianModel, or GaussianMixture: its moment-matched
    Gaussian, or with labels [B] one component per class) over the first `skip_fraction` of its
    timesteps, and runs the network only for the remaining ones. Undo with disable_teleport(pipe).

    Works for pipelines that draw their latents with `prepare_latents` (the Stable-Diffusion
    family) and for those whose loop hands the drawn tensor itself to scheduler.scale_model_input
    or to pipe.unet / pipe.transformer (DDIMPipeline, DDPMPipeline, LDMPipeline); schedulers: the
    ones teleport_latents supports (module docstring). Set the pipeline's scheduler before this
    call. The starting noise is taken as what the pipeline drew times the init_noise_sigma it
    read. fitted_on: "latents" (the model describes the latents the pipeline's loop works on) or
    "vae" (raw VAE encodings: scaled here as the pipeline scales them, (z - shift_factor) *
    scaling_factor of pipe.vae or pipe.vqvae)."""
    if not isinstance(model, (GaussianModel, GaussianMixture)):
        raise TypeError(f"model must be a GaussianModel or a GaussianMixture, got {type(model).__name__}")
    schedules.skip_index(2, skip_fraction)  # raises for a fraction outside [0, 1)
    if not hasattr(pipe, "scheduler"):
        raise TypeError(f"{type(pipe).__name__} has no scheduler: not a diffusers pipeline")
    original_model = model
    if fitted_on not in ("latents", "vae"):
        raise ValueError(f"fitted_on must be 'latents' or 'vae', got {fitted_on!r}")
    if fitted_on == "vae":
        vae = getattr(pipe, "vae", None) or getattr(pipe, "vqvae", None)
        if vae is None:
            raise ValueError(f"fitted_on='vae' but {type(pipe).__name__} has no vae / vqvae")
        model = _rescaled(model, float(getattr(vae.config, "scaling_factor", None) or 1.0),
                          float(getattr(vae.config, "shift_factor", None) or 0.0))
    if getattr(pipe, "_gk_teleport", None) is not None:
        disable_teleport(pipe)
    _convention(pipe.scheduler)  # TypeError naming the supported schedulers
    state = _Teleport(pipe, model, skip_fraction, labels)
    state.data_meta = getattr(original_model, "data_meta", None) or {}
    if callable(getattr(pipe, "prepare_latents", None)):
        original = pipe.prepare_latents
        params = inspect.signature(original).parameters
        if "image" in params or "timestep" in params:
            raise TypeError(f"{type(pipe).__name__} starts from an image (img2img / inpainting: prepare_latents takes "
                            "image / timestep); teleport replaces the pure-noise start of text- or class-to-image "
                            "pipelines only")

        def prepare_latents(*args, **kwargs):
            out = original(*args, **kwargs)
            if state.pending and isinstance(out, torch.Tensor):
                return state.jumped(out)  # a new tensor: user latents= are never written to
            return out

        object.__setattr__(pipe, "prepare_latents", prepare_latents)
        state.wrapped_prepare = True
    networks = [getattr(pipe, n) for n in _NETWORKS if isinstance(getattr(pipe, n, None), torch.nn.Module)]
    if not networks and not state.wrapped_prepare:
        raise TypeError(f"{type(pipe).__name__} has neither prepare_latents nor a unet / transformer to hook")

    def before_network(module, args, kwargs):
        state.jump_in_place(args[0] if args else kwargs.get("sample", kwargs.get("hidden_states")))

    state.hooks = [net.register_forward_pre_hook(before_network, with_kwargs=True) for net in networks]
    object.__setattr__(pipe, "scheduler", state.proxy)  # past DiffusionPipeline's config update
    object.__setattr__(pipe, "_gk_teleport", state)
    return pipe


def disable_teleport(pipe):
    """Undo enable_teleport: the pipeline's own scheduler back, hooks removed. No-op if off."""
    state = getattr(pipe, "_gk_teleport", None)
    if state is None:
        return pipe
    for h in state.hooks:
        h.remove()
    if state.wrapped_prepare:
        pipe.__dict__.pop("prepare_latents", None)
    if pipe.__dict__.get("scheduler") is state.proxy:
        object.__setattr__(pipe, "scheduler", state.real)
    if hasattr(state.real, "_begin_index"):
        state.real._begin_index = None
    object.__setattr__(pipe, "_gk_teleport", None)
    return pipe
