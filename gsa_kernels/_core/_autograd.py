"""Backward formulas of the kernel-level ops: one rule per op of the registry (_contract.py
registers them with torch.library.register_autograd for every namespace: gsa_kernels:: (C++
CPU / CUDA), gsa_kernels::cuda_emu_* (the SIMT emulation) and gsa_kernels_triton:: (Triton)). The reference backend is plain PyTorch and
needs none. The backward bodies are torch ops only, so torch.compile(fullgraph=True) traces them.

Differentiable inputs: x of every op; mean and eigvals of the Gaussian ops; means, eigvals,
residual_var and log_weights of the mixture posterior. The rest (basis / bases, noise levels,
scales; the Gaussian residual_var is a float) have no gradient: when one requires grad the op
raises, naming it, instead of returning an output silently detached from it.

Gaussian maps (docs/architecture.md, section 1): out = a y + b mu + U diag(f) U^T y with y = p x - q mu is
affine in x with a symmetric linear part, so the vector-Jacobian product w.r.t. x is the same
kernel applied to the output gradient with mean = 0 (which drops the constant term).

Mixture posterior, per row (s = sigma): logits l_k = log w_k + log N_k(x), weights
w = softmax(l), den = sum_k w_k D_k, logp = logsumexp(l). With upstream gradients gD (den),
gL (logp), gW (weights), every path through a logit meets in
    a_k = w_k (gL + gW_k - sum_j w_j gW_j + gD.(D_k - den))        (sum_k a_k = gL)
and, with D_k = x - s^2 C_k^-1 (x - mu_k) (C_k = Sigma_k + s^2 I, A_k = I - s^2 C_k^-1):
    dl_k/dx = -dl_k/dmu_k = (D_k - x) / s^2
    grad x     = sum_k a_k (D_k - x) / s^2 + w_k A_k gD
    grad mu_k  = sum_b a_k (x - D_k) / s^2 + w_k (I - A_k) gD
    grad lam_kj = sum_b a_k/2 (c_j^2/v_j^2 - 1/v_j) + w_k s^2 c_j (U_k^T gD)_j / v_j^2,  v = lam + s^2
    grad residual_var_k = sum_b a_k/2 (|P y|^2/vp^2 - (D-r)/vp) + w_k s^2/vp^2 gD.(P y),  vp = residual_var_k + s^2
    grad log w_k = sum_b a_k
(y = x - mu_k, c = U_k^T y, P = I - U_k U_k^T.) On CPU one kernel computes all of these
(gsa_kernels::mixture_posterior_backward, csrc/cpu/mixture_backward.cpp); elsewhere
_mixture_backward_composed does, from the forward op (for the weights) and torch GEMMs.
"""
from __future__ import annotations

import torch

from .. import reference
from ._args import SpectralKind, check_no_grad

KIND_DENOISE, KIND_SCORE, KIND_FLOW = SpectralKind.DENOISE, SpectralKind.SCORE, SpectralKind.FLOW


def _check_inputs(op, inputs, no_grad):
    # setup_context runs only when autograd records the op (grad mode may read off here)
    with torch.enable_grad():
        check_no_grad(op, **{name: inputs[i] for i, name in no_grad.items()})


# ----------------------------------------------------------------------------- Gaussian maps


def _gain_derivative(kind, lam, sigma_from, sigma_to, scale_to):
    """d f_j / d lam_j of the per-eigenvalue gain f (spectral.h eigen_gain), rows [B, 1] x [r]."""
    if kind == KIND_DENOISE:
        return sigma_from * sigma_from / (lam + sigma_from * sigma_from) ** 2
    if kind == KIND_SCORE:
        return 1.0 / (lam + sigma_from * sigma_from) ** 2
    vb = lam + sigma_to * sigma_to
    finite = torch.where(torch.isinf(sigma_from), torch.ones_like(sigma_from), sigma_from)
    va = lam + finite * finite
    from_finite = 0.5 * (va - vb) / (va * torch.sqrt(va * vb))
    return scale_to * torch.where(torch.isinf(sigma_from), 0.5 / torch.sqrt(vb), from_finite)


