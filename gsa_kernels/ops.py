"""Public functional API (docs/architecture.md, section 2): the one backend dispatch point.

Every op takes x [B, *shape] with prod(shape) == D and returns outputs with x's shape and
dtype. sigma is a float, a 0-d tensor or a [B] tensor (per-sample noise levels), 0 < sigma with
sigma^2 a normal number of the compute dtype (float32: 1.1e-19 <= sigma <= 1.8e19). Model tensors
are cast to the compute dtype (float64 for float64 x, float32 otherwise) but must be on x's
device. Each call is one kernel launch of the chosen backend (`backend=`: "auto", "reference",
"cpu", "triton" or "cuda"; "auto" picks the fastest real backend for x's device).
"""
from __future__ import annotations

from typing import Union

import torch

from ._core import _backends, _layouts
from ._core._args import (
    PosteriorOperand,
    SpectralKind,
    check_no_grad,
    check_values,
    checks_on_values,
    compute_dtype,
    flatten,
    gaussian_args,
    labeled_args,
    rows,
)

Sigma = Union[float, torch.Tensor]

# the public functions, exported by gsa_kernels/__init__.py as they are listed here
__all__ = ["available_backends", "gaussian_denoise", "gaussian_score", "gaussian_flow", "gaussian_trajectory",
           "mixture_denoise", "mixture_score", "mixture_logp"]


def available_backends() -> tuple:
    """The subset of ("reference", "cpu", "triton", "cuda") usable here."""
    return _backends.available()


# ----------------------------------------------------------------------------- Gaussian ops


def _gaussian_map(x, g, sigma_from, sigma_to, scale_from, scale_to, kind, backend, op, labels=None):
    x2 = flatten(x, g.dim, op)
    B = x2.shape[0]
    flow = kind == SpectralKind.FLOW
    sigma_from = rows(sigma_from, B, x2, "sigma_from" if flow else "sigma", op, allow_inf=flow)
    # denoise and score read sigma_from only: the other per-row tensors are sigma_from itself
    sigma_to = rows(sigma_to, B, x2, "sigma_to", op, allow_zero=True) if flow else sigma_from
    scale_from = rows(scale_from, B, x2, "scale_from", op) if flow else sigma_from
    scale_to = rows(scale_to, B, x2, "scale_to", op) if flow else sigma_from
    if labels is None:
        name, params = "gaussian_map", gaussian_args(g, x2, op)
        basis = params[1]
    else:
        name, params = "gaussian_map_labeled", labeled_args(g, labels, x2, op)
        basis = params[2]
    check_no_grad(op, **{"bases" if labels is not None else "basis": basis},
                            **({"sigma_from": sigma_from, "sigma_to": sigma_to, "scale_from": scale_from,
                                "scale_to": scale_to} if flow else {"sigma": sigma_from}))
    if B == 0:
        return torch.empty_like(x)
    be = _backends.resolve_backend(backend, x2.device)
    kernel = be.kernel(name, x2.device.type)
    layouts = _layouts.gaussian(be.name, g, basis, B) if labels is None else ()
    out = kernel(x2, *params, sigma_from, sigma_to, scale_from, scale_to, int(kind), *layouts)
    return out.reshape(x.shape)


# Every Gaussian op also takes labels=y (int64 [B]) with g a GaussianMixture (one component per
# class): row b then uses component y[b]'s Gaussian (mean, basis, eigvals, residual_var; the log
# weights are ignored) -- class-conditional models.


def gaussian_denoise(x, sigma: Sigma, g, backend: str = "auto", *, labels=None):
    """Posterior mean E[x0 | x] under the Gaussian model g at noise sigma. x [B, *shape].
    labels: int64 [B] with g a GaussianMixture: row b under component labels[b]."""
    return _gaussian_map(x, g, sigma, sigma, 1.0, 1.0, SpectralKind.DENOISE, backend, "gaussian_denoise", labels)


def gaussian_score(x, sigma: Sigma, g, backend: str = "auto", *, labels=None):
    """Score grad_x log p_sigma(x) = -(Sigma + sigma^2 I)^-1 (x - mean). x [B, *shape].
    labels: int64 [B] with g a GaussianMixture: row b under component labels[b]."""
    return _gaussian_map(x, g, sigma, sigma, 1.0, 1.0, SpectralKind.SCORE, backend, "gaussian_score", labels)


def gaussian_flow(x, sigma_from: Sigma, sigma_to: Sigma, g, scale_from: Sigma = 1.0, scale_to: Sigma = 1.0, backend: str = "auto",
                  *, labels=None):
    """Closed-form PF-ODE jump of x from sigma_from to sigma_to (per sample) under the Gaussian
    model g, for states x = scale * (x0 + sigma * eps). sigma_from = math.inf: x is unit noise eps.
    sigma_to = 0 gives the ODE's end point. labels: int64 [B] with g a GaussianMixture: row b
    under component labels[b]."""
    return _gaussian_map(x, g, sigma_from, sigma_to, scale_from, scale_to, SpectralKind.FLOW, backend, "gaussian_flow",
                         labels)


