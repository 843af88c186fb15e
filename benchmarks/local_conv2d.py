"""The conv2d formulation of the local score machines, as public implementations compute them
(the baseline of issue 27's benchmark; written here from the issue's description, not copied):
training patches as conv2d filters over chunks of training images, the expanded squared distance
|x_window|^2 - 2 x_window . patch + |patch|^2 per window, and a running max (online softmax)
across chunks. float32 by default, like those implementations; the expanded form is inexact at
small sigma (that is one thing the fused kernel fixes).

    conv2d_local_denoise(x [B, C, H, W], images [N, C, H, W], sigma float or [B], P, mode, padding)
(on x's device: CPU for the bench's L workloads, the GPU in scripts/gpu_check.sh)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad(t, p, padding):
    if p == 0:
        return t
    if padding == "circular":
        H, W = t.shape[-2:]
        rows = torch.arange(-p, H + p, device=t.device) % H
        cols = torch.arange(-p, W + p, device=t.device) % W
        return t[..., rows, :][..., cols]
    return F.pad(t, (p, p, p, p))


def _boundary_class(H, W, p, device):
    i = torch.arange(H, device=device)[:, None].expand(H, W)
    j = torch.arange(W, device=device)[None, :].expand(H, W)
    return torch.stack([i.clamp(max=p), (H - 1 - i).clamp(max=p), j.clamp(max=p), (W - 1 - j).clamp(max=p)], -1).reshape(H * W, 4)


@torch.no_grad()
def conv2d_local_denoise(x, images, sigma, P, mode="els", padding="zeros", chunk=8):
    B, C, H, W = x.shape
    N, HW, p = images.shape[0], H * W, P // 2
    dev = x.device  # CPU or GPU (scripts/gpu_check.sh runs it on the device)
    s2 = (torch.as_tensor(sigma, dtype=x.dtype, device=dev).reshape(-1).expand(B) ** 2).reshape(B, 1, 1)
    xp = _pad(x, p, padding)
    ones = torch.ones(1, C, P, P, dtype=x.dtype, device=dev)
    x_sq = F.conv2d(xp * xp, ones).reshape(B, 1, HW)  # |x window at u|^2
    m = torch.full((B, 1, HW), -torch.inf, dtype=x.dtype, device=dev)
    z = torch.zeros((B, 1, HW), dtype=x.dtype, device=dev)
    acc = torch.zeros((B, C, HW), dtype=x.dtype, device=dev)
    if mode == "bbels":
        cls = _boundary_class(H, W, p, dev)
        outside = ~(cls[:, None, :] == cls[None, :, :]).all(-1)  # [HW v, HW u]
    for n0 in range(0, N, chunk):
        block = images[n0:n0 + chunk]
        n = block.shape[0]
        bp = _pad(block, p, padding)
        if mode == "ls":  # the patch at the same pixel: cross terms are box sums of x * image
            cross = F.conv2d((xp[:, None] * bp[None]).reshape(B * n, C, H + 2 * p, W + 2 * p), ones).reshape(B, n, HW)
            y_sq = F.conv2d(bp * bp, ones).reshape(1, n, HW)
            logits = -(x_sq - 2 * cross + y_sq) / (2 * s2)  # [B, n, HW]
            values = block.reshape(n, C, HW)
            blk_max = logits.amax(1, keepdim=True)
            m_new = torch.maximum(m, blk_max)
            w = torch.exp(logits - m_new)
            scale = torch.exp(m - m_new)
            z = z * scale + w.sum(1, keepdim=True)
            acc = acc * scale + torch.einsum("bnu,ncu->bcu", w, values)
            m = m_new
            continue
        filters = F.unfold(bp, P).transpose(1, 2).reshape(n * HW, C, P, P)  # every patch of the block
        cross = F.conv2d(xp, filters).reshape(B, n * HW, HW)  # [B, candidates, u]
        y_sq = (filters * filters).sum((1, 2, 3)).reshape(1, n * HW, 1)
        logits = -(x_sq - 2 * cross + y_sq) / (2 * s2)
        if mode == "bbels":
            logits = logits.reshape(B, n, HW, HW).masked_fill(outside, -torch.inf).reshape(B, n * HW, HW)
        values = block.reshape(n, C, HW).permute(1, 0, 2).reshape(C, n * HW)
        m_new = torch.maximum(m, logits.amax(1, keepdim=True))
        w = torch.exp(logits - m_new)
        scale = torch.exp(m - m_new)
        z = z * scale + w.sum(1, keepdim=True)
        acc = acc * scale + torch.einsum("bku,ck->bcu", w, values)
        m = m_new
    return (acc / z).reshape(B, C, H, W)