def _map_setup(op_name, no_grad):
    def setup_context(ctx, inputs, output):
        _check_inputs(op_name, inputs, no_grad)
        x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind = inputs[:10]
        ctx.save_for_backward(x, mean, basis, eigvals, sigma_from, sigma_to, scale_from, scale_to)
        ctx.residual_var, ctx.kind, ctx.layouts = residual_var, kind, inputs[10:]

    return setup_context


def _map_backward(op):
    def backward(ctx, grad):
        x, mean, basis, eigvals, sigma_from, sigma_to, scale_from, scale_to = ctx.saved_tensors
        kind = ctx.kind
        need_x, need_mean, need_lam = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        gx = gmean = glam = None
        cd = mean.dtype
        g = grad.to(cd).contiguous()
        if need_x or need_mean:
            gx = op(g, torch.zeros_like(mean), basis, eigvals, ctx.residual_var, sigma_from, sigma_to, scale_from,
                    scale_to, kind, *ctx.layouts)
        if need_mean:
            # d out / d mean = cm I - cv (linear part): denoise (1, 1), score (0, 1),
            # flow scale_to (I - A) with A = (scale_from/scale_to) x-Jacobian, from noise scale_to I
            if kind == KIND_FLOW:
                cm, cv = scale_to, torch.where(torch.isinf(sigma_from), torch.zeros_like(scale_from), scale_from)
            else:
                cm = torch.ones_like(sigma_from) if kind == KIND_DENOISE else torch.zeros_like(sigma_from)
                cv = torch.ones_like(sigma_from)
            gmean = (cm[:, None] * g - cv[:, None] * gx).sum(0)
        if need_lam:
            y = x.to(cd)
            if kind == KIND_FLOW:
                y = torch.where(torch.isinf(sigma_from)[:, None], y, y / scale_from[:, None] - mean)
            else:
                y = y - mean
            deriv = _gain_derivative(kind, eigvals, sigma_from[:, None], sigma_to[:, None], scale_to[:, None])  # [B, r]
            glam = ((g @ basis) * deriv * (y @ basis)).sum(0)
        return ((gx.to(x.dtype) if need_x else None), gmean, None, glam, None, None, None, None, None, None,
                *[None] * len(ctx.layouts))

    return backward


def _trajectory_setup(op_name, no_grad):
    def setup_context(ctx, inputs, output):
        _check_inputs(op_name, inputs, no_grad)
        x, mean, basis, eigvals, residual_var, sigmas = inputs[:6]
        ctx.save_for_backward(x, mean, basis, eigvals, sigmas)
        ctx.residual_var, ctx.layouts = residual_var, inputs[6:]

    return setup_context


def _trajectory_backward(ctx, grad):
    """out[t] = mean + A_t (x - mean), A_t = h_t P + U diag(psi_t) U^T, sigma_from = sigmas[0] (finite).
    grad x = sum_t A_t g_t = sum_t h_t g_t + U sum_t diag(psi_t - h_t) U^T g_t: per t, one
    projection of g_t (read once more from cache for h_t g_t), then one back-projection:
    (T + 1) B D r multiply-adds like the forward, and one pass over the [T, B, D] gradient."""
    x, mean, basis, eigvals, sigmas = ctx.saved_tensors
    cd = mean.dtype
    g = grad.to(cd)  # [T, B, D]
    residual_var = ctx.residual_var
    need_x, need_mean, need_lam = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    sa2 = (sigmas[0] ** 2)[:, None]  # [B, 1]
    va = eigvals + sa2  # [B, r]
    cy = (x.to(cd) - mean) @ basis if need_lam else None
    acc = torch.zeros_like(va)  # sum_t (psi_t - h_t) U^T g_t
    gx = torch.zeros(g.shape[1:], dtype=cd, device=g.device)
    glam = torch.zeros_like(eigvals) if need_lam else None
    for t in range(g.shape[0]):
        sb2 = (sigmas[t] ** 2)[:, None]
        vb = eigvals + sb2
        h = torch.sqrt((residual_var + sb2) / (residual_var + sa2))  # [B, 1]
        cg = g[t] @ basis  # [B, r]
        acc.addcmul_(torch.sqrt(vb / va) - h, cg)
        gx.addcmul_(h, g[t])
        if need_lam:
            glam += (cg * (0.5 * (va - vb) / (va * torch.sqrt(va * vb))) * cy).sum(0)
    gx.addmm_(acc, basis.T)
    gmean = g.sum((0, 1)) - gx.sum(0) if need_mean else None
    return (gx.to(x.dtype) if need_x else None), gmean, None, glam, None, None, *[None] * len(ctx.layouts)


