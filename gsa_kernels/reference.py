"""Readable PyTorch oracle of the kernel-level ops (docs/architecture.md, sections 1 and 3).

Callable exactly like every backend, in kernel argument order (_contract.py):

    gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind)
    gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas)
    mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights)
    gaussian_map_labeled(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind)
    gaussian_trajectory_labeled(x, labels, means, bases, eigvals, residual_var, sigmas)

Every backend is tested against these functions, and they are tested against independent code
(torch.distributions densities and autograd, numerical ODE integration) in tests/test_reference.py.
Written for clarity, not speed: plain tensor algebra. The Gaussian ops compute in the compute
dtype (_contract.compute_dtype) in forms without cancellation; the mixture posterior computes in
float64 whatever the inputs' dtype (float32 values are exact in float64), because its logits
scale as 1/sigma^2 and near ties need squared distances beyond float32. So the reference is as
accurate as the kernels in float32: it is the fallback when the compiled extension is missing.

Shapes: x [B, D]; per-row sigma_* / scale_* [B]; Gaussian: mean [D], basis [D, r] orthonormal
columns, eigvals [r], residual_var float; mixture: means [K, D], bases [K, D, r], eigvals [K, r],
residual_var [K], log_weights [K] (normalised: logsumexp = 0).
"""
from __future__ import annotations

import math

import torch

from ._contract import SpectralKind, compute_dtype

LOG_2PI = math.log(2.0 * math.pi)


def _f64(v):
    return v.to(torch.float64)


def _col(v, dtype):
    """[B] per-row values -> [B, 1] in dtype."""
    return v.to(dtype).reshape(-1, 1)


def _off_span(y, c, basis):
    """P_perp y = y - U c, summed directly (|y|^2 - |c|^2 would carry c^T (U^T U - I) c of a rounded
    basis, which small-sigma logits and scores multiply by 1/sigma^2); None at full rank, where
    P_perp = 0 by definition and y - U c is only rounding."""
    D, r = basis.shape[-2], basis.shape[-1]
    return None if r == D else y - c @ basis.mT


# ----------------------------------------------------------------------------- Gaussian ops


def _denoise(y, s2, basis, eigvals, residual_var):
    """E[x0 | x] - mean for y = x - mean: U diag(lam/(lam+s^2)) c + residual_var/(residual_var+s^2) P_perp y."""
    c = y @ basis
    out = (c * (eigvals / (eigvals + s2))) @ basis.mT
    perp = _off_span(y, c, basis)
    return out if perp is None else out + residual_var / (residual_var + s2) * perp


def _score(y, s2, basis, eigvals, residual_var):
    """-(Sigma + s^2 I)^-1 y: per eigen-direction -1/(lam + s^2), without forming (D - x)/s^2."""
    c = y @ basis
    out = -(c / (eigvals + s2)) @ basis.mT
    perp = _off_span(y, c, basis)
    return out if perp is None else out - perp / (residual_var + s2)


def _flow(y, sigma_from, sigma_to, basis, eigvals, residual_var):
    """The PF-ODE dx/ds = (x - D(x, s)) / s from sigma_from to sigma_to, in closed form, for
    y = x - mean: per eigen-direction of variance v, the gain sqrt((v + sigma_to^2) / (v + sigma_from^2)).
    sigma_from = inf: y is unit noise and the gain is sqrt(v + sigma_to^2). y [B, D], sigma_from
    [B, 1]; sigma_to [B, 1], or [T, B, 1] for T steps at once ([T, B, D] out). residual_var: a
    float, or a tensor broadcasting like sigma_from (per-row models)."""
    from_noise = torch.isinf(sigma_from)
    from2 = torch.where(from_noise, torch.ones_like(sigma_from), sigma_from) ** 2
    to2 = sigma_to**2

    def gain(v):
        return torch.where(from_noise, torch.sqrt(v + to2), torch.sqrt((v + to2) / (v + from2)))

    c = y @ basis
    out = (c * gain(eigvals)) @ basis.mT
    perp = _off_span(y, c, basis)
    residual_var = residual_var if isinstance(residual_var, torch.Tensor) else torch.tensor(residual_var, dtype=y.dtype, device=y.device)
    return out if perp is None else out + gain(residual_var) * perp


