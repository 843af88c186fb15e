"""Noise schedules and conversions between diffusion conventions.

Every convention is written as scaled EDM states `x_t = scale(t) * (x0 + sigma(t) * eps)`
(docs/architecture.md, section 1), so one closed-form flow serves them all:

    EDM / VE:         scale = 1,               sigma = sigma
    VP / DDPM:        scale = sqrt(abar),      sigma = sqrt((1 - abar) / abar)    (abar = alphas_cumprod)
    rectified flow:   scale = 1 - t,           sigma = t / (1 - t)                (x_t = (1 - t) x0 + t eps)

The conversions take floats or tensors; tensors are computed in their own dtype, so pass
float64 where the ends of the range matter (abar near 0, t near 1).
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch

Value = Union[float, torch.Tensor]


def karras(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM/Karras sigmas (Karras et al. 2022, eq. 5): float64 [num_steps + 1], descending from
    sigma_max to sigma_min, then a final 0."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not (0 < sigma_min <= sigma_max < math.inf):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)])


def truncate(sigmas, sigma: float) -> torch.Tensor:
    """The tail of a descending schedule that starts at `sigma`: [sigma, every sigmas[i] < sigma].
    With sigma on the grid this is sigmas[i:]; off the grid the first step is shorter.
    The dtype of sigmas is kept (a list becomes float64)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64) if not isinstance(sigmas, torch.Tensor) else sigmas
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-d schedule, got shape {tuple(s.shape)}")
    sigma = float(sigma)
    if not (0 <= sigma <= float(s[0])):
        raise ValueError(f"sigma must be in [0, sigmas[0] = {float(s[0]):.4g}], got {sigma}")
    below = s[s < sigma]
    return torch.cat([s.new_tensor([sigma]), below])


def skip_index(num_steps: int, fraction: float) -> int:
    """Number of steps replaced by a teleport that skips `fraction` of num_steps: rounded half
    up (the 1e-9 absorbs binary fractions like 0.3 * 25 = 7.4999...), at most num_steps - 1."""
    if not 0 <= fraction < 1:
        raise ValueError(f"skip fraction must be in [0, 1), got {fraction}")
    return min(math.floor(fraction * num_steps + 0.5 + 1e-9), num_steps - 1)


# ----------------------------------------------------------------------------- VP / DDPM


def from_alphas_cumprod(alphas_cumprod: Value) -> Tuple[Value, Value]:
    """VP/DDPM alphas_cumprod (abar in (0, 1]) -> (scale, sigma) = (sqrt(abar), sqrt((1 - abar)/abar))."""
    a = _check(alphas_cumprod, "alphas_cumprod", lo=0.0, hi=1.0, lo_open=True)
    if isinstance(a, torch.Tensor):
        return a.sqrt(), ((1 - a) / a).sqrt()
    return math.sqrt(a), math.sqrt((1 - a) / a)


def to_alphas_cumprod(sigma: Value) -> Value:
    """EDM sigma >= 0 -> VP alphas_cumprod = 1 / (1 + sigma^2); the VP scale is its square root,
    i.e. x_vp = x_ve / sqrt(1 + sigma^2)."""
    s = _check(sigma, "sigma", lo=0.0, hi=math.inf)
    return 1 / (1 + s * s)


# ----------------------------------------------------------------------------- rectified flow


def from_flow_t(t: Value) -> Tuple[Value, Value]:
    """Rectified-flow time t in [0, 1) (x_t = (1 - t) x0 + t eps) -> (scale, sigma) = (1 - t, t / (1 - t))."""
    t = _check(t, "t", lo=0.0, hi=1.0, hi_open=True)
    return 1 - t, t / (1 - t)


def to_flow_t(sigma: Value) -> Value:
    """EDM sigma >= 0 -> rectified-flow time t = sigma / (1 + sigma) (scale 1 - t = 1 / (1 + sigma));
    sigma = inf gives t = 1."""
    s = _check(sigma, "sigma", lo=0.0, hi=math.inf, allow_inf=True)
    if isinstance(s, torch.Tensor):
        return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))
    return 1.0 if math.isinf(s) else s / (1 + s)


def _check(v, name, lo, hi, lo_open=False, hi_open=False, allow_inf=False):
    if isinstance(v, torch.Tensor):
        if not v.is_floating_point():
            v = v.double()
        vals = v.detach()
        bad = torch.isnan(vals) | (vals < lo) | (vals > hi)
        if lo_open:
            bad |= vals == lo
        if hi_open:
            bad |= vals == hi
        if not allow_inf:
            bad |= torch.isinf(vals)
        if bad.any():
            raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {vals[bad].flatten()[0].item()}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(v).__name__}")
    v = float(v)
    if (math.isnan(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi)
            or (not allow_inf and math.isinf(v))):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v}")
    return v