# ----------------------------------------------------------------------------- labelled Gaussian maps
# Row b is gaussian_map under component k = labels[b], so grad x is again the labelled op on the
# output gradient with means = 0, and the model gradients are the single-Gaussian ones per row,
# summed into each row's component (index_add over labels). Differentiable: x, means, eigvals
# and residual_var (a [K] tensor here); the per-eigenvalue terms need U_k^T g and U_k^T y per row,
# formed from the gathered bases in chunks of rows (only when eigvals or residual_var need grad).


def _row_chunks(B, D, r):
    step = max(1, (1 << 22) // max(1, D * max(r, 1)))
    return [slice(b, min(B, b + step)) for b in range(0, B, step)]


def _spectral_grads(labels, bases, eigvals, residual_var, y, g, deriv_of, need_lam, need_residual_var):
    """(grad eigvals [K, r], grad residual_var [K]) of out = ... + U diag(gain(lam)) c + gain(residual_var) P y
    summed over rows: per row, d/dlam_j = (U^T g)_j gain'(lam_j) (U^T y)_j and d/d residual_var = gain'(residual_var)
    (g.y - (U^T g).(U^T y)) (no residual directions at full rank). y [B, D]; g [S, B, D] (S
    output steps); deriv_of(v, rows) -> gain' [S, n, *] at variances v [n, *] of chunk rows."""
    B, D = y.shape
    r = bases.shape[2]
    glam = torch.zeros_like(eigvals) if need_lam else None
    g_residual_var = torch.zeros_like(residual_var) if need_residual_var else None
    for ch in _row_chunks(B, D * g.shape[0], r):
        k = labels[ch]
        U = bases[k]  # [n, D, r]
        cy = torch.einsum("nd,ndr->nr", y[ch], U)
        cg = torch.einsum("snd,ndr->snr", g[:, ch], U)
        if need_lam:
            glam.index_add_(0, k, (cg * deriv_of(eigvals[k], ch) * cy).sum(0))
        if need_residual_var and r < D:
            perp = (g[:, ch] * y[ch]).sum(-1) - (cg * cy).sum(-1)  # [S, n]: g . P y
            g_residual_var.index_add_(0, k, (deriv_of(residual_var[k, None], ch)[..., 0] * perp).sum(0))
    return glam, g_residual_var


def _labeled_map_setup(op_name, no_grad):
    def setup_context(ctx, inputs, output):
        _check_inputs(op_name, inputs, no_grad)
        ctx.save_for_backward(*inputs[:10])
        ctx.kind = inputs[10]

    return setup_context


def _labeled_map_backward(op):
    def backward(ctx, grad):
        x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to = ctx.saved_tensors
        kind = ctx.kind
        n = ctx.needs_input_grad
        need_x, need_mean, need_lam, need_residual_var = n[0], n[2], n[4], n[5]
        gx = gmean = glam = g_residual_var = None
        cd = means.dtype
        g = grad.to(cd).contiguous()
        if need_x or need_mean:
            gx = op(g, labels, torch.zeros_like(means), bases, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind)
        if need_mean:  # per row as in _map_backward, summed into each row's component
            if kind == KIND_FLOW:
                cm, cv = scale_to, torch.where(torch.isinf(sigma_from), torch.zeros_like(scale_from), scale_from)
            else:
                cm = torch.ones_like(sigma_from) if kind == KIND_DENOISE else torch.zeros_like(sigma_from)
                cv = torch.ones_like(sigma_from)
            gmean = torch.zeros_like(means).index_add_(0, labels, cm[:, None] * g - cv[:, None] * gx)
        if need_lam or need_residual_var:
            mu = means[labels]
            y = x.to(cd)
            if kind == KIND_FLOW:
                y = torch.where(torch.isinf(sigma_from)[:, None], y, y / scale_from[:, None] - mu)
            else:
                y = y - mu
            deriv = lambda v, ch: _gain_derivative(kind, v, sigma_from[ch, None], sigma_to[ch, None],
                                                   scale_to[ch, None])[None]
            glam, g_residual_var = _spectral_grads(labels, bases, eigvals, residual_var, y, g[None], deriv, need_lam, need_residual_var)
        return (gx.to(x.dtype) if need_x else None), None, gmean, None, glam, g_residual_var, None, None, None, None, None

    return backward


def _labeled_trajectory_setup(op_name, no_grad):
    def setup_context(ctx, inputs, output):
        _check_inputs(op_name, inputs, no_grad)
        ctx.save_for_backward(*inputs[:7])

    return setup_context


def _labeled_trajectory_backward(map_op):
    def backward(ctx, grad):
        """out[t] = mu + A_t (x - mu) per row: grad x = sum_t A_t g_t, each A_t g_t the labelled
        flow map of g_t from sigmas[0] to sigmas[t] with means = 0 (one launch per step)."""
        x, labels, means, bases, eigvals, residual_var, sigmas = ctx.saved_tensors
        n = ctx.needs_input_grad
        need_x, need_mean, need_lam, need_residual_var = n[0], n[2], n[4], n[5]
        cd = means.dtype
        g = grad.to(cd).contiguous()
        gx = gmean = glam = g_residual_var = None
        if need_x or need_mean:
            zeros, ones = torch.zeros_like(means), torch.ones_like(sigmas[0])
            gx = torch.zeros(g.shape[1:], dtype=cd, device=g.device)
            for t in range(g.shape[0]):
                gx += map_op(g[t], labels, zeros, bases, eigvals, residual_var, sigmas[0], sigmas[t], ones, ones, KIND_FLOW)
        if need_mean:
            gmean = torch.zeros_like(means).index_add_(0, labels, g.sum(0) - gx)
        if need_lam or need_residual_var:
            y = x.to(cd) - means[labels]
            one = torch.ones_like(sigmas[0])
            deriv = lambda v, ch: _gain_derivative(KIND_FLOW, v[None], sigmas[0, ch][None, :, None], sigmas[:, ch, None],
                                                   one[ch][None, :, None])
            glam, g_residual_var = _spectral_grads(labels, bases, eigvals, residual_var, y, g, deriv, need_lam, need_residual_var)
        return (gx.to(x.dtype) if need_x else None), None, gmean, None, glam, g_residual_var, None

    return backward


# ----------------------------------------------------------------------------- mixture posterior


def _mixture_setup(op_name, no_grad):
    def setup_context(ctx, inputs, output):
        _check_inputs(op_name, inputs, no_grad)
        x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights = inputs[:9]
        den, logp, weights = output
        ctx.save_for_backward(x, means, bases, eigvals, residual_var, log_weights, sigma, den, logp, weights)
        ctx.need_denoised, ctx.need_weights, ctx.layouts = need_denoised, need_weights, inputs[9:]

    return setup_context


def _chunks(K, B, D, r):
    step = max(1, (1 << 22) // max(1, B * (r + 1) + D * (r + 1)))  # [B, k, r] and [k, D, r] temporaries
    return [slice(k, min(K, k + step)) for k in range(0, K, step)]


def _mixture_backward_composed(forward, x, means, bases, eigvals, residual_var, log_weights, sigma, den, logp,
                               weights, gD, gL, gW, needs, layouts=()):
    """The mixture gradients (module docstring) from torch ops: the weights come from the forward
    op (need_weights=True: one more forward pass over the components when the caller did not ask
    for them), the rest from chunked GEMMs against the components: x and gD projected on
    [mu_k; U_k] (2 x B K (r + 1) D multiply-adds), back-projection for grad x and grad mu
    (another 2 x), so the backward costs about 3x a denoising forward on the GEMMs."""
    need_x, need_mu, need_lam, need_residual_var, need_logw = needs
    cd = means.dtype
    B, D = x.shape
    K, r = means.shape[0], bases.shape[2]
    xc = x.to(cd)
    if weights.numel() == 0:
        weights = forward(x, means, bases, eigvals, residual_var, log_weights, sigma, False, True, *layouts)[2]
    s2 = (sigma * sigma)[:, None]  # [B, 1]
    base = torch.zeros_like(s2[:, 0]) if gL is None else gL.to(cd)
    if gW is not None:
        gW = gW.to(cd)
        base = base - (gW * weights).sum(1)
    if gD is not None:
        gD = gD.to(cd)
        gDx = (gD * xc).sum(1)
        gD_den = (gD * den.to(cd)).sum(1)
    gx = torch.zeros_like(xc) if need_x else None
    gmu, glam, g_residual_var, glogw = [], [], [], []
    for ck in _chunks(K, B, D, r):
        M, U, lam, residual_var_k = means[ck], bases[ck], eigvals[ck], residual_var[ck]
        w = weights[:, ck]
        k = M.shape[0]
        Uflat = U.permute(1, 0, 2).reshape(D, k * r)
        c = (xc @ Uflat).view(B, k, r) - torch.einsum("kd,kdr->kr", M, U)  # U_k^T (x - mu_k)
        v = lam[None] + s2[:, :, None]  # [B, k, r]
        vp = residual_var_k[None] + s2  # [B, k]
        hp = residual_var_k[None] / vp
        gain = lam[None] / v - hp[:, :, None]  # h - hp
        a = w * base[:, None]
        if gW is not None:
            a = a + w * gW[:, ck]
        if gD is not None:
            gm = gD @ M.T  # [B, k]
            cg = (gD @ Uflat).view(B, k, r)
            gD_Dk = (1 - hp) * gm + hp * gDx[:, None] + (gain * c * cg).sum(-1)
            a = a + w * (gD_Dk - gD_den[:, None])
        alpha = a * (1 - hp) / s2  # coefficient of mu_k - x
        G = (a / s2)[:, :, None] * gain * c  # coefficient of U_k
        if gD is not None:
            G = G + w[:, :, None] * gain * cg
        if need_x:
            gx = gx + alpha @ M - xc * alpha.sum(1, keepdim=True) + G.reshape(B, k * r) @ Uflat.T
            if gD is not None:
                gx = gx + gD * (w * hp).sum(1, keepdim=True)
        if need_mu:
            gm_k = alpha.T @ xc - alpha.sum(0)[:, None] * M - torch.einsum("kr,kdr->kd", G.sum(0), U)
            if gD is not None:
                gm_k = gm_k + (w * (1 - hp)).T @ gD
            gmu.append(gm_k)
        if need_lam:
            gl = 0.5 * a[:, :, None] * (c * c / v**2 - 1 / v)
            if gD is not None:
                gl = gl + w[:, :, None] * s2[:, :, None] * c * cg / v**2
            glam.append(gl.sum(0))
        if need_residual_var:
            # |P y|^2 from the differences: the expansion |x|^2 - 2 x.mu + |mu|^2 loses the
            # accuracy that a / vp^2 needs at small sigma
            sq = ((xc[:, None, :] - M[None]) ** 2).sum(-1)
            perp_sq = torch.zeros_like(sq) if r == D else (sq - (c * c).sum(-1)).clamp_min(0)
            gp = 0.5 * a * (perp_sq / vp**2 - (D - r) / vp)
            if gD is not None:
                gp = gp + w * s2 / vp**2 * (gDx[:, None] - gm - (cg * c).sum(-1))
            g_residual_var.append(gp.sum(0))
        if need_logw:
            glogw.append(a.sum(0))
    cat = lambda parts: torch.cat(parts) if parts else None
    return gx, cat(gmu), cat(glam), cat(g_residual_var), cat(glogw)


def _fused_mixture_backward(x, means, bases, eigvals, residual_var, log_weights, sigma, den, logp, weights, gD, gL,
                            gW, needs, layouts=()):
    """The CPU kernel gsa_kernels::mixture_posterior_backward; the terms of a_k that are the same
    for every component of a row are summed here: row_term = gL - sum_k w_k gW_k - gD . den."""
    cd = means.dtype
    row = torch.zeros_like(logp) if gL is None else gL.to(cd)
    absent = means.new_empty(0)
    if gW is not None:
        gW = gW.to(cd).contiguous()
        row = row - (gW * weights).sum(1)
    if gD is not None:
        gD = gD.to(cd).contiguous()
        row = row - (gD * den.to(cd)).sum(1)
    return torch.ops.gsa_kernels.mixture_posterior_backward(
        x.to(cd).contiguous(), means, bases, eigvals, residual_var, log_weights, sigma, logp, row.contiguous(),
        absent if gD is None else gD, absent if gW is None else gW, *needs, *layouts)


def fused_backward_fake(x, means, bases, eigvals, residual_var, log_weights, sigma, logp, row_term, grad_den,
                         grad_weights, need_x, need_means, need_eigvals, need_residual_var, need_log_weights,
                         forward_panels=None, backward_panels=None):
    out = lambda need, t: x.new_empty(t.shape if need else (0,))
    return (out(need_x, x), out(need_means, means), out(need_eigvals, eigvals), out(need_residual_var, residual_var),
            out(need_log_weights, log_weights))


def _mixture_backward(forward, fused):
    def backward(ctx, gD, gL, gW):
        x, means, bases, eigvals, residual_var, log_weights, sigma, den, logp, weights = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[1], n[3], n[4], n[5])
        gD = gD if ctx.need_denoised and gD is not None else None
        gW = gW if ctx.need_weights and gW is not None else None
        args = (x, means, bases, eigvals, residual_var, log_weights, sigma, den, logp, weights)
        # the fused kernel has no derivative of its own: under create_graph (double backward,
        # HVPs) the composed torch-op backward, which autograd can differentiate again
        if fused is not None and x.device.type == "cpu" and not torch.is_grad_enabled():
            gx, gmu, glam, g_residual_var, glogw = fused(*args, gD, gL, gW, needs, ctx.layouts)
            gx, gmu, glam, g_residual_var, glogw = [t if need else None for t, need in zip((gx, gmu, glam, g_residual_var, glogw), needs)]
        else:
            gx, gmu, glam, g_residual_var, glogw = _mixture_backward_composed(forward, *args, gD, gL, gW, needs, ctx.layouts)
        gx = gx.to(x.dtype) if gx is not None else None
        return (gx, gmu, None, glam, g_residual_var, glogw, None, None, None, *[None] * len(ctx.layouts))

    return backward


# ----------------------------------------------------------------------------- rules
# One per op of the registry (_contract.OPS): rule(lookup, qualname, no_grad, fused) ->
# (backward, setup_context) for torch.library.register_autograd. lookup(name): the op `name` of
# the same namespace and prefix; no_grad: {argument index: name} of the tensors without a
# gradient (from the registry); fused: CPU tensors take the fused C++ mixture backward
# (gsa_kernels::mixture_posterior_backward), else the gradients are composed from the forward
# op and torch GEMMs, as for CUDA tensors.


def gaussian_map_rule(lookup, qualname, no_grad, fused):
    return _map_backward(lookup("gaussian_map")), _map_setup(qualname, no_grad)


def gaussian_trajectory_rule(lookup, qualname, no_grad, fused):
    return _trajectory_backward, _trajectory_setup(qualname, no_grad)


def mixture_posterior_rule(lookup, qualname, no_grad, fused):
    backward = _mixture_backward(lookup("mixture_posterior"), _fused_mixture_backward if fused else None)
    return backward, _mixture_setup(qualname, no_grad)


def gaussian_map_labeled_rule(lookup, qualname, no_grad, fused):
    return _labeled_map_backward(lookup("gaussian_map_labeled")), _labeled_map_setup(qualname, no_grad)


def gaussian_trajectory_labeled_rule(lookup, qualname, no_grad, fused):
    return _labeled_trajectory_backward(lookup("gaussian_map_labeled")), _labeled_trajectory_setup(qualname, no_grad)


# ----------------------------------------------------------------------------- local score machines
# Gradient w.r.t. x only (images and sigma raise when they require grad): the float64 PyTorch VJP
# of reference.local_posterior_vjp, for every backend -- exact, not a fused kernel.


def local_posterior_rule(lookup, qualname, no_grad, fused):
    def setup_context(ctx, inputs, output):
        _check_inputs(qualname, inputs, no_grad)
        ctx.save_for_backward(inputs[0], inputs[1], inputs[2])
        ctx.args = inputs[3:]

    def backward(ctx, grad):
        x, images, sigma = ctx.saved_tensors
        gx = reference.local_posterior_vjp(x, images, sigma, *ctx.args, grad) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None, None

    return backward, setup_context


# ----------------------------------------------------------------------------- the default rule


def reference_rule(name):
    """The backward of op `name` when its registry entry names no rule: the vector-Jacobian
    product of its reference (reference.<name>, plain PyTorch, differentiated by autograd in
    float64) -- exact on every backend, not fused (so: not under torch.compile's fullgraph, which
    sees the reference's ops, and at the reference's memory). A new op is differentiable with it
    from its first kernel; a closed-form or fused rule here replaces it when it pays."""

    def rule(lookup, qualname, no_grad, fused):
        def setup_context(ctx, inputs, output):
            _check_inputs(qualname, inputs, no_grad)
            ctx.tensor_at = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
            ctx.save_for_backward(*[inputs[i] for i in ctx.tensor_at])
            ctx.others = {i: v for i, v in enumerate(inputs) if not isinstance(v, torch.Tensor)}

        def backward(ctx, *grads):
            saved = dict(zip(ctx.tensor_at, ctx.saved_tensors))
            wanted = [i for i in ctx.tensor_at if ctx.needs_input_grad[i]]
            args = dict(ctx.others)
            for i, t in saved.items():
                t = t.detach()
                args[i] = t.double().requires_grad_(i in wanted) if t.is_floating_point() else t
            with torch.enable_grad():
                out = getattr(reference, name)(*[args[i] for i in range(len(args))])
            outs = out if isinstance(out, (tuple, list)) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad and o.numel() > 0]
            result = [None] * len(args)
            if pairs and wanted:
                got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted],
                                          [g.to(o.dtype) for o, g in pairs], allow_unused=True)
                for i, g in zip(wanted, got):
                    result[i] = torch.zeros_like(saved[i]) if g is None else g.to(saved[i].dtype)
            return tuple(result)

        return backward, setup_context

    return rule