def _spectral(xc, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind):
    """The map of gaussian_map in the compute dtype, the per-row values shaped to broadcast against
    xc (columns [B, 1] for one model; [n, 1, 1] against xc [n, 1, D] for per-row models)."""
    if kind == SpectralKind.DENOISE:
        return mean + _denoise(xc - mean, sigma_from**2, basis, eigvals, residual_var)
    if kind == SpectralKind.SCORE:
        return _score(xc - mean, sigma_from**2, basis, eigvals, residual_var)
    from_noise = torch.isinf(sigma_from)
    y = torch.where(from_noise, xc, xc / scale_from - mean)  # unit noise: no mean to remove
    return scale_to * (mean + _flow(y, sigma_from, sigma_to, basis, eigvals, residual_var))


def gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind):
    """The spectral map of `kind` (SpectralKind) for x [B, D] -> [B, D] in x's dtype, under
    N(mean, U diag(eigvals) U^T + residual_var P_perp), U = basis. Denoise and score read
    sigma_from only. Flow: states x = scale (x0 + sigma eps); sigma_from = inf: x is unit noise."""
    cd = compute_dtype(x.dtype)
    rows = [_col(v, cd) for v in (sigma_from, sigma_to, scale_from, scale_to)]
    return _spectral(x.to(cd), mean, basis, eigvals, float(residual_var), *rows, SpectralKind(kind)).to(x.dtype)


def gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas):
    """x at sigmas[0] carried to every sigmas[t]: sigmas [T, B] -> [T, B, D] in x's dtype (the flow
    of gaussian_map from sigmas[0] to sigmas[t], scales 1, every step at once)."""
    cd = compute_dtype(x.dtype)
    sigmas = sigmas.to(cd)
    out = mean + _flow(x.to(cd) - mean, sigmas[0][:, None], sigmas[:, :, None], basis, eigvals, float(residual_var))
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- labelled Gaussian ops


