"""Readable PyTorch oracle of the kernel-level ops (docs/architecture.md, sections 1 and 3).

Callable exactly like every backend, in kernel argument order (_contract.py):

    gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind)
    gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas)
    mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights)
    gaussian_map_labeled(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind)
    gaussian_trajectory_labeled(x, labels, means, bases, eigvals, residual_var, sigmas)
    local_posterior(x, images, sigma, patch_size, mode, padding, kind)

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

from ._core._args import LocalMode, LocalPadding, SpectralKind, compute_dtype

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


def component_terms(x, s2, means, bases, eigvals, residual_var):
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
    logits = torch.cat([component_terms(xd, s2, means[k], bases[k], eigvals[k], residual_var[k])[3] for k in chunks], 1)
    logits = logits + log_weights
    logp = torch.logsumexp(logits, dim=1)
    weights = torch.softmax(logits, dim=1)
    denoised = x.new_empty((0,))
    if need_denoised:
        acc = torch.zeros_like(xd)
        for k in chunks:  # D_k = mu_k + U_k diag(lam/(lam+s^2)) c + residual_var/(residual_var+s^2) P_perp y
            _, c, perp, _ = component_terms(xd, s2, means[k], bases[k], eigvals[k], residual_var[k])
            d_k = means[k][None] + torch.einsum("bkr,kdr->bkd", c * (eigvals[k][None] / (eigvals[k][None] + s2[:, :, None])), bases[k])
            if perp is not None:
                d_k = d_k + (residual_var[k][None] / (residual_var[k][None] + s2))[:, :, None] * perp
            acc = acc + (weights[:, k, None] * d_k).sum(1)
        denoised = acc.to(x.dtype)
    return denoised, logp.to(cd), weights.to(cd) if need_weights else logp.new_empty((0,), dtype=cd)


# ----------------------------------------------------------------------------- local score machines


def _padded(t, p, padding):
    """t [..., H, W] -> [..., H + 2p, W + 2p]: zeros outside the image, or the image wrapped
    (indices mod H, mod W, as many times as p needs)."""
    H, W = t.shape[-2:]
    if padding == LocalPadding.ZEROS:
        return torch.nn.functional.pad(t, (p, p, p, p))
    rows = torch.arange(-p, H + p, device=t.device) % H
    cols = torch.arange(-p, W + p, device=t.device) % W
    return t.index_select(-2, rows).index_select(-1, cols)


def boundary_class(H, W, p, device=None):
    """[H W] int64: pixel (i, j)'s boundary class, the distances (top, bottom, left, right) to the
    image edges each clipped at p, as one code. Equal codes compete in BBELS."""
    i = torch.arange(H, device=device)[:, None].expand(H, W)
    j = torch.arange(W, device=device)[None, :].expand(H, W)
    parts = [i.clamp(max=p), (H - 1 - i).clamp(max=p), j.clamp(max=p), (W - 1 - j).clamp(max=p)]
    code = torch.zeros((H, W), dtype=torch.int64, device=device)
    for part in parts:
        code = code * (p + 1) + part
    return code.reshape(-1)


def _local_blocks(xd, images, p, mode, padding):
    """The candidates of every pixel, one block of training images at a time: yields
    (d2 [B, HW, M], values [C, HW or 1, M], padded) in float64, d2 = +inf where (mode BBELS) a
    column is not a candidate of that pixel. LS: M = the block's images at v = u, padded [n, C,
    H + 2p, W + 2p]; ELS / BBELS: one image, M = its HW pixels v, padded [C, H + 2p, W + 2p]. d2 is
    summed from direct differences, one window offset at a time."""
    B, C, H, W = xd.shape
    HW, P = H * W, 2 * p + 1
    xp = _padded(xd, p, padding)
    shifted_x = lambda oy, ox: xp[:, :, oy:oy + H, ox:ox + W].reshape(B, C, HW)
    if mode == LocalMode.LS:
        step = max(1, (1 << 22) // max(1, B * C * HW))  # [B, n, C, HW] float64 temporaries of ~32 MB
        for n0 in range(0, images.shape[0], step):
            block = images[n0:n0 + step].to(torch.float64)
            bp = _padded(block, p, padding)
            d2 = torch.zeros((B, HW, block.shape[0]), dtype=torch.float64, device=xd.device)
            for oy in range(P):
                for ox in range(P):
                    diff = shifted_x(oy, ox)[:, None] - bp[None, :, :, oy:oy + H, ox:ox + W].reshape(1, -1, C, HW)
                    d2 += (diff * diff).sum(2).transpose(1, 2)
            yield d2, block.reshape(-1, C, HW).permute(1, 2, 0), bp
        return
    outside = None
    if mode == LocalMode.BBELS:
        code = boundary_class(H, W, p, xd.device)
        outside = code[:, None] != code[None, :]  # [HW u, HW v]
    for n in range(images.shape[0]):
        img = images[n].to(torch.float64)
        ip = _padded(img, p, padding)
        d2 = torch.zeros((B, HW, HW), dtype=torch.float64, device=xd.device)
        for oy in range(P):
            for ox in range(P):
                xs = shifted_x(oy, ox)  # [B, C, HW u]
                cs = ip[:, oy:oy + H, ox:ox + W].reshape(C, HW)  # [C, HW v]
                for c in range(C):
                    diff = xs[:, c, :, None] - cs[c][None, None, :]
                    d2 += diff * diff
        if outside is not None:
            d2 = d2.masked_fill(outside, math.inf)
        yield d2, img.reshape(C, 1, HW), ip


def _local_posterior_f64(xd, images, sigma, patch_size, mode, padding):
    """(sum_c w_c (value_c - x_u) [B, C, HW], logsumexp of the logits [B, HW]) in float64, streaming
    over training images with an online softmax (running max m, sum z, accumulator acc)."""
    B, C, H, W = xd.shape
    s2 = sigma.to(torch.float64).reshape(B, 1, 1) ** 2
    xu = xd.reshape(B, C, H * W, 1)
    m = torch.full((B, H * W), -math.inf, dtype=torch.float64, device=xd.device)
    z = torch.zeros_like(m)
    acc = torch.zeros((B, C, H * W), dtype=torch.float64, device=xd.device)
    for d2, values, _ in _local_blocks(xd, images, patch_size // 2, mode, padding):
        logits = -d2 / (2 * s2)
        m_new = torch.maximum(m, logits.amax(-1))
        rescale = torch.exp(m - m_new)  # 0 on the first block (m = -inf)
        w = torch.exp(logits - m_new[..., None])  # [B, HW, M]
        z = z * rescale + w.sum(-1)
        # sum_c w_c (value_c - x_u) channel by channel: the differences, never sum w v - x sum w
        acc = acc * rescale[:, None] + torch.stack([(w * (values[c][None] - xu[:, c])).sum(-1) for c in range(C)], 1)
        m = m_new
    return acc / z[:, None], m + torch.log(z)


def local_posterior(x, images, sigma, patch_size, mode, padding, kind):
    """The local score machines: x [B, C, H, W], images [N, C, H, W], sigma [B] -> [B, C, H, W] in
    x's dtype (_contract.py gives the math). DENOISE: x_u + sum_c w_c (value_c - x_u); SCORE:
    sum_c w_c (value_c - x_u) / sigma^2. Computed in float64 whatever the dtype (float32 values are
    exact in float64), so it is the truth at every sigma; a NaN in x[b] makes row b all NaN."""
    mode, padding, kind = LocalMode(mode), LocalPadding(padding), SpectralKind(kind)
    xd = _f64(x)
    B, C, H, W = xd.shape
    diff, _ = _local_posterior_f64(xd, images, sigma, patch_size, mode, padding)
    if kind == SpectralKind.DENOISE:
        out = xd + diff.reshape(B, C, H, W)
    elif kind == SpectralKind.SCORE:
        out = diff.reshape(B, C, H, W) / sigma.to(torch.float64).reshape(B, 1, 1, 1) ** 2
    else:
        raise ValueError(f"local_posterior: kind must be DENOISE or SCORE, got {kind!r}")
    out = torch.where(torch.isnan(xd).flatten(1).any(1).reshape(B, 1, 1, 1), math.nan, out)
    return out.to(x.dtype)


def local_posterior_vjp(x, images, sigma, patch_size, mode, padding, kind, grad):
    """The vector-Jacobian product of local_posterior w.r.t. x: grad [B, C, H, W] -> [B, C, H, W]
    in x's dtype, float64 inside. With den_u = sum_c w_c value_c and g_u the gradient reaching
    den_u (grad, or grad / sigma^2 for the score), a_c = w_c g_u . (value_c - den_u) and, since
    dlogit_c / dx_{u+o} = (phi_c(o) - x_{u+o}) / sigma^2 for the candidate's window phi_c,
        grad x_q = sum over u, o with u + o = q of sum_c a_c phi_c(o) / sigma^2
    (the x_{u+o} term drops: sum_c a_c = g_u . (den_u - den_u) = 0), folded back from the
    padded frame onto the image (dropped outside it for zeros, wrapped for circular); the score
    adds its direct term -grad / sigma^2. A second pass over the candidates with the forward's
    logsumexp. NaN rows of x give NaN rows."""
    mode, padding, kind = LocalMode(mode), LocalPadding(padding), SpectralKind(kind)
    xd, g = _f64(x), _f64(grad)
    B, C, H, W = xd.shape
    HW, p = H * W, patch_size // 2
    P = 2 * p + 1
    s2 = sigma.to(torch.float64).reshape(B, 1, 1) ** 2
    g_den = g / s2[..., None] if kind == SpectralKind.SCORE else g
    diff, lse = _local_posterior_f64(xd, images, sigma, patch_size, mode, padding)
    den = (xd.reshape(B, C, HW) + diff)[..., None]  # [B, C, HW, 1]
    gu = g_den.reshape(B, C, HW, 1)
    frame = torch.zeros((B, C, H + 2 * p, W + 2 * p), dtype=torch.float64, device=xd.device)
    for d2, values, padded in _local_blocks(xd, images, p, mode, padding):
        w = torch.exp(-d2 / (2 * s2) - lse[..., None])  # [B, HW, M]
        a = w * (gu * (values[None] - den)).sum(1)
        for oy in range(P):
            for ox in range(P):
                if mode == LocalMode.LS:  # candidate n at v = u: its window pixel u + o
                    phi = padded[:, :, oy:oy + H, ox:ox + W].reshape(-1, C, HW)  # [n, C, HW]
                    part = torch.einsum("bun,ncu->bcu", a, phi)
                else:  # candidate v: its window pixel v + o
                    phi = padded[:, oy:oy + H, ox:ox + W].reshape(C, HW)  # [C, HW v]
                    part = torch.einsum("buv,cv->bcu", a, phi)
                frame[:, :, oy:oy + H, ox:ox + W] += part.reshape(B, C, H, W)
    frame = frame / s2[..., None]
    if padding == LocalPadding.ZEROS:
        gx = frame[:, :, p:p + H, p:p + W].clone()
    else:
        rows = torch.arange(-p, H + p, device=xd.device) % H
        cols = torch.arange(-p, W + p, device=xd.device) % W
        gx = torch.zeros((B, C, H, W + 2 * p), dtype=torch.float64, device=xd.device).index_add_(2, rows, frame)
        gx = torch.zeros_like(xd).index_add_(3, cols, gx)
    if kind == SpectralKind.SCORE:
        gx = gx - g / s2[..., None]
    gx = torch.where(torch.isnan(xd).flatten(1).any(1).reshape(B, 1, 1, 1), math.nan, gx)
    return gx.to(x.dtype)
