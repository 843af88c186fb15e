"""The local score machines (issue 27): the reference against independent dense code, the public
API (gk.LocalScoreMachine, gk.local_denoise, gk.local_score), its errors and autograd. The
kernels are checked against the reference by the conformance suite (tests/conformance)."""
import math

import pytest
import torch
import torch.nn.functional as F

from gsa_kernels import reference
from gsa_kernels._contract import LocalMode, LocalPadding, SpectralKind

F64 = torch.float64


def _patches(t, P, circular):
    """[B, C, H, W] -> [B, H W, C P P]: every pixel's window, by unfold (zeros) or by unfold of
    the image tiled around itself (circular), independent of the reference's shifted slices."""
    B, C, H, W = t.shape
    p = P // 2
    if not circular:
        return F.unfold(t, P, padding=p).transpose(1, 2)
    ry, rx = p // H + 1, p // W + 1
    tiled = t.repeat(1, 1, 2 * ry + 1, 2 * rx + 1)
    crop = tiled[:, :, ry * H - p: ry * H + H + p, rx * W - p: rx * W + W + p]
    return F.unfold(crop, P).transpose(1, 2)


def dense_local(x, images, sigma, P, mode, padding, kind):
    """Every (query pixel, candidate) logit at once, float64, softmax over the candidates."""
    B, C, H, W = x.shape
    N, HW, p = images.shape[0], H * W, P // 2
    circular = padding == LocalPadding.CIRCULAR
    q = _patches(x, P, circular)  # [B, HW, CPP]
    k = _patches(images, P, circular).reshape(N * HW, -1)  # candidate (n, v) at n HW + v
    d2 = ((q[:, :, None, :] - k[None, None]) ** 2).sum(-1)  # [B, HW, N HW]
    u = torch.arange(HW)[:, None]
    v = (torch.arange(N * HW) % HW)[None, :]
    if mode == LocalMode.LS:
        allowed = u == v
    elif mode == LocalMode.ELS:
        allowed = torch.ones(HW, N * HW, dtype=torch.bool)
    else:
        def cls(i):
            r, c = i // W, i % W
            return torch.stack([torch.clamp(r, max=p), torch.clamp(H - 1 - r, max=p), torch.clamp(c, max=p),
                                torch.clamp(W - 1 - c, max=p)], -1)
        allowed = (cls(u) == cls(v)).all(-1)
    logits = (-d2 / (2 * sigma.reshape(B, 1, 1) ** 2)).masked_fill(~allowed, -math.inf)
    w = torch.softmax(logits, -1)
    values = images.permute(0, 2, 3, 1).reshape(N * HW, C)
    den = (w @ values).transpose(1, 2).reshape(B, C, H, W)
    return den if kind == SpectralKind.DENOISE else (den - x) / sigma.reshape(B, 1, 1, 1) ** 2


MACHINES = [(LocalMode.LS, LocalPadding.ZEROS), (LocalMode.LS, LocalPadding.CIRCULAR), (LocalMode.ELS, LocalPadding.ZEROS),
            (LocalMode.ELS, LocalPadding.CIRCULAR), (LocalMode.BBELS, LocalPadding.ZEROS)]


@pytest.mark.parametrize("mode,padding", MACHINES)
@pytest.mark.parametrize("P", [1, 3, 5, 15])
@pytest.mark.parametrize("C,H,W", [(1, 5, 7), (3, 4, 6)])
def test_reference_matches_dense_unfold(mode, padding, P, C, H, W):
    gen = torch.Generator().manual_seed(P * 10 + C)
    N, B = 4, 3
    images = torch.rand(N, C, H, W, dtype=F64, generator=gen) * 2 - 1
    x = images[torch.tensor([0, 2, 3])].roll((1, 2), (2, 3)) + 0.2 * torch.randn(B, C, H, W, dtype=F64, generator=gen)
    sigma = torch.tensor([0.05, 0.4, 3.0], dtype=F64)
    for kind in (SpectralKind.DENOISE, SpectralKind.SCORE):
        out = reference.local_posterior(x, images, sigma, P, mode, padding, kind)
        want = dense_local(x, images, sigma, P, mode, padding, kind)
        scale = want.abs().max()
        assert (out - want).abs().max() <= 1e-11 * scale, (kind, (out - want).abs().max().item())


def test_reference_nan_rows_and_streaming_blocks():
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(40, 1, 6, 5, dtype=F64, generator=gen)
    x = images[:3] + 0.1 * torch.randn(3, 1, 6, 5, dtype=F64, generator=gen)
    x[1, 0, 0, 0] = math.nan
    sigma = torch.full((3,), 0.3, dtype=F64)
    for mode in (LocalMode.LS, LocalMode.ELS):
        out = reference.local_posterior(x, images, sigma, 3, mode, LocalPadding.ZEROS, SpectralKind.DENOISE)
        assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()
        want = dense_local(x[[0, 2]], images, sigma[:2], 3, mode, LocalPadding.ZEROS, SpectralKind.DENOISE)
        assert torch.allclose(out[[0, 2]], want, rtol=0, atol=1e-12)