def _row_chunks(B, D, r):
    step = max(1, (1 << 22) // max(1, D * max(r, 1)))  # gathered [n, D, r] bases of ~32 MB in float64
    return [slice(b, min(B, b + step)) for b in range(0, B, step)]


def _row_models(labels, means, bases, eigvals, residual_var):
    """Each row's own Gaussian, gathered: means [n, 1, D], bases [n, D, r], eigvals [n, 1, r],
    residual_var [n, 1, 1]: shaped for _spectral / _flow against x [n, 1, D]. index_select: a label
    out of [0, K) is an IndexError (indexing would wrap -1 around)."""
    pick = lambda t: t.index_select(0, labels)
    return pick(means)[:, None], pick(bases), pick(eigvals)[:, None], pick(residual_var)[:, None, None]


def gaussian_map_labeled(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to,
                         kind):
    """gaussian_map with row b under component labels[b]: (means[k], bases[k], eigvals[k],
    residual_var[k]), k = labels[b]. Every row's model is gathered (in chunks of rows), so each
    row is computed on its own, with the same formulas as gaussian_map."""
    cd = compute_dtype(x.dtype)
    B, D = x.shape
    xc = x.to(cd)
    rows = [v.to(cd)[:, None, None] for v in (sigma_from, sigma_to, scale_from, scale_to)]
    parts = [_spectral(xc[ch, None], *_row_models(labels[ch], means, bases, eigvals, residual_var),
                       *[v[ch] for v in rows], SpectralKind(kind))[:, 0]
             for ch in _row_chunks(B, D, bases.shape[2])]
    return (torch.cat(parts) if parts else xc).to(x.dtype)


def gaussian_trajectory_labeled(x, labels, means, bases, eigvals, residual_var, sigmas):
    """gaussian_trajectory with row b under component labels[b]: [T, B, D] in x's dtype."""
    cd = compute_dtype(x.dtype)
    B, D = x.shape
    xc, sigmas = x.to(cd), sigmas.to(cd)
    parts = []
    for ch in _row_chunks(B, D * sigmas.shape[0], bases.shape[2]):
        mean, basis, lam, row_residual_var = _row_models(labels[ch], means, bases, eigvals, residual_var)
        steps = _flow(xc[ch, None] - mean, sigmas[0, ch, None, None], sigmas[:, ch, None, None], basis, lam,
                      row_residual_var)
        parts.append((mean + steps)[:, :, 0])
    return (torch.cat(parts, 1) if parts else xc.new_empty((sigmas.shape[0], 0, D))).to(x.dtype)


# ----------------------------------------------------------------------------- mixture posterior


def _component_terms(x, s2, means, bases, eigvals, residual_var):
    """For a chunk of k components: y = x - mu [B, k, D], c = U^T y [B, k, r], P_perp y (or None
    at full rank), and log N(x; mu, Sigma + s^2 I) [B, k]. |y|^2 and |P_perp y|^2 are summed from
    the differences directly (never |x|^2 - 2 x.mu + |mu|^2): logits scale as 1/s^2."""
    D, r = means.shape[1], bases.shape[2]
    y = x[:, None, :] - means[None]
    c = torch.einsum("bkd,kdr->bkr", y, bases)
    perp = None if r == D else y - torch.einsum("bkr,kdr->bkd", c, bases)
    v_low = eigvals[None] + s2[:, :, None]  # [B, k, r]
    v_perp = residual_var[None] + s2  # [B, k]
    perp_sq = torch.zeros_like(v_perp) if perp is None else (perp * perp).sum(-1)
    logpdf = -0.5 * (
        (c * c / v_low).sum(-1) + perp_sq / v_perp + torch.log(v_low).sum(-1) + (D - r) * torch.log(v_perp) + D * LOG_2PI
    )
    return y, c, perp, logpdf


def _chunks(K, B, D):
    step = max(1, (1 << 22) // max(1, B * D))  # [B, k, D] float64 temporaries of ~32 MB
    return [slice(k, min(K, k + step)) for k in range(0, K, step)]


def mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights):
    """Posterior over the components of a low-rank Gaussian mixture at per-row noise sigma [B].
    Returns (denoised [B, D] = sum_k w_k D_k(x) in x's dtype, or [0] when not needed;
    logp [B] = log p_sigma(x); weights [B, K] or [0]), logp and weights in the compute dtype."""
    cd = compute_dtype(x.dtype)
    xd = _f64(x)
    means, bases, eigvals, residual_var, log_weights = map(_f64, (means, bases, eigvals, residual_var, log_weights))
    s2 = _col(sigma, torch.float64) ** 2
    B, D = xd.shape
    chunks = _chunks(means.shape[0], B, D)
    logits = torch.cat([_component_terms(xd, s2, means[k], bases[k], eigvals[k], residual_var[k])[3] for k in chunks], 1)
    logits = logits + log_weights
    logp = torch.logsumexp(logits, dim=1)
    weights = torch.softmax(logits, dim=1)
    denoised = x.new_empty((0,))
    if need_denoised:
        acc = torch.zeros_like(xd)
        for k in chunks:  # D_k = mu_k + U_k diag(lam/(lam+s^2)) c + residual_var/(residual_var+s^2) P_perp y
            _, c, perp, _ = _component_terms(xd, s2, means[k], bases[k], eigvals[k], residual_var[k])
            d_k = means[k][None] + torch.einsum("bkr,kdr->bkd", c * (eigvals[k][None] / (eigvals[k][None] + s2[:, :, None])), bases[k])
            if perp is not None:
                d_k = d_k + (residual_var[k][None] / (residual_var[k][None] + s2))[:, :, None] * perp
            acc = acc + (weights[:, k, None] * d_k).sum(1)
        denoised = acc.to(x.dtype)
    return denoised, logp.to(cd), weights.to(cd) if need_weights else logp.new_empty((0,), dtype=cd)
