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
    MixtureOperand,
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


def posterior(x2, sigma, m, need_denoised, need_weights, backend, op, score=False):
    """(denoised, logp, weights, sigma [B]) for flattened x2 [B, D]: the model's own posterior
    path (in memory or streamed from a file) on the backend resolved here. score=True: the first
    output is the score instead, by stable_score applied to each kernel launch of that path (x2
    in the compute dtype)."""
    B = x2.shape[0]
    sigma = rows(sigma, B, x2, "sigma", op)
    if not isinstance(m, PosteriorOperand):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianMixture, got {type(m).__name__}")
    params = m.posterior_args(x2, sigma, op)
    if B == 0:
        cd = compute_dtype(x2.dtype)
        return x2.new_empty(x2.shape), x2.new_empty((0,), dtype=cd), x2.new_empty((0, m.num_components), dtype=cd), sigma
    be = _backends.resolve_backend(backend, x2.device)
    rule = None
    if score:
        need_denoised, rule = True, stable_score
        # the rule reads the weights of the rows it corrects: along with the launch when small
        # (one pass), else it asks again for those rows only. Streamed blocks bring their own.
        need_weights = need_weights or (isinstance(m, MixtureOperand) and B * m.num_components <= SCORE_WEIGHTS_ALONG)
    denoised, logp, weights = m.posterior(be, x2, sigma, need_denoised, need_weights, params, score_rule=rule)
    return denoised, logp, weights, sigma


# ----------------------------------------------------------------------------- the stable score
# The score (D - x) / sigma^2 cancels where the posterior mean D is close to x (small sigma): D
# carries its rounding eps |D|, so the score's relative error is eps |x| / |D - x| -- 6e-3 in
# float32 at sigma 0.002 for a one-component mixture with residual variance, where the Gaussian
# ops' per-direction form -(Sigma + sigma^2 I)^-1 (x - mu) is good to a few ulps. The mixture
# score is sum_k w_k s_k(x) with s_k that form (sum_k w_k = 1), so the rows where (D - x) lost
# more than CANCELLATION_BITS bits take it, over the components with weight above
# PAIR_WEIGHT_FLOOR; a row with more than PAIRS_PER_ROW of those (a dense posterior with D near
# x: duplicated points) is recomputed in float64 instead. Every other row keeps (D - x) / sigma^2.
# One rule for every path: applied to each kernel launch (an in-memory mixture, each block of a
# points file, each shard of gk.mixture_partial / gk.distributed), whose state then carries the
# launch's score where it would carry its denoised mean (the merge is linear in it).

CANCELLATION_BITS = 4  # |D - x| < |x| / 16: (D - x) / sigma^2 has lost over 4 bits to rounding
PAIR_WEIGHT_FLOOR = 1e-12  # components below it are left out of sum_k w_k s_k
PAIRS_PER_ROW = 32
SCORE_WEIGHTS_ALONG = 2**21  # B K at most this: the launch returns the weights (8 MiB float32)
STABLE_BUDGET_BYTES = 64 * 2**20  # per chunk of corrected rows: their weights and pair scores


def stable_score(be, x2, sigma, comps, den, weights):
    """The score of one kernel launch of the mixture posterior (the rule above): x2 [B, D] and
    sigma [B] as the launch got them (compute dtype), comps its (means, bases, eigvals,
    residual_var, log_weights), den its denoised [B, D], weights its weights [B, k] or an empty
    tensor (then recomputed for the rows that need them). Differentiable like the ops it calls:
    the weights through the posterior op, s_k through the labelled Gaussian op (so the gradient
    is that of the same function). Under torch.compile (data-dependent rows) and for rows with
    NaN, (D - x) / sigma^2 as it is."""
    s2 = sigma * sigma
    diff = den - x2
    score = diff / s2[:, None]
    if torch.compiler.is_compiling():
        return score
    flagged = (2.0**CANCELLATION_BITS) * diff.norm(dim=1) < x2.norm(dim=1)  # NaN rows: False
    fix = flagged.nonzero()[:, 0]
    if fix.numel() == 0:
        return score
    D, K = x2.shape[1], comps[0].shape[0]
    dev = x2.device.type
    posterior_kernel, labeled = be.kernel("mixture_posterior", dev), be.kernel("gaussian_map_labeled", dev)
    per_row = 4 * max(K, 2 * PAIRS_PER_ROW * D)  # bytes per corrected row: weights, pair inputs and scores
    fixed = []
    for rows_ in fix.split(max(1, STABLE_BUDGET_BYTES // per_row)):
        xr, sr = x2[rows_], sigma[rows_]
        w = weights[rows_] if weights.numel() else posterior_kernel(xr, *comps, sr, False, True)[2]
        keep = w > PAIR_WEIGHT_FLOOR
        few = keep.sum(1) <= PAIRS_PER_ROW
        pr, pk = (keep & few[:, None]).nonzero(as_tuple=True)
        order = torch.argsort(pk, stable=True)  # pairs grouped by component: the cpu kernel's views, no gathers
        pr, pk = pr[order], pk[order]
        part = torch.zeros_like(xr)
        if pr.numel():
            sp = sr[pr]
            s_pairs = labeled(xr[pr], pk, *comps[:4], sp, sp, sp, sp, int(SpectralKind.SCORE))
            part = part.index_add(0, pr, w[pr, pk][:, None] * s_pairs)
        many = (~few).nonzero()[:, 0]
        if many.numel():
            if x2.dtype == torch.float64:  # nothing more exact to recompute in: keep the row
                redo = score[rows_][many]
            else:  # the model cast to float64 (exact), then rounded once
                x64, s64 = xr[many].double(), sr[many].double()
                den64 = posterior_kernel(x64, *(c.double() for c in comps), s64, True, False)[0]
                redo = ((den64 - x64) / (s64 * s64)[:, None]).to(x2.dtype)
            part = part.index_put((many,), redo)
        fixed.append(part)
    return score.index_put((fix,), torch.cat(fixed))


def mixture_denoise(x, sigma: Sigma, m, return_weights: bool = False, backend: str = "auto"):
    """Posterior mean under the mixture m: sum_k w_k(x) D_k(x). With return_weights, also the
    posterior component weights [B, K]."""
    op = "mixture_denoise"
    denoised, _, weights, _ = posterior(flatten(x, m.dim, op), sigma, m, True, return_weights, backend, op)
    denoised = denoised.reshape(x.shape)
    return (denoised, weights) if return_weights else denoised


def mixture_score(x, sigma: Sigma, m, backend: str = "auto"):
    """Score of the noised mixture, sum_k w_k(x) s_k(x) = (D(x) - x) / sigma^2. x [B, *shape].
    Where (D - x) / sigma^2 would cancel (small sigma), the rows take the components' scores
    s_k in the Gaussian ops' stable form (stable_score)."""
    op = "mixture_score"
    # the kernel reads x in the compute dtype: a 16-bit x's denoiser rounded to its dtype first
    # would be amplified by 1 / sigma^2
    x2 = flatten(x, m.dim, op)
    x2 = x2.to(compute_dtype(x2.dtype))
    score, _, _, _ = posterior(x2, sigma, m, True, False, backend, op, score=True)
    if x.shape[0] == 0:
        return torch.empty_like(x)
    return score.to(x.dtype).reshape(x.shape)


def mixture_logp(x, sigma: Sigma, m, backend: str = "auto"):
    """log p_sigma(x) of the noised mixture, [B] in the compute dtype."""
    op = "mixture_logp"
    _, logp, _, _ = posterior(flatten(x, m.dim, op), sigma, m, False, False, backend, op)
    return logp
