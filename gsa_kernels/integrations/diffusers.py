"""Teleport a latent into a diffusers scheduler and let it run the remaining timesteps.

Supported schedulers and the state their `sample` holds at noise level s = scheduler.sigmas[i]:

    EulerDiscreteScheduler                       x0 + s eps                        (scale 1, sigma s)
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler                      (x0 + s eps) / sqrt(1 + s^2)      (VP; sigma s)
    FlowMatchEulerDiscreteScheduler (and the two
    above with use_flow_sigmas=True)             (1 - s) x0 + s eps                (rectified flow, t = s)

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

import math
from dataclasses import dataclass
from typing import Optional

import diffusers  # noqa: F401  (fail early with ImportError when the extra is missing)
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from .. import schedules
from ..sampling import _teleport_model

__all__ = ["noise_level", "teleport_latents", "TeleportedLatents", "DenoiserAsDiffusersModel"]

_VE = (EulerDiscreteScheduler,)
_VP = (DPMSolverMultistepScheduler, UniPCMultistepScheduler)
_FLOW = (FlowMatchEulerDiscreteScheduler,)


def _convention(scheduler) -> str:
    if isinstance(scheduler, _FLOW) or (isinstance(scheduler, _VP) and scheduler.config.get("use_flow_sigmas", False)):
        return "flow"
    if isinstance(scheduler, _VE):
        return "ve"
    if isinstance(scheduler, _VP):
        return "vp"
    raise TypeError(f"unsupported scheduler {type(scheduler).__name__}: supported are "
                    + ", ".join(c.__name__ for c in _VE + _VP + _FLOW))


def _check_ready(scheduler):
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(...) first")


def noise_level(scheduler, index: int):
    """(scale, sigma) of the scheduler's sample at timesteps[index] in the EDM form
    sample = scale * (x0 + sigma * eps); sigma = math.inf (scale 0) for the pure-noise start of
    a flow-matching schedule."""
    kind = _convention(scheduler)
    _check_ready(scheduler)
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
        latents = _teleport_model(noise, math.inf, sigma, None, gaussian, labels, 1.0, scale)
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
        s = self._sigmas(timestep, B)
        if self.kind == "flow":
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
