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
scale as 1/sigma^2 and the expansion loses the small-sigma weights (docs/architecture.md). For
the same reason logits, their running max m, l and hsum are float64 in every dtype (float32
rounds a logit of 1e6 by 0.06); so is log(2 pi) (a float constexpr would be float32).

Two kernels stream the components:
- r > 0: one component at a time (each has its own basis): c = (x - mu_k) U_k by tl.dot over
  D tiles, kept in registers when r <= MAX_REGISTER_RANK, else in a [S, 2, B, r] scratch. The
  residual |P_perp y|^2 of the logit is |y|^2 - |c|^2 where that is accurate, else (small
  residual_var + sigma^2) e = y - U_k c summed directly in float64: one more tl.dot pass over D.
- r = 0 (the empirical / delta mixture, and isotropic components): BLOCK_K components at a time.
  float32: the distance GEMM on tensor cores, |x - mu_k|^2 = |x|^2 + |mu_k|^2 - 2 x.mu_k with
  x.mu_k one split3 tl.dot over D and the norms in float64; a tile of components that can still
  compete (fast logit within CUTOFF plus the error bounds of the running max) whose bound exceeds
  LOGIT_TOL gets its distances recomputed (the CPU backend's refinement, csrc/cpu/empirical.cpp):
  the same expansion with a float64 dot where its error bound allows, else float64 differences. float64: distances from float64 differences. The weighted
  sum of means is one tl.dot of the [BLOCK_B, BLOCK_K] weights with the means tile (dense
  posteriors); a tile whose weights are all below float range and that leaves the max where it
  was skips it (one-hot posteriors).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _config
from ._dot import dot

LOG_2PI = math.log(2.0 * math.pi)  # passed as a constexpr and materialised as float64 (tl.full)
MAX_REGISTER_RANK = 16 if _config.INTERPRET else 64
BLOCK_B = 16 if _config.INTERPRET else 32  # fixed (not tuned): the split count depends on it
MIN_COMPONENTS_PER_SPLIT_LOWRANK = 1 if _config.INTERPRET else 4
MIN_COMPONENTS_PER_SPLIT_ISOTROPIC = 16 if _config.INTERPRET else 128
# A fast logit this exact needs no refinement (float64 paths are accurate to 1e-9).
LOGIT_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
CUTOFF = 30.0  # exp(-30) ~ 1e-13: weight of a component never refined
# Above this (r + 2) |y|^2 / (residual_var + s^2) the residual |P_perp y|^2 is summed directly: the
# expansion |y|^2 - |c|^2 rounds by ~2 eps |y|^2 and misses c^T (U^T U - I) c (~r eps |c|^2) of a
# rounded basis, so its logit error is ~(r + 2) eps |y|^2 / (2 (residual_var + s^2)) <= LOGIT_TOL.
EXACT_RESIDUAL_RATIO = {dt: 2 * LOGIT_TOL[dt] / torch.finfo(dt).eps for dt in LOGIT_TOL}


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


@triton.jit
def _y_tile(x_ptr, mean_k, rows64, row_ok, d, d_ok, D):
    """y = x - mu_k on columns d of the rows [BLOCK_B, len(d)] in the compute dtype, 0 past D."""
    x = tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    mu = tl.load(mean_k + d, mask=d_ok, other=0.0)
    return tl.where(d_ok[None, :], x.to(mu.dtype) - mu[None, :], 0.0)


@triton.jit
def _store_state(state_ptr, split, B, S, rows, row_ok, m, l, hsum):
    """The split's (m, l, hsum) of its rows into state [3, S, B] (_mixture_merge_kernel merges them)."""
    state = state_ptr + split * B + rows
    tl.store(state, m, mask=row_ok)
    tl.store(state + S * B, l, mask=row_ok)
    tl.store(state + 2 * S * B, hsum, mask=row_ok)


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
    x_ptr, means_ptr, bases_ptr, eigvals_ptr, residual_var_ptr, logw_ptr, sigma_ptr,
    logits_ptr, state_ptr, acc_ptr, scratch_ptr,  # logits [B, K] and state [3, S, B] float64; acc [S, B, D]; scratch [S, 2, B, R]
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

    log_2pi = tl.full((BLOCK_B,), LOG_2PI, tl.float64)
    m = tl.full((BLOCK_B,), float("-inf"), tl.float64)
    l = tl.zeros((BLOCK_B,), tl.float64)
    hsum = tl.zeros((BLOCK_B,), tl.float64)
    for k in range(k_lo, k_hi):
        residual_var = tl.load(residual_var_ptr + k)
        vp = residual_var + s2
        h = residual_var / vp
        mean_k = means_ptr + k * D
        basis_k = bases_ptr + k * D * R
        # pass A: |y|^2 directly (and c when it fits in registers)
        sq = tl.zeros((BLOCK_B,), cdt)
        c = tl.zeros((BLOCK_B, R_PAD), cdt)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            y = _y_tile(x_ptr, mean_k, rows64, row_ok, d, d_ok, D)
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
                    y = _y_tile(x_ptr, mean_k, rows64, row_ok, d, d_ok, D)
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
        # expansion |y|^2 - |c|^2 cancels when y lies near span(U_k); its error divided by
        # residual_var + s^2 moves the logit. When that can matter (EXACT_RESIDUAL_RATIO),
        # |y - U_k c|^2 is summed directly instead (one more tl.dot pass over D).
        residual = tl.zeros((BLOCK_B,), tl.float64)
        if not FULL_RANK:
            residual = tl.maximum(sq - cc, 0.0).to(tl.float64)
            if tl.max(tl.where(row_ok, sq / vp, 0.0)) * (R + 2) > EXACT_RESIDUAL_RATIO:
                # float64 e = y - U_k c; with c in registers, minus |U_k^T e|^2: the part of span(U_k)
                # that the rounded c left in e (|P_perp y|^2 = |e|^2 - |U^T e|^2 for any c)
                residual = tl.zeros((BLOCK_B,), tl.float64)
                ute = tl.zeros((BLOCK_B, R_PAD), tl.float64)
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    d_ok = d < D
                    x = tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    mu = tl.load(mean_k + d, mask=d_ok, other=0.0)
                    if C_IN_REGISTERS:
                        e = tl.where(d_ok[None, :], x.to(tl.float64) - mu.to(tl.float64)[None, :], 0.0)
                        u = tl.load(basis_k + d[:, None] * R + r_reg[None, :], mask=d_ok[:, None] & (r_reg[None, :] < R), other=0.0)
                        u = u.to(tl.float64)
                        e = tl.dot(-c.to(tl.float64), tl.trans(u), e, input_precision="ieee")
                        ute = tl.dot(e, u, ute, input_precision="ieee")
                        residual += tl.sum(e * e, axis=1)
                    else:
                        y = tl.where(d_ok[None, :], x.to(cdt) - mu[None, :], 0.0)
                        for r0 in range(0, R, BLOCK_R):
                            r = r0 + tl.arange(0, BLOCK_R)
                            r_ok = r < R
                            c_tile = tl.load(scratch_ptr + c_rows + r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                            u = tl.load(basis_k + d[:, None] * R + r[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
                            y = dot(-c_tile, tl.trans(u), y, PRECISION)
                        residual += tl.sum(tl.where(d_ok[None, :], y * y, 0.0), axis=1).to(tl.float64)
                residual = tl.maximum(residual - tl.sum(ute * ute, axis=1), 0.0)
        vp64 = vp.to(tl.float64)
        logit = tl.load(logw_ptr + k).to(tl.float64) - 0.5 * (
            cc_w.to(tl.float64) + residual / vp64 + logdet.to(tl.float64) + (D - R) * tl.log(vp64) + D * log_2pi)
        if NEED_WEIGHTS:
            tl.store(logits_ptr + rows64 * K + k, logit, mask=row_ok)
        m_new = tl.maximum(m, logit)
        alpha64 = _merge_scale(m, m_new)
        pk64 = _merge_scale(logit, m_new)
        l = l * alpha64 + pk64
        hsum = hsum * alpha64 + pk64 * h.to(tl.float64)
        alpha = alpha64.to(cdt)
        pk = pk64.to(cdt)
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
    _store_state(state_ptr, split, B, S, rows, row_ok, m, l, hsum)


@triton.jit
def _x_and_means_tiles(x_ptr, means_ptr, rows64, row_ok, k, k_ok, d, D):
    """Columns d of the rows' x [BLOCK_B, len(d)] and of the means mu_k [BLOCK_K, len(d)], 0 past D."""
    d_ok = d < D
    x = tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    mu = tl.load(means_ptr + k[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    return x, mu


@triton.jit
def _sq_distances(x_ptr, means_ptr, rows64, row_ok, k, k_ok, D,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DS: tl.constexpr):
    """|x - mu_k|^2 [BLOCK_B, BLOCK_K] in float64 from the differences, exact to ~1e-16 relative."""
    sq = tl.zeros((BLOCK_B, BLOCK_K), tl.float64)
    for d0 in range(0, D, BLOCK_DS):
        x, mu = _x_and_means_tiles(x_ptr, means_ptr, rows64, row_ok, k, k_ok, d0 + tl.arange(0, BLOCK_DS), D)
        diff = x.to(tl.float64)[:, None, :] - mu.to(tl.float64)[None, :, :]
        sq += tl.sum(diff * diff, axis=2)
    return sq


_ISOTROPIC_GPU_CONFIGS = [  # (meta, num_warps, num_stages): BLOCK_K points per step; BLOCK_D the depth of
    # the x . mu dots and the width of the acc update; BLOCK_DS the depth of the exact float64
    # [BLOCK_B, BLOCK_K, BLOCK_DS] difference tile (refinement; the float64 kernel's distances)
    ({"BLOCK_K": 32, "BLOCK_D": 64, "BLOCK_DS": 8}, 4, 2),
    ({"BLOCK_K": 64, "BLOCK_D": 64, "BLOCK_DS": 8}, 8, 2),
    ({"BLOCK_K": 64, "BLOCK_D": 32, "BLOCK_DS": 8}, 8, 2),
    ({"BLOCK_K": 128, "BLOCK_D": 32, "BLOCK_DS": 4}, 8, 2),
]
# Error model of a float32 dot per PRECISION (EXPAND): the split's relative error per product
# (a_lo b_lo and the rounding of the lo parts, 3 x 2^-22 for 3xTF32; 2 x 2^-11 for one TF32
# product) and how many float32 roundings (truncating, 2^-23 each) the accumulator takes per
# element of D: a tensor-core dot rounds once per k = 8 products and 3xTF32 runs three dots.
DOT_SPLIT_ERR = {"split3": 3 * 2.0**-22, "tf32x3": 3 * 2.0**-22, "tf32": 2 * 2.0**-11, "ieee": 0.0}
DOT_ROUNDINGS_PER_D = {"split3": 3 / 8, "tf32x3": 3 / 8, "tf32": 1 / 8, "ieee": 1.0}


@triton.autotune(
    configs=_config.configs(_ISOTROPIC_GPU_CONFIGS, {"BLOCK_K": 16, "BLOCK_D": 32, "BLOCK_DS": 16}),
    key=["D", "K", "NEED_DENOISED", "NEED_WEIGHTS", "PRECISION"],
)
@triton.jit
def _mixture_isotropic_kernel(
    x_ptr, means_ptr, residual_var_ptr, logw_ptr, sigma_ptr,
    logits_ptr, state_ptr, acc_ptr,  # logits [B, K] and state [3, S, B] float64; acc [S, B, D]
    B, D, K, K_PER_SPLIT, S,
    NEED_DENOISED: tl.constexpr, NEED_WEIGHTS: tl.constexpr, PRECISION: tl.constexpr,
    LOG_2PI: tl.constexpr, EXPAND: tl.constexpr, LOGIT_TOL: tl.constexpr, CUTOFF: tl.constexpr,
    DOT_SPLIT_ERR: tl.constexpr, DOT_ROUNDINGS_PER_D: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr,
):
    """r = 0: component k is N(mu_k, (residual_var_k + s^2) I); residual_var_k = 0 is the
    empirical delta mixture. EXPAND (float32): distances |x|^2 + |mu|^2 - 2 x.mu with the dots on
    tensor cores, and exact float64 distances for the points that can still compete."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    sigma = tl.load(sigma_ptr + rows, mask=row_ok, other=1.0)
    cdt = sigma.dtype
    s2_64 = sigma.to(tl.float64) * sigma.to(tl.float64)
    k_lo = split.to(tl.int64) * K_PER_SPLIT  # int64 loop index: k * D may pass 2^31
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    acc_rows = (split * B + rows64)[:, None] * D
    log_2pi = tl.full((BLOCK_B, BLOCK_K), LOG_2PI, tl.float64)
    # |x|^2 in float64 (exact from float32 elements to ~1e-16), and the relative error bound of
    # the float32 dots x . mu against |x| |mu| (DOT_SPLIT_ERR, DOT_ROUNDINGS_PER_D)
    x_sq = tl.zeros((BLOCK_B,), tl.float64)
    if EXPAND:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
            x64 = x.to(tl.float64)
            x_sq += tl.sum(x64 * x64, axis=1)
    x_norm = tl.sqrt(x_sq)
    dot_err = DOT_SPLIT_ERR + (DOT_ROUNDINGS_PER_D * D + BLOCK_D + 2) * 1.1920928955078125e-07

    m = tl.full((BLOCK_B,), float("-inf"), tl.float64)
    l = tl.zeros((BLOCK_B,), tl.float64)
    hsum = tl.zeros((BLOCK_B,), tl.float64)
    m_fast = tl.full((BLOCK_B,), float("-inf"), tl.float64)  # largest fast logit and its error bound
    err_at_max = tl.zeros((BLOCK_B,), tl.float64)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        residual_var = tl.load(residual_var_ptr + k, mask=k_ok, other=0.0).to(tl.float64)
        vp = residual_var[None, :] + s2_64[:, None]
        logw = tl.load(logw_ptr + k, mask=k_ok, other=float("-inf")).to(tl.float64)
        log_norm = logw[None, :] - 0.5 * (D * tl.log(vp) + D * log_2pi)
        if EXPAND:  # x . mu_k of the [BLOCK_B, BLOCK_K] tile as one tensor-core dot over D
            xmu = tl.zeros((BLOCK_B, BLOCK_K), cdt)
            mu_sq = tl.zeros((BLOCK_K,), tl.float64)
            for d0 in range(0, D, BLOCK_D):
                x, mu = _x_and_means_tiles(x_ptr, means_ptr, rows64, row_ok, k, k_ok, d0 + tl.arange(0, BLOCK_D), D)
                xmu = dot(x.to(cdt), tl.trans(mu), xmu, PRECISION)
                mu64 = mu.to(tl.float64)
                mu_sq += tl.sum(mu64 * mu64, axis=1)
            sq = x_sq[:, None] + mu_sq[None, :] - 2.0 * xmu.to(tl.float64)
            sq = tl.where(sq < 0, 0.0, sq)  # (NaN rows stay NaN)
            logit = tl.where(k_ok[None, :], log_norm - 0.5 * sq / vp, float("-inf"))
            # logit error bound (the dot's only: |x|^2 and |mu|^2 are float64 sums), then exact
            # distances for the components that can still compete (csrc/cpu/empirical.cpp)
            err = dot_err * x_norm[:, None] * tl.sqrt(mu_sq)[None, :] / vp
            tile_max = tl.max(logit, axis=1)
            tile_err = tl.max(tl.where(logit == tile_max[:, None], err, 0.0), axis=1)
            better = tile_max > m_fast
            m_fast = tl.where(better, tile_max, m_fast)
            err_at_max = tl.where(better, tile_err, err_at_max)
            need = (err > LOGIT_TOL) & (logit + err >= (m_fast - err_at_max - CUTOFF)[:, None])
            need = need & row_ok[:, None] & k_ok[None, :]
            if tl.max(need.to(tl.int32)) > 0:
                # the same expansion with a float64 dot (DMMA) where its bound allows (its rounding
                # and that of the float64 norms: (D + BLOCK_D + 2) 2^-53 (|x| + |mu|)^2), else differences
                norms = x_norm[:, None] + tl.sqrt(mu_sq)[None, :]
                err64 = (D + BLOCK_D + 2) * 1.1102230246251565e-16 * norms * norms / (2 * vp)
                if tl.max(tl.where(need, err64, 0.0)) <= LOGIT_TOL:
                    xmu64 = tl.zeros((BLOCK_B, BLOCK_K), tl.float64)
                    for d0 in range(0, D, BLOCK_D):
                        x, mu = _x_and_means_tiles(x_ptr, means_ptr, rows64, row_ok, k, k_ok, d0 + tl.arange(0, BLOCK_D), D)
                        xmu64 = tl.dot(x.to(tl.float64), tl.trans(mu.to(tl.float64)), xmu64, input_precision="ieee")
                    sq = x_sq[:, None] + mu_sq[None, :] - 2.0 * xmu64
                    sq = tl.where(sq < 0, 0.0, sq)
                else:
                    sq = _sq_distances(x_ptr, means_ptr, rows64, row_ok, k, k_ok, D, BLOCK_B, BLOCK_K, BLOCK_DS)
                logit = tl.where(need, log_norm - 0.5 * sq / vp, logit)
        else:  # float64: distances from the differences
            sq = _sq_distances(x_ptr, means_ptr, rows64, row_ok, k, k_ok, D, BLOCK_B, BLOCK_K, BLOCK_DS)
            logit = tl.where(k_ok[None, :], log_norm - 0.5 * sq / vp, float("-inf"))
        if NEED_WEIGHTS:
            tl.store(logits_ptr + rows64[:, None] * K + k[None, :], logit, mask=row_ok[:, None] & k_ok[None, :])
        m_new = tl.maximum(m, tl.max(logit, axis=1))
        alpha = _merge_scale(m, m_new)
        p = _merge_scale(logit, m_new[:, None])
        h = residual_var[None, :] / vp
        l = l * alpha + tl.sum(p, axis=1)
        hsum = hsum * alpha + tl.sum(p * h, axis=1)
        if NEED_DENOISED:  # acc = alpha acc + (p (1 - h)) @ means[k tile]: one dense tile product
            pm = (p * (1.0 - h)).to(cdt)
            # one-hot posteriors: most tiles neither weigh (every p below float's range) nor move
            # the max (alpha = 1), so they skip the update; the first tile always runs (alpha = 0)
            busy = row_ok & ((tl.max(pm, axis=1) > 0) | (alpha != 1.0))
            if tl.max(busy.to(tl.int32)) > 0:
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    d_ok = d < D
                    mu = tl.load(means_ptr + k[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                    contrib = dot(pm, mu, tl.zeros((BLOCK_B, BLOCK_D), cdt), PRECISION)
                    _update_acc(acc_ptr, acc_rows + d[None, :], row_ok[:, None] & d_ok[None, :], contrib, m, alpha.to(cdt))
        m = m_new
    _store_state(state_ptr, split, B, S, rows, row_ok, m, l, hsum)


@triton.jit
def _mixture_merge_kernel(
    x_ptr, state_ptr, acc_ptr, logits_ptr, weights_ptr, denoised_ptr, logp_ptr,
    B, D, K, S,
    NEED_DENOISED: tl.constexpr, NEED_WEIGHTS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Merge the S partial (m, l, hsum, acc) states (float64); write logp, denoised =
    (acc + hsum x) / l, and the weights exp(logit - logp) (in place of the logits when float64).
    Grid: row blocks x column tiles."""
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
    if tile == 0:  # (a branch, not a mask: Triton 3.9 rejects a block mask and-ed with a scalar)
        tl.store(logp_ptr + rows, logp.to(logp_ptr.dtype.element_ty), mask=row_ok)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    if NEED_DENOISED:
        mask = row_ok[:, None] & (cols[None, :] < D)
        cdt = acc_ptr.dtype.element_ty
        num = tl.zeros((BLOCK_B, BLOCK_N), cdt)
        for s in range(0, S):
            scale = _merge_scale(tl.load(state_ptr + s * B + rows, mask=row_ok, other=0.0), m).to(cdt)
            num += scale[:, None] * tl.load(acc_ptr + (s * B + rows64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=mask, other=0.0).to(cdt)
        out = num * (1.0 / l).to(cdt)[:, None] + (hsum / l).to(cdt)[:, None] * x
        tl.store(denoised_ptr + rows64[:, None] * D + cols[None, :], out.to(denoised_ptr.dtype.element_ty), mask=mask)
    if NEED_WEIGHTS:
        mask = row_ok[:, None] & (cols[None, :] < K)
        offs = rows64[:, None] * K + cols[None, :]
        logit = tl.load(logits_ptr + offs, mask=mask, other=float("-inf"))
        tl.store(weights_ptr + offs, tl.exp(logit - logp[:, None]).to(weights_ptr.dtype.element_ty), mask=mask)


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
    weights = torch.empty((B, K) if need_weights else (0,), dtype=cd, device=dev)
    logits = weights if cd == torch.float64 or not need_weights else torch.empty((B, K), dtype=torch.float64, device=dev)
    denoised = torch.empty((B, D) if need_denoised else (0,), dtype=x.dtype, device=dev)
    if B == 0:
        return denoised, logp, weights
    isotropic = R == 0
    min_per_split = MIN_COMPONENTS_PER_SPLIT_ISOTROPIC if isotropic else MIN_COMPONENTS_PER_SPLIT_LOWRANK
    S = splits if splits is not None else _splits(B, D, K, min_per_split, dev)
    k_per_split = triton.cdiv(K, S)
    S = triton.cdiv(K, k_per_split)  # no empty split
    state = torch.empty((3, S, B), dtype=torch.float64, device=dev)
    acc = torch.empty((S, B, D) if need_denoised else (0,), dtype=cd, device=dev)
    grid = (triton.cdiv(B, BLOCK_B), S)
    common = dict(NEED_DENOISED=need_denoised, NEED_WEIGHTS=need_weights, PRECISION=_config.dot_precision(cd), LOG_2PI=LOG_2PI, BLOCK_B=BLOCK_B)
    if isotropic:
        _config.launch(_mixture_isotropic_kernel)[grid](
            x, means, residual_var, log_weights, sigma, logits, state, acc, B, D, K, k_per_split, S,
            EXPAND=cd == torch.float32, LOGIT_TOL=LOGIT_TOL[cd], CUTOFF=CUTOFF,
            DOT_SPLIT_ERR=DOT_SPLIT_ERR[common["PRECISION"]], DOT_ROUNDINGS_PER_D=DOT_ROUNDINGS_PER_D[common["PRECISION"]],
            **common)
    else:
        in_registers = R <= MAX_REGISTER_RANK
        scratch = torch.empty((0 if in_registers else S * 2 * B * R,), dtype=cd, device=dev)
        r_pad = max(16, triton.next_power_of_2(R)) if in_registers else 16
        _config.launch(_mixture_lowrank_kernel)[grid](
            x, means, bases, eigvals, residual_var, log_weights, sigma, logits, state, acc, scratch,
            B, D, R, K, k_per_split, S, C_IN_REGISTERS=in_registers, R_PAD=r_pad, FULL_RANK=R == D,
            EXACT_RESIDUAL_RATIO=EXACT_RESIDUAL_RATIO[cd], **common)
    block_n = 64 if _config.INTERPRET else 128
    cols = max(D if need_denoised else 0, K if need_weights else 0, 1)
    merge_grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(cols, block_n))
    _config.launch(_mixture_merge_kernel)[merge_grid](
        x, state, acc, logits, weights, denoised, logp, B, D, K, S,
        NEED_DENOISED=need_denoised, NEED_WEIGHTS=need_weights, BLOCK_B=BLOCK_B, BLOCK_N=block_n)
    return denoised, logp, weights
