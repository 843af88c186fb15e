"""Local score machines (LS / ELS / BB-ELS, _contract.py: local_posterior): a posterior over
training patches per (query row, pixel), streamed with an online softmax.

A program owns one query row b and a tile of BLOCK_U pixels u, and streams the candidates in
tiles of BLOCK_V: for LS the candidate columns are training images n (the patch at v = u), for
ELS / BB-ELS the pixels v of one training image at a time (BB-ELS masks the columns outside u's
boundary class). Per tile, the squared window distances d2 [BLOCK_U, BLOCK_V] are summed from
direct differences over the C P^2 window entries (BLOCK_K at a time on a third tile axis), in float64 whatever the
dtype: differences of float32 values are exact in float64, so the logits -d2 / (2 sigma^2) (which
scale as 1 / sigma^2) keep their digits at every sigma and no error bound or refinement pass is
needed. The running max m, sum z and the accumulator acc[u, c] = sum_c w (value_c - x_u) (the
non-cancelling difference form of the contract) are float64 too, in registers.

Memory: no workspace at all (registers only; out is the only allocation), whatever N, P or
the image size. Cost: O(HW * candidates * P^2 C) per row -- the direct form, not the window-sum
formulation of the CPU kernel (csrc/cpu/local_score.cpp); float64 arithmetic runs at full rate on
H100 / A100 class GPUs and slowly on consumer ones.

NaN: each program first scans its row of x; a NaN anywhere makes its whole output tile NaN (the
contract's row-level rule), whatever the softmax state computed from it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core._contract import LocalMode, LocalPadding, SpectralKind
from . import _config

# Tiles: BLOCK_U query pixels x BLOCK_V candidates (LS: images; ELS / BB-ELS: pixels of one image)
# x BLOCK_K window entries. Small pixel / candidate tiles in the interpreter, so that the
# conformance shapes cross tile edges; a deep window tile there, since every interpreted op costs
# ~1 ms whatever its size.
BLOCK_U = 32
BLOCK_N = 16 if _config.INTERPRET else 32  # LS: training images per tile
BLOCK_V = 32  # ELS / BB-ELS: pixels of a training image per tile
BLOCK_K = 64 if _config.INTERPRET else 8
BLOCK_SCAN = 256 if _config.INTERPRET else 1024  # the NaN scan of a row of x


@triton.jit
def _wrap_or_mask(i, j, ok, H, W, CIRCULAR: tl.constexpr):
    """(flat pixel index, in-image mask) of pixel (i, j): wrapped (circular) or masked (zeros)."""
    if CIRCULAR:  # ((a % H) + H) % H: the same under C and Python remainder semantics
        i = ((i % H) + H) % H
        j = ((j % W) + W) % W
    else:
        ok = ok & (i >= 0) & (i < H) & (j >= 0) & (j < W)
    return i * W + j, ok


@triton.jit
def _window_d2(x_row, img_n, ui, uj, u_ok, c_i, c_j, c_ok, n_off, H, W, P, C,
               LS: tl.constexpr, CIRCULAR: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """d2 [BLOCK_U, BLOCK_V] float64 of the query pixels (ui, uj) against the candidate windows:
    LS: image offsets n_off [BLOCK_V] (elements) at the query's own pixel; else pixels (c_i, c_j)
    [BLOCK_V] of the image at img_n. The C P^2 window entries k = (channel, oy, ox) go BLOCK_K at a
    time on a third tile axis. Outside the image: 0 (zeros) or wrapped (circular)."""
    HW = H * W
    p = P // 2
    PP = P * P
    d2 = tl.zeros([BLOCK_U, BLOCK_V], dtype=tl.float64)
    for k0 in range(0, C * PP, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C * PP
        ch = k // PP
        oy = (k % PP) // P - p
        ox = k % P - p
        a, a_ok = _wrap_or_mask(ui[:, None] + oy[None, :], uj[:, None] + ox[None, :], u_ok[:, None] & k_ok[None, :],
                                H, W, CIRCULAR)
        a = a + ch[None, :] * HW  # [BLOCK_U, BLOCK_K]
        xw = tl.load(x_row + a, mask=a_ok, other=0.0).to(tl.float64)
        if LS:  # [BLOCK_U, BLOCK_V, BLOCK_K]: image n's window at the query's pixel
            iw = tl.load(img_n + n_off[None, :, None] + a[:, None, :], mask=a_ok[:, None, :] & c_ok[None, :, None],
                         other=0.0).to(tl.float64)
            d = xw[:, None, :] - iw
        else:  # [BLOCK_V, BLOCK_K]: the windows of the image's pixels
            bpos, b_ok = _wrap_or_mask(c_i[:, None] + oy[None, :], c_j[:, None] + ox[None, :],
                                       c_ok[:, None] & k_ok[None, :], H, W, CIRCULAR)
            iw = tl.load(img_n + bpos + ch[None, :] * HW, mask=b_ok, other=0.0).to(tl.float64)
            d = xw[:, None, :] - iw[None, :, :]
        d2 += tl.sum(d * d, 2)
    return d2


@triton.jit
def _softmax_update(m, z, acc, d2, cand_ok, two_s2, x_row, img_n, u, u_ok, v, n_off, c_ok, C, HW,
                    LS: tl.constexpr, C_PAD: tl.constexpr):
    """One tile of candidates into the online softmax state (m, z, acc [BLOCK_U, C_PAD])."""
    logit = tl.where(cand_ok, -d2 / two_s2, float("-inf"))
    m_new = tl.maximum(m, tl.max(logit, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf: a pixel with no candidate yet
    alpha = tl.exp(m - m_safe)
    w = tl.exp(logit - m_safe[:, None])
    z = z * alpha + tl.sum(w, 1)
    acc = acc * alpha[:, None]
    chan = tl.arange(0, C_PAD)
    for c in range(C):
        xc = tl.load(x_row + c * HW + u, mask=u_ok, other=0.0).to(tl.float64)
        if LS:  # value of candidate (n, u): images[n, c, u]
            val = tl.load(img_n + n_off[None, :] + c * HW + u[:, None], mask=u_ok[:, None] & c_ok[None, :],
                          other=0.0).to(tl.float64)
            contrib = tl.sum(w * (val - xc[:, None]), 1)
        else:  # value of candidate (n, v): images[n, c, v]
            val = tl.load(img_n + c * HW + v, mask=c_ok, other=0.0).to(tl.float64)
            contrib = tl.sum(w * (val[None, :] - xc[:, None]), 1)
        acc += tl.where(chan[None, :] == c, contrib[:, None], 0.0)
    return m_new, z, acc


@triton.jit
def _local_posterior_kernel(x_ptr, img_ptr, sigma_ptr, out_ptr, N, C, H, W, P, U_TILES,
                            MODE: tl.constexpr, CIRCULAR: tl.constexpr, SCORE: tl.constexpr,
                            BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                            C_PAD: tl.constexpr, BLOCK_SCAN: tl.constexpr, OUT_F64: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // U_TILES).to(tl.int64)
    HW = H * W
    CHW = tl.full([], 0, tl.int64) + C * HW  # int64: image offsets n * CHW may pass 2^31
    x_row = x_ptr + b * CHW
    u = (pid % U_TILES) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = u < HW
    ui = u // W
    uj = u % W
    sigma = tl.load(sigma_ptr + b).to(tl.float64)
    s2 = sigma * sigma
    two_s2 = 2.0 * s2

    # the row-level NaN rule: a NaN anywhere in x[b]
    nan_count = 0
    for i0 in range(0, CHW, BLOCK_SCAN):
        offs = i0 + tl.arange(0, BLOCK_SCAN)
        xs = tl.load(x_row + offs, mask=offs < CHW, other=0.0)
        nan_count += tl.sum((xs != xs).to(tl.int32), 0)

    m = tl.full([BLOCK_U], float("-inf"), tl.float64)
    z = tl.zeros([BLOCK_U], dtype=tl.float64)
    acc = tl.zeros([BLOCK_U, C_PAD], dtype=tl.float64)
    cols = tl.arange(0, BLOCK_V)
    if MODE == 0:  # LS: columns are training images, the patch at the query's own pixel
        for n0 in range(0, N, BLOCK_V):
            n = n0 + cols
            n_ok = n < N
            n_off = n * CHW
            d2 = _window_d2(x_row, img_ptr, ui, uj, u_ok, ui, uj, n_ok, n_off, H, W, P, C,
                            True, CIRCULAR, BLOCK_U, BLOCK_V, BLOCK_K)
            m, z, acc = _softmax_update(m, z, acc, d2, u_ok[:, None] & n_ok[None, :], two_s2, x_row, img_ptr, u, u_ok,
                                        u, n_off, n_ok, C, HW, True, C_PAD)
    else:  # ELS / BB-ELS: columns are the pixels v of one training image at a time
        p = P // 2
        if MODE == 2:  # boundary class of u: distances to the four edges, clipped at p
            u_cls = (tl.minimum(ui, p) * (p + 1) + tl.minimum(H - 1 - ui, p)) * (p + 1) + tl.minimum(uj, p)
            u_cls = u_cls * (p + 1) + tl.minimum(W - 1 - uj, p)
        for n in range(N):
            img_n = img_ptr + n * CHW
            for v0 in range(0, HW, BLOCK_V):
                v = v0 + cols
                v_ok = v < HW
                vi = v // W
                vj = v % W
                d2 = _window_d2(x_row, img_n, ui, uj, u_ok, vi, vj, v_ok, cols, H, W, P, C,
                                False, CIRCULAR, BLOCK_U, BLOCK_V, BLOCK_K)
                cand_ok = u_ok[:, None] & v_ok[None, :]
                if MODE == 2:
                    v_cls = (tl.minimum(vi, p) * (p + 1) + tl.minimum(H - 1 - vi, p)) * (p + 1) + tl.minimum(vj, p)
                    v_cls = v_cls * (p + 1) + tl.minimum(W - 1 - vj, p)
                    cand_ok = cand_ok & (u_cls[:, None] == v_cls[None, :])
                m, z, acc = _softmax_update(m, z, acc, d2, cand_ok, two_s2, x_row, img_n, u, u_ok, v, cols, v_ok,
                                            C, HW, False, C_PAD)

    # every pixel has a candidate (LS: N >= 1 images; ELS / BB-ELS: u itself), so z > 0
    chan = tl.arange(0, C_PAD)
    offs = chan[None, :] * HW + u[:, None]
    ok = u_ok[:, None] & (chan[None, :] < C)
    diff = acc / tl.where(u_ok, z, 1.0)[:, None]
    if SCORE:
        res = diff / s2
    else:
        res = tl.load(x_row + offs, mask=ok, other=0.0).to(tl.float64) + diff
    res = tl.where(nan_count > 0, float("nan"), res)
    if not OUT_F64:  # 16/32-bit outputs through float32 (the interpreter rounds float64 -> bfloat16 wrongly)
        res = res.to(tl.float32)
    tl.store(out_ptr + b * CHW + offs, res.to(out_ptr.dtype.element_ty), mask=ok)


def local_posterior(x, images, sigma, patch_size: int, mode: int, padding: int, kind: int):
    """out [B, C, H, W] in x's dtype (_contract.py: local_posterior). One launch."""
    mode, padding, kind = LocalMode(mode), LocalPadding(padding), SpectralKind(kind)
    if kind not in (SpectralKind.DENOISE, SpectralKind.SCORE):
        raise ValueError(f"local_posterior: kind must be DENOISE or SCORE, got {kind!r}")
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    if B == 0 or C * H * W == 0:
        return out
    P = int(patch_size)
    if padding == LocalPadding.ZEROS:  # offsets of |dy| >= H or |dx| >= W read zeros on both sides
        P = min(P, 2 * max(H, W) - 1)  # (and BB-ELS classes clip at p >= max(H, W) - 1: unchanged)
    if C * P * P >= 2**31:
        raise ValueError(f"local_posterior: patch_size {patch_size} is too large for the triton kernel "
                         f"(C P^2 = {C * P * P} window entries >= 2^31)")
    u_tiles = triton.cdiv(H * W, BLOCK_U)
    _config.launch(_local_posterior_kernel)[(B * u_tiles,)](
        x, images, sigma, out, images.shape[0], C, H, W, P, u_tiles,
        MODE=int(mode), CIRCULAR=padding == LocalPadding.CIRCULAR, SCORE=kind == SpectralKind.SCORE,
        BLOCK_U=BLOCK_U, BLOCK_V=BLOCK_N if mode == LocalMode.LS else BLOCK_V, BLOCK_K=BLOCK_K, C_PAD=triton.next_power_of_2(C), BLOCK_SCAN=BLOCK_SCAN,
        OUT_F64=x.dtype == torch.float64, num_warps=4)
    return out
