"""Readable PyTorch oracle of every op (DESIGN.md section 1). float32 and float64.

Every compiled / Triton kernel is tested against these functions, and these functions are tested
against independent code (torch.distributions densities and autograd, numerical ODE integration)
in tests/test_reference.py. Written for clarity, not speed: plain tensor algebra in the dtype of
the inputs (float16/bfloat16 inputs are computed in float32).

Shapes: x [B, D]; sigma [B] (per-row); Gaussian: mean [D], basis [D, r] orthonormal columns,
eigvals [r], residual_var float; mixture: means [K, D], bases [K, D, r], eigvals [K, r],
residual_var [K], log_weights [K] (normalised: logsumexp = 0).
"""
from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def _compute(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _col(v, x):
    """[B] per-row values -> [B, 1] in x's compute dtype."""
    return v.to(_compute(x).dtype).reshape(-1, 1)


def _split(y, basis):
    """c = U^T y and the in-span part U c of rows y [B, D]."""
    c = y @ basis
    return c, c @ basis.T


def gaussian_denoise(x, sigma, mean, basis, eigvals, residual_var):
    """E[x0 | x] for x = x0 + sigma eps, x0 ~ N(mean, U diag(eigvals) U^T + residual_var P_perp).
    [B, D] -> [B, D]."""
    xc = _compute(x)
    s2 = _col(sigma, x) ** 2
    y = xc - mean
    c, in_span = _split(y, basis)
    shrink = eigvals / (eigvals + s2)  # [B, r]
    perp = residual_var / (residual_var + s2)  # [B, 1]
    out = mean + (c * shrink) @ basis.T + perp * (y - in_span)
    return out.to(x.dtype)


def gaussian_score(x, sigma, mean, basis, eigvals, residual_var):
    """grad_x log p_sigma(x) = -(Sigma + sigma^2 I)^-1 (x - mean). [B, D] -> [B, D]."""
    xc = _compute(x)
    s2 = _col(sigma, x) ** 2
    y = xc - mean
    c, in_span = _split(y, basis)
    out = -(c / (eigvals + s2)) @ basis.T - (y - in_span) / (residual_var + s2)
    return out.to(x.dtype)


def gaussian_flow(x, sigma_from, sigma_to, mean, basis, eigvals, residual_var, scale_from, scale_to):
    """Closed-form solution of the PF-ODE dx/ds = (x - D(x, s)) / s from sigma_from to sigma_to,
    for scaled states x_t = scale(t) (x0 + sigma(t) eps). sigma_from = inf: x is unit noise.
    All of sigma_from, sigma_to, scale_from, scale_to are [B]. [B, D] -> [B, D]."""
    xc = _compute(x)
    sa, sb = _col(sigma_from, x), _col(sigma_to, x)
    ka, kb = _col(scale_from, x), _col(scale_to, x)
    from_noise = torch.isinf(sa)
    sa_finite = torch.where(from_noise, torch.ones_like(sa), sa)
    # finite start: y = x/scale - mean, gain psi = sqrt((lam + sb^2) / (lam + sa^2))
    y = torch.where(from_noise, xc, xc / ka - mean)
    c, in_span = _split(y, basis)
    gain = torch.where(from_noise, torch.sqrt(eigvals + sb**2), torch.sqrt((eigvals + sb**2) / (eigvals + sa_finite**2)))
    gain_perp = torch.where(
        from_noise,
        torch.sqrt(residual_var + sb**2),
        torch.sqrt((residual_var + sb**2) / (residual_var + sa_finite**2)),
    )
    out = mean + (c * gain) @ basis.T + gain_perp * (y - in_span)
    return (kb * out).to(x.dtype)


def gaussian_trajectory(x, sigmas, mean, basis, eigvals, residual_var):
    """x at sigmas[0] carried to every sigmas[t]: sigmas [T, B] -> [T, B, D]."""
    one = torch.ones_like(sigmas[0])
    return torch.stack([gaussian_flow(x, sigmas[0], s, mean, basis, eigvals, residual_var, one, one) for s in sigmas])


def _component_terms(x, s2, means, bases, eigvals, residual_var):
    """For a chunk of components: y = x - mu_k [B, k, D], c = U_k^T y [B, k, r], and
    log N(x; mu_k, Sigma_k + s^2 I) [B, k]. |y|^2 is summed from the differences directly
    (not expanded as |x|^2 - 2 x.mu + |mu|^2) so that small-sigma logits stay exact."""
    D, r = means.shape[1], bases.shape[2]
    y = x[:, None, :] - means[None]
    c = torch.einsum("bkd,kdr->bkr", y, bases)
    s2b = s2[:, :, None]  # [B, 1, 1]
    v_low = eigvals[None] + s2b  # [B, k, r]
    v_perp = residual_var[None] + s2  # [B, k]
    # |P_perp y|^2 summed directly: |y|^2 - |c|^2 would carry c^T (U^T U - I) c of a rounded
    # basis, which the 1/sigma^2 of the logits blows up at small sigma
    resid = torch.zeros_like(y[..., 0]) if r == D else ((y - torch.einsum("bkr,kdr->bkd", c, bases)) ** 2).sum(-1)
    logpdf = -0.5 * (
        (c * c / v_low).sum(-1) + resid / v_perp + torch.log(v_low).sum(-1) + (D - r) * torch.log(v_perp) + D * LOG_2PI
    )
    return y, c, logpdf


def _chunks(K, B, D):
    step = max(1, (1 << 24) // max(1, B * D))  # keep [B, k, D] temporaries ~16M elements
    return [slice(k, min(K, k + step)) for k in range(0, K, step)]


def mixture_posterior(x, sigma, means, bases, eigvals, residual_var, log_weights):
    """Posterior over the components of a low-rank Gaussian mixture at noise sigma.
    Returns (denoised [B, D] = sum_k w_k D_k(x), logp [B] = log p_sigma(x), weights [B, K])."""
    xc = _compute(x)
    s2 = _col(sigma, x) ** 2
    B, D = xc.shape
    K = means.shape[0]
    chunks = _chunks(K, B, D)
    logits = torch.cat([_component_terms(xc, s2, means[k], bases[k], eigvals[k], residual_var[k])[2] for k in chunks], 1)
    logits = logits + log_weights
    logp = torch.logsumexp(logits, dim=1)
    weights = torch.softmax(logits, dim=1)
    denoised = torch.zeros_like(xc)
    for k in chunks:
        y, c, _ = _component_terms(xc, s2, means[k], bases[k], eigvals[k], residual_var[k])
        perp = residual_var[k][None] / (residual_var[k][None] + s2)  # [B, k]
        gain = eigvals[k][None] / (eigvals[k][None] + s2[:, :, None]) - perp[:, :, None]
        d_k = means[k][None] + perp[:, :, None] * y + torch.einsum("bkr,kdr->bkd", gain * c, bases[k])
        denoised = denoised + (weights[:, k, None] * d_k).sum(1)
    return denoised.to(x.dtype), logp, weights