def gaussian_trajectory(x, sigmas, g, backend: str = "auto", *, labels=None):
    """x at sigmas[0] carried by the closed-form flow to every sigma: sigmas [T] (or [T, B]),
    returns [T, B, *shape]. sigmas[0] > 0 and finite (the state at infinite noise is not a
    point: start with gaussian_flow(eps, math.inf, sigmas[0], g)); later sigmas >= 0.
    labels: int64 [B] with g a GaussianMixture: row b under component labels[b]."""
    op = "gaussian_trajectory"
    x2 = flatten(x, g.dim, op)
    B = x2.shape[0]
    sigmas = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas, dtype=torch.float64, device=x2.device)
    if sigmas.dim() not in (1, 2) or sigmas.shape[0] == 0 or (sigmas.dim() == 2 and sigmas.shape[1] != B):
        raise ValueError(f"{op}: sigmas must be [T] or [T, B] with T >= 1, got shape {tuple(sigmas.shape)}")
    if sigmas.device != x2.device:
        raise ValueError(f"{op}: sigmas is on {sigmas.device} but x is on {x2.device}")
    cd = compute_dtype(x2.dtype)
    if checks_on_values(sigmas) and B > 0:
        check_values(sigmas[0], "sigmas[0]", op, allow_zero=False, allow_inf=False, cd=cd)
        check_values(sigmas[1:], "sigmas[1:]", op, allow_zero=True, allow_inf=False, cd=cd)
    sigmas = sigmas.to(cd)
    sigmas = (sigmas[:, None] if sigmas.dim() == 1 else sigmas).expand(sigmas.shape[0], B).contiguous()
    if labels is None:
        name, params = "gaussian_trajectory", gaussian_args(g, x2, op)
        check_no_grad(op, basis=params[1], sigmas=sigmas)
    else:
        name, params = "gaussian_trajectory_labeled", labeled_args(g, labels, x2, op)
        check_no_grad(op, bases=params[2], sigmas=sigmas)
    if B == 0:
        return x.new_empty((sigmas.shape[0],) + tuple(x.shape))
    be = _backends.resolve_backend(backend, x2.device)
    kernel = be.kernel(name, x2.device.type)
    layouts = _layouts.gaussian(be.name, g, params[1], B) if labels is None else ()
    out = kernel(x2, *params, sigmas, *layouts)
    return out.reshape((sigmas.shape[0],) + tuple(x.shape))


# ----------------------------------------------------------------------------- local score machines


def local_posterior(x, sigma: Sigma, m, patch_size: int, mode: int, padding: int, kind: int, backend: str, op: str):
    """One launch of local_posterior for gk.local_denoise / local_score (local.py checks the machine
    m, x [B, C, H, W] on its device and patch_size first). m: its `images` and `operand(dtype)`, the
    images in the compute dtype."""
    B = x.shape[0]
    sigma = rows(sigma, B, x, "sigma", op)  # float, 0-d or [B], checked as every op checks it
    check_no_grad(op, images=m.images, sigma=sigma)
    if B == 0:
        return x.new_empty(x.shape)
    be = _backends.resolve_backend(backend, x.device)
    kernel = be.kernel("local_posterior", x.device.type)  # every backend has one (_contract.REGISTRY)
    images = m.operand(compute_dtype(x.dtype))
    return kernel(x.contiguous(), images, sigma, patch_size, int(mode), int(padding), int(kind))


# ----------------------------------------------------------------------------- mixture ops


def posterior(x2, sigma, m, need_denoised, need_weights, backend, op):
    """(denoised, logp, weights, sigma [B]) for flattened x2 [B, D]: the model's own posterior
    path (in memory or streamed from a file) on the backend resolved here."""
    B = x2.shape[0]
    sigma = rows(sigma, B, x2, "sigma", op)
    if not isinstance(m, PosteriorOperand):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianMixture, got {type(m).__name__}")
    params = m.posterior_args(x2, sigma, op)
    if B == 0:
        cd = compute_dtype(x2.dtype)
        return x2.new_empty(x2.shape), x2.new_empty((0,), dtype=cd), x2.new_empty((0, m.num_components), dtype=cd), sigma
    be = _backends.resolve_backend(backend, x2.device)
    denoised, logp, weights = m.posterior(be, x2, sigma, need_denoised, need_weights, params)
    return denoised, logp, weights, sigma


def mixture_denoise(x, sigma: Sigma, m, return_weights: bool = False, backend: str = "auto"):
    """Posterior mean under the mixture m: sum_k w_k(x) D_k(x). With return_weights, also the
    posterior component weights [B, K]."""
    op = "mixture_denoise"
    denoised, _, weights, _ = posterior(flatten(x, m.dim, op), sigma, m, True, return_weights, backend, op)
    denoised = denoised.reshape(x.shape)
    return (denoised, weights) if return_weights else denoised


def mixture_score(x, sigma: Sigma, m, backend: str = "auto"):
    """Score of the noised mixture: (D(x) - x) / sigma^2. x [B, *shape]."""
    op = "mixture_score"
    # (D - x) / sigma^2 cancels at small sigma: the denoiser must come back in the compute
    # dtype, not rounded to a 16-bit x's dtype first, so the kernel reads x in the compute dtype
    x2 = flatten(x, m.dim, op)
    x2 = x2.to(compute_dtype(x2.dtype))
    denoised, _, _, sigma = posterior(x2, sigma, m, True, False, backend, op)
    if x.shape[0] == 0:
        return torch.empty_like(x)
    return ((denoised - x2) / (sigma * sigma)[:, None]).to(x.dtype).reshape(x.shape)


def mixture_logp(x, sigma: Sigma, m, backend: str = "auto"):
    """log p_sigma(x) of the noised mixture, [B] in the compute dtype."""
    op = "mixture_logp"
    _, logp, _, _ = posterior(flatten(x, m.dim, op), sigma, m, False, False, backend, op)
    return logp
