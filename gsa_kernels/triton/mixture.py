"""Mixture family: posterior over K low-rank Gaussian components, flash-attention style.

A program owns BLOCK_B rows and one split of the components (grid: row blocks x splits; splits
> 1 when B alone does not fill the device: split-K). It streams its components with an online
softmax: per row the running max m, the sum l of exp(logit - m), the sum hsum of
exp(logit - m) h_k (weight of the x term), and the weighted sum acc [B, D] of the rest of the
component denoisers D_k = (1 - h_k) mu_k + h_k x + U_k (g_k * c_k). D is too wide for acc to
live in registers, so acc lives in global memory (a [S, B, D] partial buffer, L2-resident per
program) and is rescaled by exp(m_old - m_new) as it is updated. A second small kernel merges
the S partial states exactly (merge_scale in spectral.h) and normalises: one pass over acc and,
when asked, over the stored logits (they are the [B, K] weights output, normalised in place).

Logits use |x - mu_k|^2 summed from the differences (never |x|^2 - 2 x.mu + |mu|^2): logits
scale as 1/sigma^2 and the expansion loses the small-sigma weights (DESIGN.md section 1).

Two kernels stream the components:
- r > 0: one component at a time (each has its own basis): c = (x - mu_k) U_k by tl.dot over
  D tiles, kept in registers when r <= MAX_REGISTER_RANK, else in a [S, 2, B, r] scratch. The
  residual |P_perp y|^2 of the logit is |y|^2 - |c|^2 where that is accurate, else (small
  lp + sigma^2) |y - U_k c|^2 summed directly: one more tl.dot pass over D.
- r = 0 (the empirical / delta mixture, and isotropic components): BLOCK_K components at a time;
  the weighted sum of means is one tl.dot of the [BLOCK_B, BLOCK_K] weights with the means tile.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _config
from ._dot import dot
from .gaussian import _launch

LOG_2PI = math.log(2.0 * math.pi)
MAX_REGISTER_RANK = 16 if _config.INTERPRET else 64
BLOCK_B = 16 if _config.INTERPRET else 32  # fixed (not tuned): the split count depends on it
MIN_COMPONENTS_PER_SPLIT_LOWRANK = 1 if _config.INTERPRET else 4
MIN_COMPONENTS_PER_SPLIT_ISOTROPIC = 16 if _config.INTERPRET else 128
# Above this |y|^2 / (lp + s^2) the residual |P_perp y|^2 is summed directly: the expansion's
# logit error is ~2 eps |y|^2 / (lp + s^2), kept below ~1e-4 in float32 (float64: never needed).
EXACT_RESIDUAL_RATIO = {torch.float32: 256.0, torch.float64: 2.0**40}


@triton.jit
def _merge_scale(m_from, m_to):
    """exp(m_from - m_to) with exp(-inf - anything) = 0 (merge_scale in spectral.h)."""
    neg_inf = float("-inf")
    safe_to = tl.where(m_to == neg_inf, 0.0, m_to)
    return tl.where(m_from == neg_inf, 0.0, tl.exp(m_from - safe_to))


@triton.jit
def _update_acc(acc_ptr, offs, mask, contrib, m_old, alpha):
    """acc = alpha * acc + contrib; acc is not read before the first component (m_old = -inf)."""
    started = m_old[:, None] != float("-inf")
    old = tl.load(acc_ptr + offs, mask=mask & started, other=0.0)
    tl.store(acc_ptr + offs, old * alpha[:, None] + contrib, mask=mask)


_LOWRANK_GPU_CONFIGS = [  # (meta, num_warps, num_stages); BLOCK_B is fixed (module constant)
    ({"BLOCK_D": 32, "BLOCK_R": 32}, 4, 2),
    ({"BLOCK_D": 32, "BLOCK_R": 32}, 8, 2),
    ({"BLOCK_D": 64, "BLOCK_R": 32}, 8, 2),
    ({"BLOCK_D": 64, "BLOCK_R": 64}, 8, 3),
]


@triton.autotune(
    configs=_config.configs(_LOWRANK_GPU_CONFIGS, {"BLOCK_D": 32, "BLOCK_R": 16}),
    key=["D", "R", "K", "C_IN_REGISTERS", "NEED_DENOISED", "NEED_WEIGHTS", "PRECISION"],
)
@triton.jit
def _mixture_lowrank_kernel(
    x_ptr, means_ptr, bases_ptr, eigvals_ptr, lp_ptr, logw_ptr, sigma_ptr,
    logits_ptr, state_ptr, acc_ptr, scratch_ptr,  # logits [B, K]; state [3, S, B]; acc [S, B, D]; scratch [S, 2, B, R]
    B, D, R, K, K_PER_SPLIT, S,
    NEED_DENOISED: tl.constexpr, NEED_WEIGHTS: tl.constexpr, C_IN_REGISTERS: tl.constexpr, R_PAD: tl.constexpr,
    FULL_RANK: tl.constexpr, EXACT_RESIDUAL_RATIO: tl.constexpr, PRECISION: tl.constexpr, LOG_2PI: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    sigma = tl.load(sigma_ptr + rows, mask=row_ok, other=1.0)
    s2 = sigma * sigma
    cdt = s2.dtype
    k_lo = split.to(tl.int64) * K_PER_SPLIT  # int64 loop index: k * D * R may pass 2^31
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    acc_rows = (split * B + rows64)[:, None] * D
    c_rows = (2 * split * B + rows64)[:, None] * R  # scratch slot 0: c; slot 1: g * c
    gc_rows = ((2 * split + 1) * B + rows64)[:, None] * R
    r_reg = tl.arange(0, R_PAD)

    m = tl.full((BLOCK_B,), float("-inf"), cdt)
    l = tl.zeros((BLOCK_B,), cdt)
    hsum = tl.zeros((BLOCK_B,), cdt)
    for k in range(k_lo, k_hi):
        lp = tl.load(lp_ptr + k)
        vp = lp + s2
        h = lp / vp
        mean_k = means_ptr + k * D
        basis_k = bases_ptr + k * D * R
        # pass A: |y|^2 directly (and c when it fits in registers)
        sq = tl.zeros((BLOCK_B,), cdt)
        c = tl.zeros((BLOCK_B, R_PAD), cdt)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            x = tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            mu = tl.load(mean_k + d, mask=d_ok, other=0.0)
            y = tl.where(d_ok[None, :], x.to(cdt) - mu[None, :], 0.0)
            sq += tl.sum(y * y, axis=1)
            if C_IN_REGISTERS:
                u = tl.load(basis_k + d[:, None] * R + r_reg[None, :], mask=d_ok[:, None] & (r_reg[None, :] < R), other=0.0)
                c = dot(y, u, c, PRECISION)
        # the spectral terms of the logit; g * c (g = lam / (lam + s^2) - h) for the denoiser
        cc = tl.zeros((BLOCK_B,), cdt)
        cc_w = tl.zeros((BLOCK_B,), cdt)
        logdet = tl.zeros((BLOCK_B,), cdt)
        if C_IN_REGISTERS:
            lam = tl.load(eigvals_ptr + k * R + r_reg, mask=r_reg < R, other=0.0)
            v = lam[None, :] + s2[:, None]
            cc = tl.sum(c * c, axis=1)
            cc_w = tl.sum(c * c / v, axis=1)
            logdet = tl.sum(tl.where(r_reg[None, :] < R, tl.log(v), 0.0), axis=1)
            gc = c * (lam[None, :] / v - h[:, None])
        else:
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < R
                c_tile = tl.zeros((BLOCK_B, BLOCK_R), cdt)
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    d_ok = d < D
                    x = tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    mu = tl.load(mean_k + d, mask=d_ok, other=0.0)
                    y = tl.where(d_ok[None, :], x.to(cdt) - mu[None, :], 0.0)
                    u = tl.load(basis_k + d[:, None] * R + r[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
                    c_tile = dot(y, u, c_tile, PRECISION)
                lam = tl.load(eigvals_ptr + k * R + r, mask=r_ok, other=0.0)
                v = lam[None, :] + s2[:, None]
                cc += tl.sum(c_tile * c_tile, axis=1)
                cc_w += tl.sum(c_tile * c_tile / v, axis=1)
                logdet += tl.sum(tl.where(r_ok[None, :], tl.log(v), 0.0), axis=1)
                gc_tile = c_tile * (lam[None, :] / v - h[:, None])
                tl.store(scratch_ptr + c_rows + r[None, :], c_tile, mask=row_ok[:, None] & r_ok[None, :])
                tl.store(scratch_ptr + gc_rows + r[None, :], gc_tile, mask=row_ok[:, None] & r_ok[None, :])
            tl.debug_barrier()
        # component_logpdf (spectral.h) needs the residual |P_perp y|^2 (0 at full rank). The
        # expansion |y|^2 - |c|^2 cancels when y lies near span(U_k); its rounding (~eps |y|^2)
        # divided by lp + s^2 moves the logit. When |y|^2 / (lp + s^2) is large enough for that to
        # matter, |y - U_k c|^2 is summed directly instead (one more tl.dot pass over D).
        resid = tl.zeros((BLOCK_B,), cdt)
        if not FULL_RANK:
            resid = tl.maximum(sq - cc, 0.0)
            if tl.max(tl.where(row_ok, sq / vp, 0.0)) > EXACT_RESIDUAL_RATIO:
                resid = tl.zeros((BLOCK_B,), cdt)
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    d_ok = d < D
                    x = tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    mu = tl.load(mean_k + d, mask=d_ok, other=0.0)
                    y = tl.where(d_ok[None, :], x.to(cdt) - mu[None, :], 0.0)
                    if C_IN_REGISTERS:
                        u = tl.load(basis_k + d[:, None] * R + r_reg[None, :], mask=d_ok[:, None] & (r_reg[None, :] < R), other=0.0)
                        y = dot(-c, tl.trans(u), y, PRECISION)
                    else:
                        for r0 in range(0, R, BLOCK_R):
                            r = r0 + tl.arange(0, BLOCK_R)
                            r_ok = r < R
                            c_tile = tl.load(scratch_ptr + c_rows + r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                            u = tl.load(basis_k + d[:, None] * R + r[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
                            y = dot(-c_tile, tl.trans(u), y, PRECISION)
                    resid += tl.sum(tl.where(d_ok[None, :], y * y, 0.0), axis=1)
        logit = tl.load(logw_ptr + k) - 0.5 * (cc_w + resid / vp + logdet + (D - R) * tl.log(vp) + D * LOG_2PI)
        if NEED_WEIGHTS:
            tl.store(logits_ptr + rows64 * K + k, logit, mask=row_ok)
        m_new = tl.maximum(m, logit)
        alpha = _merge_scale(m, m_new)
        pk = _merge_scale(logit, m_new)
        l = l * alpha + pk
        hsum = hsum * alpha + pk * h
        if NEED_DENOISED:  # acc = alpha acc + pk [(1 - h) mu_k + (g c) U_k^T]
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = d < D
                mu = tl.load(mean_k + d, mask=d_ok, other=0.0)
                contrib = (1.0 - h)[:, None] * mu[None, :]
                if C_IN_REGISTERS:
                    u = tl.load(basis_k + d[:, None] * R + r_reg[None, :], mask=d_ok[:, None] & (r_reg[None, :] < R), other=0.0)
                    contrib = dot(gc, tl.trans(u), contrib, PRECISION)
                else:
                    for r0 in range(0, R, BLOCK_R):
                        r = r0 + tl.arange(0, BLOCK_R)
                        r_ok = r < R
                        gc_tile = tl.load(scratch_ptr + gc_rows + r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                        u = tl.load(basis_k + d[:, None] * R + r[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
                        contrib = dot(gc_tile, tl.trans(u), contrib, PRECISION)
                _update_acc(acc_ptr, acc_rows + d[None, :], row_ok[:, None] & d_ok[None, :], pk[:, None] * contrib, m, alpha)
            tl.debug_barrier()  # the next component rewrites the scratch and acc tiles
        m = m_new
    state = state_ptr + split * B + rows
    tl.store(state, m, mask=row_ok)
    tl.store(state + S * B, l, mask=row_ok)
    tl.store(state + 2 * S * B, hsum, mask=row_ok)


_ISOTROPIC_GPU_CONFIGS = [  # (meta, num_warps, num_stages): BLOCK_DS is the depth of the
    # [BLOCK_B, BLOCK_K, BLOCK_DS] difference tile of |x - mu|^2; BLOCK_D the width of the acc update
    ({"BLOCK_K": 32, "BLOCK_D": 64, "BLOCK_DS": 8}, 4, 2),
    ({"BLOCK_K": 64, "BLOCK_D": 64, "BLOCK_DS": 8}, 8, 2),
    ({"BLOCK_K": 64, "BLOCK_D": 32, "BLOCK_DS": 8}, 8, 2),
    ({"BLOCK_K": 128, "BLOCK_D": 32, "BLOCK_DS": 4}, 8, 2),
]


@triton.autotune(
    configs=_config.configs(_ISOTROPIC_GPU_CONFIGS, {"BLOCK_K": 16, "BLOCK_D": 32, "BLOCK_DS": 16}),
    key=["D", "K", "NEED_DENOISED", "NEED_WEIGHTS", "PRECISION"],
)
@triton.jit
def _mixture_isotropic_kernel(
    x_ptr, means_ptr, lp_ptr, logw_ptr, sigma_ptr,
    logits_ptr, state_ptr, acc_ptr,  # logits [B, K]; state [3, S, B]; acc [S, B, D]
    B, D, K, K_PER_SPLIT, S,
    NEED_DENOISED: tl.constexpr, NEED_WEIGHTS: tl.constexpr, PRECISION: tl.constexpr,
    LOG_2PI: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr,
):
    """r = 0: component k is N(mu_k, (lp_k + s^2) I); lp_k = 0 is the empirical delta mixture."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    sigma = tl.load(sigma_ptr + rows, mask=row_ok, other=1.0)
    s2 = sigma * sigma
    cdt = s2.dtype
    k_lo = split.to(tl.int64) * K_PER_SPLIT  # int64 loop index: k * D * R may pass 2^31
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    acc_rows = (split * B + rows64)[:, None] * D

    m = tl.full((BLOCK_B,), float("-inf"), cdt)
    l = tl.zeros((BLOCK_B,), cdt)
    hsum = tl.zeros((BLOCK_B,), cdt)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        # |x - mu_k|^2 for the [BLOCK_B, BLOCK_K] tile, summed from the differences
        sq = tl.zeros((BLOCK_B, BLOCK_K), cdt)
        for d0 in range(0, D, BLOCK_DS):
            d = d0 + tl.arange(0, BLOCK_DS)
            d_ok = d < D
            x = tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            mu = tl.load(means_ptr + k[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            diff = x.to(cdt)[:, None, :] - mu[None, :, :]
            sq += tl.sum(diff * diff, axis=2)
        lp = tl.load(lp_ptr + k, mask=k_ok, other=0.0)
        vp = lp[None, :] + s2[:, None]
        logw = tl.load(logw_ptr + k, mask=k_ok, other=float("-inf"))
        logit = logw[None, :] - 0.5 * (sq / vp + D * tl.log(vp) + D * LOG_2PI)
        logit = tl.where(k_ok[None, :], logit, float("-inf"))
        if NEED_WEIGHTS:
            tl.store(logits_ptr + rows64[:, None] * K + k[None, :], logit, mask=row_ok[:, None] & k_ok[None, :])
        m_new = tl.maximum(m, tl.max(logit, axis=1))
        alpha = _merge_scale(m, m_new)
        p = _merge_scale(logit, m_new[:, None])
        h = lp[None, :] / vp
        l = l * alpha + tl.sum(p, axis=1)
        hsum = hsum * alpha + tl.sum(p * h, axis=1)
        if NEED_DENOISED:  # acc = alpha acc + (p (1 - h)) @ means[k tile]
            pm = p * (1.0 - h)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = d < D
                mu = tl.load(means_ptr + k[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                contrib = dot(pm, mu, tl.zeros((BLOCK_B, BLOCK_D), cdt), PRECISION)
                _update_acc(acc_ptr, acc_rows + d[None, :], row_ok[:, None] & d_ok[None, :], contrib, m, alpha)
        m = m_new
    state = state_ptr + split * B + rows
    tl.store(state, m, mask=row_ok)
    tl.store(state + S * B, l, mask=row_ok)
    tl.store(state + 2 * S * B, hsum, mask=row_ok)


@triton.jit
def _mixture_merge_kernel(
    x_ptr, state_ptr, acc_ptr, logits_ptr, denoised_ptr, logp_ptr,
    B, D, K, S,
    NEED_DENOISED: tl.constexpr, NEED_WEIGHTS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Merge the S partial (m, l, hsum, acc) states; write logp, denoised = (acc + hsum x) / l,
    and the weights exp(logit - logp) in place of the logits. Grid: row blocks x column tiles."""
    tile = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    m = tl.load(state_ptr + rows, mask=row_ok, other=0.0)
    for s in range(1, S):
        m = tl.maximum(m, tl.load(state_ptr + s * B + rows, mask=row_ok, other=0.0))
    l = tl.zeros_like(m)
    hsum = tl.zeros_like(m)
    for s in range(0, S):
        scale = _merge_scale(tl.load(state_ptr + s * B + rows, mask=row_ok, other=0.0), m)
        l += scale * tl.load(state_ptr + (S + s) * B + rows, mask=row_ok, other=1.0)  # (masked rows: no log 0)
        hsum += scale * tl.load(state_ptr + (2 * S + s) * B + rows, mask=row_ok, other=0.0)
    logp = m + tl.log(l)
    tl.store(logp_ptr + rows, logp, mask=row_ok & (tile == 0))
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    if NEED_DENOISED:
        mask = row_ok[:, None] & (cols[None, :] < D)
        num = tl.zeros((BLOCK_B, BLOCK_N), m.dtype)
        for s in range(0, S):
            scale = _merge_scale(tl.load(state_ptr + s * B + rows, mask=row_ok, other=0.0), m)
            num += scale[:, None] * tl.load(acc_ptr + (s * B + rows64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=mask, other=0.0).to(m.dtype)
        out = (num + hsum[:, None] * x) / l[:, None]
        tl.store(denoised_ptr + rows64[:, None] * D + cols[None, :], out.to(denoised_ptr.dtype.element_ty), mask=mask)
    if NEED_WEIGHTS:
        mask = row_ok[:, None] & (cols[None, :] < K)
        offs = rows64[:, None] * K + cols[None, :]
        logit = tl.load(logits_ptr + offs, mask=mask, other=float("-inf"))
        tl.store(logits_ptr + offs, tl.exp(logit - logp[:, None]), mask=mask)


MAX_PARTIAL_ELEMENTS = 1 << 24  # the [splits, B, D] partial accumulators stay <= 64 MB in float32


def _splits(B, D, K, min_per_split, device):
    """Component splits: enough programs to fill the device, at least min_per_split components
    each, and a bounded partial-accumulator buffer."""
    row_blocks = triton.cdiv(B, BLOCK_B)
    want = max(1, triton.cdiv(_config.target_programs(device), row_blocks))
    return max(1, min(want, triton.cdiv(K, min_per_split), MAX_PARTIAL_ELEMENTS // (B * D)))


def mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights, splits=None):
    """(denoised [B, D] in x's dtype or [0], logp [B], weights [B, K] or [0]; compute dtype).
    `splits` overrides the split-K count (tests)."""
    B, D = x.shape
    K, R = means.shape[0], bases.shape[2]
    cd = means.dtype
    dev = x.device
    logp = torch.empty((B,), dtype=cd, device=dev)
    logits = torch.empty((B, K) if need_weights else (0,), dtype=cd, device=dev)
    denoised = torch.empty((B, D) if need_denoised else (0,), dtype=x.dtype, device=dev)
    if B == 0:
        return denoised, logp, logits
    isotropic = R == 0
    min_per_split = MIN_COMPONENTS_PER_SPLIT_ISOTROPIC if isotropic else MIN_COMPONENTS_PER_SPLIT_LOWRANK
    S = splits if splits is not None else _splits(B, D, K, min_per_split, dev)
    k_per_split = triton.cdiv(K, S)
    S = triton.cdiv(K, k_per_split)  # no empty split
    state = torch.empty((3, S, B), dtype=cd, device=dev)
    acc = torch.empty((S, B, D) if need_denoised else (0,), dtype=cd, device=dev)
    grid = (triton.cdiv(B, BLOCK_B), S)
    common = dict(NEED_DENOISED=need_denoised, NEED_WEIGHTS=need_weights, PRECISION=_config.dot_precision(cd), LOG_2PI=LOG_2PI, BLOCK_B=BLOCK_B)
    if isotropic:
        _launch(_mixture_isotropic_kernel)[grid](
            x, means, residual_var, log_weights, sigma, logits, state, acc, B, D, K, k_per_split, S, **common)
    else:
        in_registers = R <= MAX_REGISTER_RANK
        scratch = torch.empty((0 if in_registers else S * 2 * B * R,), dtype=cd, device=dev)
        r_pad = max(16, triton.next_power_of_2(R)) if in_registers else 16
        _launch(_mixture_lowrank_kernel)[grid](
            x, means, bases, eigvals, residual_var, log_weights, sigma, logits, state, acc, scratch,
            B, D, R, K, k_per_split, S, C_IN_REGISTERS=in_registers, R_PAD=r_pad, FULL_RANK=R == D,
            EXACT_RESIDUAL_RATIO=EXACT_RESIDUAL_RATIO[cd], **common)
    block_n = 64 if _config.INTERPRET else 128
    cols = max(D if need_denoised else 0, K if need_weights else 0, 1)
    merge_grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(cols, block_n))
    _launch(_mixture_merge_kernel)[merge_grid](
        x, state, acc, logits, denoised, logp, B, D, K, S,
        NEED_DENOISED=need_denoised, NEED_WEIGHTS=need_weights, BLOCK_B=BLOCK_B, BLOCK_N=block_n)
    return denoised, logp, logits
