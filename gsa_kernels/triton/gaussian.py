"""Gaussian family: the fused spectral map (denoise / score / flow) and the trajectory.

One kernel serves both ops. Per row b (csrc/include/gsa/spectral.h, mirrored below):
    y      = p x - q mu                                  (p, q: per-row input coefficients)
    c      = y U                                          stage 1, tl.dot over D tiles
    out[t] = a_t y + b_t mu + (c * f_t(lam)) U^T          stage 2, tl.dot over r tiles
The residual term a_t y covers residual_var P_perp y without forming P_perp (f_t holds the
in-span difference). At full rank (r = D, P_perp = 0) a_t = 0 and f_t is the whole in-span
gain, which avoids a cancellation of two 1/sigma^2 terms in the score. The map is T = 1; the
trajectory computes c once and writes T outputs (flow from sigmas[0, b] to sigmas[t, b], scales 1).
The per-row values keep spectral.h's names: residual_var (the variance off span(U)), sigma_from
and scale_from (x's noise level and scale), sigma_to and scale_to (those of output t).

Labelled maps (row b under component labels[b] of stacked Gaussians): the rows are grouped by
label into tiles of LABEL_TILE rows that hold one label each (label_tiles: a row map, padded with
-1, and each tile's component), so a program's rows share one model and the kernel only offsets
the model pointers to its tile's component; without labels, program rows are x's rows.

A program owns BLOCK_B rows for all of D. When r <= MAX_REGISTER_RANK, c is formed in registers
([BLOCK_B, R_PAD]) in one pass over D; otherwise r-tile by r-tile. The spectral functions are
applied once per (row, j, t), never inside a D loop: c * f stays in registers for the map (T = 1,
small r); otherwise c * f_t goes to a [T, B, r] scratch in global memory (L2-resident) that
stage 2 of the same program reads back after a barrier.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .._core._args import SpectralKind
from . import _config
from ._dot import dot

MAX_REGISTER_RANK = 16 if _config.INTERPRET else 64  # small in the interpreter: tests cover both paths
# rows of one label per tile: a multiple of every BLOCK_B below (in the interpreter, its one BLOCK_B:
# each program costs tens of ms there, and a padded tile is whole programs)
LABEL_TILE = 16 if _config.INTERPRET else 64


@triton.jit
def _input_coeffs(KIND: tl.constexpr, sigma_from, scale_from):
    """(p, q) of y = p x - q mu (row_coeffs in spectral.h)."""
    one = tl.full(sigma_from.shape, 1.0, sigma_from.dtype)
    if KIND == 2:
        from_noise = sigma_from == float("inf")
        return tl.where(from_noise, one, one / scale_from), tl.where(from_noise, 0.0 * one, one)
    else:
        return one, one


@triton.jit
def _output_coeffs(KIND: tl.constexpr, residual_var, sigma_from, sigma_to, scale_to):
    """(a, b) of out = a y + b mu + ... (row_coeffs in spectral.h)."""
    one = tl.full(sigma_from.shape, 1.0, sigma_from.dtype)
    if KIND == 0:
        s2 = sigma_from * sigma_from
        return residual_var / (residual_var + s2), one
    elif KIND == 1:
        s2 = sigma_from * sigma_from
        return -one / (residual_var + s2), 0.0 * one
    else:
        to2 = sigma_to * sigma_to
        from2 = sigma_from * sigma_from
        from_noise = sigma_from == float("inf")
        gain = tl.where(from_noise, tl.sqrt(residual_var + to2), tl.sqrt((residual_var + to2) / (residual_var + from2)))
        return scale_to * gain, scale_to


@triton.jit
def _spectral_f(KIND: tl.constexpr, lam, residual_var, sigma_from, sigma_to, scale_to):
    """f(lam; row) (spectral_f in spectral.h). lam [1, R], row values [B, 1]."""
    if KIND == 0:
        s2 = sigma_from * sigma_from
        return lam / (lam + s2) - residual_var / (residual_var + s2)
    elif KIND == 1:
        s2 = sigma_from * sigma_from
        return (lam - residual_var) / ((lam + s2) * (residual_var + s2))
    else:
        to2 = sigma_to * sigma_to
        from2 = sigma_from * sigma_from
        from_noise = sigma_from == float("inf")
        from_x = tl.sqrt((lam + to2) / (lam + from2)) - tl.sqrt((residual_var + to2) / (residual_var + from2))
        return scale_to * tl.where(from_noise, tl.sqrt(lam + to2) - tl.sqrt(residual_var + to2), from_x)


@triton.jit
def _span_gain(KIND: tl.constexpr, lam, sigma_from, sigma_to, scale_to):
    """The whole gain on span(U), f + a (= a evaluated at lam). Used when r = D: there
    P_perp = 0, and dropping a y avoids cancelling two terms of size 1/sigma^2 (score)."""
    if KIND == 0:
        return lam / (lam + sigma_from * sigma_from)
    elif KIND == 1:
        return -1.0 / (lam + sigma_from * sigma_from)
    else:
        to2 = sigma_to * sigma_to
        from2 = sigma_from * sigma_from
        from_noise = sigma_from == float("inf")
        return scale_to * tl.where(from_noise, tl.sqrt(lam + to2), tl.sqrt((lam + to2) / (lam + from2)))


@triton.jit
def _gain(KIND: tl.constexpr, FULL_RANK: tl.constexpr, lam, residual_var, sigma_from, sigma_to, scale_to):
    if FULL_RANK:
        return _span_gain(KIND, lam, sigma_from, sigma_to, scale_to)
    else:
        return _spectral_f(KIND, lam, residual_var, sigma_from, sigma_to, scale_to)


@triton.jit
def _load_y(x_ptr, mean_ptr, rows, row_ok, d, d_ok, p, q, D):
    """y = p x - q mu for a [BLOCK_B, BLOCK_D] tile, in the compute dtype; and the mu tile."""
    mu = tl.load(mean_ptr + d, mask=d_ok, other=0.0)
    x = tl.load(x_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    y = p[:, None] * x.to(mu.dtype) - q[:, None] * mu[None, :]
    return y, mu


_GPU_CONFIGS = [
    # (meta, num_warps, num_stages). Sized from ptxas resource usage for sm_80 / sm_90 (at most
    # ~100 bytes of spill): ieee float32 dots run on FMA and hold their operands in registers,
    # hence the small tiles; the 64-wide ones are for the tensor-core precisions (tf32, tf32x3).
    ({"BLOCK_B": 16, "BLOCK_D": 32, "BLOCK_R": 32}, 4, 2),
    ({"BLOCK_B": 32, "BLOCK_D": 32, "BLOCK_R": 32}, 8, 2),
    ({"BLOCK_B": 32, "BLOCK_D": 64, "BLOCK_R": 32}, 8, 2),
    ({"BLOCK_B": 64, "BLOCK_D": 32, "BLOCK_R": 32}, 8, 2),
    ({"BLOCK_B": 32, "BLOCK_D": 64, "BLOCK_R": 64}, 8, 2),
    ({"BLOCK_B": 64, "BLOCK_D": 64, "BLOCK_R": 64}, 8, 2),
]
_INTERPRETER_CONFIG = {"BLOCK_B": 16, "BLOCK_D": 32, "BLOCK_R": 16}


@triton.jit
def _row_params(sigma_to_ptr, scale_to_ptr, t, B, rows, row_ok, HAS_SCALES: tl.constexpr, acc_dtype: tl.constexpr):
    """sigma_to, scale_to of output t for the rows ([B] each)."""
    sigma_to = tl.load(sigma_to_ptr + t * B + rows, mask=row_ok, other=1.0)
    scale_to = tl.full(sigma_to.shape, 1.0, acc_dtype)
    if HAS_SCALES:
        scale_to = tl.load(scale_to_ptr + t * B + rows, mask=row_ok, other=1.0)
    return sigma_to, scale_to


@triton.autotune(
    configs=_config.configs(_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=["D", "R", "T", "KIND", "C_IN_REGISTERS", "CF_IN_REGISTERS", "PRECISION", "LABELED"],
)
@triton.jit
def _spectral_map_kernel(
    # residual_var = residual_var_hi + residual_var_lo: a float64 value in two float32 scalars
    x_ptr, mean_ptr, basis_ptr, eigvals_ptr, residual_var_hi, residual_var_lo,
    # LABELED: residual_var per component [K], row map [ROWS], tile components
    residual_vars_ptr, row_of_ptr, tile_comp_ptr,
    # sigma_from, scale_from [B]; sigma_to, scale_to [T, B] (the scales unread without HAS_SCALES)
    sigma_from_ptr, scale_from_ptr, sigma_to_ptr, scale_to_ptr,
    out_ptr, scratch_ptr,  # out [T, B, D]; scratch [T, B, R]: c * f_t (unless CF_IN_REGISTERS)
    B, D, R, T, ROWS,  # ROWS: program rows (B, or the labelled row map's length)
    KIND: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_BASIS: tl.constexpr, FULL_RANK: tl.constexpr,
    C_IN_REGISTERS: tl.constexpr, CF_IN_REGISTERS: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr, LABELED: tl.constexpr, LABEL_TILE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    program_rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    acc_dtype: tl.constexpr = mean_ptr.dtype.element_ty
    if LABELED:  # this tile's component; its rows through the row map (-1: none)
        tl.static_assert(LABEL_TILE % BLOCK_B == 0)
        source = tl.load(row_of_ptr + program_rows, mask=program_rows < ROWS, other=-1)
        row_ok = source >= 0
        rows = tl.where(row_ok, source, 0)
        # a tile without rows (-1) reads component 0 and stores nothing
        k = tl.maximum(tl.load(tile_comp_ptr + (tl.program_id(0) * BLOCK_B) // LABEL_TILE), 0).to(tl.int64)
        mean_ptr += k * D
        basis_ptr += k * D * R
        eigvals_ptr += k * R
        residual_var = tl.load(residual_vars_ptr + k)
    else:
        rows = program_rows
        row_ok = rows < B
        residual_var = tl.cast(residual_var_hi, acc_dtype) + tl.cast(residual_var_lo, acc_dtype)
    rows64 = rows.to(tl.int64)
    sigma_from = tl.load(sigma_from_ptr + rows, mask=row_ok, other=1.0)
    scale_from = tl.full((BLOCK_B,), 1.0, acc_dtype)
    if HAS_SCALES:
        scale_from = tl.load(scale_from_ptr + rows, mask=row_ok, other=1.0)
    p, q = _input_coeffs(KIND, sigma_from, scale_from)

    # ---- stage 1: c = y U, then c * f_t once per (row, j, t): the spectral functions (sqrt,
    # divisions) stay out of the D loops. c * f_t stays in registers for the map (T = 1, small r),
    # else goes to the [T, B, R] scratch.
    if HAS_BASIS:
        if C_IN_REGISTERS:
            r_reg = tl.arange(0, R_PAD)
            c = tl.zeros((BLOCK_B, R_PAD), dtype=acc_dtype)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = d < D
                y, mu = _load_y(x_ptr, mean_ptr, rows64, row_ok, d, d_ok, p, q, D)
                u = tl.load(basis_ptr + d[:, None] * R + r_reg[None, :], mask=d_ok[:, None] & (r_reg[None, :] < R), other=0.0)
                c = dot(y, u, c, PRECISION)
            lam = tl.load(eigvals_ptr + r_reg, mask=r_reg < R, other=0.0)
            if CF_IN_REGISTERS:
                sigma_to, scale_to = _row_params(sigma_to_ptr, scale_to_ptr, 0, B, rows, row_ok, HAS_SCALES, acc_dtype)
                cf = c * _gain(KIND, FULL_RANK, lam[None, :], residual_var,
                               sigma_from[:, None], sigma_to[:, None], scale_to[:, None])
            else:
                for t in range(0, T):
                    sigma_to, scale_to = _row_params(sigma_to_ptr, scale_to_ptr, t,
                                                     B, rows, row_ok, HAS_SCALES, acc_dtype)
                    cf = c * _gain(KIND, FULL_RANK, lam[None, :], residual_var,
                                   sigma_from[:, None], sigma_to[:, None], scale_to[:, None])
                    tl.store(scratch_ptr + (t * B + rows64)[:, None] * R + r_reg[None, :], cf, mask=row_ok[:, None] & (r_reg[None, :] < R))
        else:
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < R
                c = tl.zeros((BLOCK_B, BLOCK_R), dtype=acc_dtype)
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    d_ok = d < D
                    y, mu = _load_y(x_ptr, mean_ptr, rows64, row_ok, d, d_ok, p, q, D)
                    u = tl.load(basis_ptr + d[:, None] * R + r[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
                    c = dot(y, u, c, PRECISION)
                lam = tl.load(eigvals_ptr + r, mask=r_ok, other=0.0)
                for t in range(0, T):
                    sigma_to, scale_to = _row_params(sigma_to_ptr, scale_to_ptr, t,
                                                     B, rows, row_ok, HAS_SCALES, acc_dtype)
                    cf = c * _gain(KIND, FULL_RANK, lam[None, :], residual_var,
                                   sigma_from[:, None], sigma_to[:, None], scale_to[:, None])
                    tl.store(scratch_ptr + (t * B + rows64)[:, None] * R + r[None, :], cf, mask=row_ok[:, None] & r_ok[None, :])
        if not CF_IN_REGISTERS:
            tl.debug_barrier()  # stage 2 reads what other threads of this program wrote

    # ---- stage 2: out[t] = a_t y + b_t mu + (c f_t) U^T, tile by tile of D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        y, mu = _load_y(x_ptr, mean_ptr, rows64, row_ok, d, d_ok, p, q, D)
        for t in range(0, T):
            sigma_to, scale_to = _row_params(sigma_to_ptr, scale_to_ptr, t, B, rows, row_ok, HAS_SCALES, acc_dtype)
            a, b = _output_coeffs(KIND, residual_var, sigma_from, sigma_to, scale_to)
            if FULL_RANK:
                a = 0.0 * a
            acc = a[:, None] * y + b[:, None] * mu[None, :]
            if HAS_BASIS:
                if CF_IN_REGISTERS:
                    u = tl.load(basis_ptr + d[:, None] * R + r_reg[None, :], mask=d_ok[:, None] & (r_reg[None, :] < R), other=0.0)
                    acc = dot(cf, tl.trans(u), acc, PRECISION)
                else:
                    for r0 in range(0, R, BLOCK_R):
                        r = r0 + tl.arange(0, BLOCK_R)
                        r_ok = r < R
                        cf_tile = tl.load(scratch_ptr + (t * B + rows64)[:, None] * R + r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                        u = tl.load(basis_ptr + d[:, None] * R + r[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
                        acc = dot(cf_tile, tl.trans(u), acc, PRECISION)
            out_offs = (t * B + rows64)[:, None] * D + d[None, :]
            tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def label_tiles(labels, K: int, tile: int):
    """(row_of [tiles * tile], component [tiles]) of labels [B] grouped into tiles of `tile` rows of
    one label each: row_of holds the rows of x in label order (stable), each label's rows from a
    tile start on, -1 in the gaps; component is each tile's label, -1 for tiles without rows.
    Torch ops on labels' device, no host sync: tiles = ceil(B / tile) + min(K, B) bounds the count."""
    B, dev = labels.shape[0], labels.device
    counts = torch.zeros(K, dtype=torch.int64, device=dev).index_add_(0, labels, torch.ones_like(labels))
    tiles_of = (counts + tile - 1) // tile
    tile_end = torch.cumsum(tiles_of, 0)
    order = torch.sort(labels, stable=True).indices
    sorted_labels = labels[order]
    first_tile, group_begin = tile_end - tiles_of, torch.cumsum(counts, 0) - counts
    pos = first_tile[sorted_labels] * tile + torch.arange(B, device=dev) - group_begin[sorted_labels]
    tiles = -(-B // tile) + min(K, B)
    row_of = torch.full((tiles * tile,), -1, dtype=torch.int64, device=dev).index_copy_(0, pos, order)
    component = torch.searchsorted(tile_end, torch.arange(tiles, device=dev), right=True)
    return row_of, torch.where(component < K, component, -1)


def spectral_map(x, mean, basis, eigvals, residual_var, sigma_from, scale_from, sigma_to, scale_to, kind: int,
                 labels=None):
    """out [T, B, D] (x's dtype) for x [B, D]; sigma_from [B]; sigma_to [T, B]; scale_from [B] and
    scale_to [T, B], or None for 1 (see module docstring). One kernel launch (with labels: mean
    [K, D], basis [K, D, r], eigvals [K, r], residual_var [K], row b under component labels[b])."""
    B, D = x.shape
    R = basis.shape[-1]
    T = sigma_to.shape[0]
    out = torch.empty((T, B, D), dtype=x.dtype, device=x.device)
    if B == 0 or T == 0:
        return out
    in_registers = R <= MAX_REGISTER_RANK
    cf_in_registers = in_registers and T == 1
    scratch = torch.empty((0 if cf_in_registers else T * B * R,), dtype=mean.dtype, device=x.device)
    if labels is None:
        # float scalars reach the kernel as float32: hi + lo keeps residual_var float64-exact
        residual_var_hi = struct.unpack("f", struct.pack("f", float(residual_var)))[0]
        residual_var_lo = float(residual_var) - residual_var_hi
        residual_vars, row_of, component, rows = mean, sigma_from, sigma_from, B  # pointers, unread
    else:
        residual_var_hi = residual_var_lo = 0.0
        residual_vars = residual_var
        row_of, component = label_tiles(labels, mean.shape[0], LABEL_TILE)
        rows = row_of.shape[0]
    r_pad = max(16, triton.next_power_of_2(R)) if in_registers else 16

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_B"]),)

    _config.launch(_spectral_map_kernel)[grid](
        x, mean, basis, eigvals, residual_var_hi, residual_var_lo, residual_vars, row_of, component,
        sigma_from, sigma_from if scale_from is None else scale_from,
        sigma_to, sigma_to if scale_to is None else scale_to, out, scratch,
        B, D, R, T, rows,
        KIND=kind, HAS_SCALES=scale_from is not None, HAS_BASIS=R > 0, FULL_RANK=R == D, C_IN_REGISTERS=in_registers,
        CF_IN_REGISTERS=cf_in_registers, R_PAD=r_pad,
        PRECISION=_config.dot_precision(mean.dtype), LABELED=labels is not None, LABEL_TILE=LABEL_TILE,
    )
    return out


def gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind):
    """[B, D] -> [B, D]: the spectral map of `kind` (0 denoise, 1 score, 2 flow)."""
    return spectral_map(x, mean, basis, eigvals, residual_var, sigma_from, scale_from, sigma_to[None], scale_to[None], kind)[0]


def gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas):
    """x [B, D] at sigmas[0] -> [T, B, D] at every sigmas[t] (closed-form flow, scales 1)."""
    return spectral_map(x, mean, basis, eigvals, residual_var, sigmas[0], None, sigmas, None, int(SpectralKind.FLOW))


def gaussian_map_labeled(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind):
    """gaussian_map with row b under component labels[b] (means [K, D], bases [K, D, r], eigvals
    [K, r], residual_var [K])."""
    return spectral_map(x, means, bases, eigvals, residual_var, sigma_from, scale_from, sigma_to[None], scale_to[None],
                        kind, labels)[0]


def gaussian_trajectory_labeled(x, labels, means, bases, eigvals, residual_var, sigmas):
    """gaussian_trajectory with row b under component labels[b]."""
    return spectral_map(x, means, bases, eigvals, residual_var, sigmas[0], None, sigmas, None, int(SpectralKind.FLOW), labels)
