"""The local score machines (issue 27): the reference against independent dense code, the public
API (gk.LocalScoreMachine, gk.local_denoise, gk.local_score), its errors and autograd. The
kernels are checked against the reference by the conformance suite (tests/conformance)."""
import math

import pytest
import torch
import torch.nn.functional as F

from gsa_kernels import reference
from gsa_kernels._core._contract import LocalMode, LocalPadding, SpectralKind

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


# ----------------------------------------------------------------------------- the public API

import gsa_kernels as gk  # noqa: E402
from gsa_kernels import local as local_mod  # noqa: E402

BACKENDS = [b for b in ("reference", "cpu") if b in gk.available_backends()]


def _machine(mode="els", padding="zeros", N=5, C=1, H=5, W=6, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return gk.LocalScoreMachine(torch.rand(N, C, H, W, dtype=dtype, generator=gen), mode=mode, padding=padding)


def _query(m, B=3, sigma=0.3, seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x0 = m.images[torch.arange(B) % m.num_images].to(dtype)
    return x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=F64).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,padding", [("ls", "zeros"), ("els", "circular"), ("bbels", "zeros")])
def test_api_matches_reference_all_dtypes_and_sigma_forms(backend, mode, padding):
    m = _machine(mode, padding, C=3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = _query(m, dtype=dtype)
        for sigma in (0.4, torch.tensor(0.4), torch.tensor([0.2, 0.4, 2.0])):
            out = gk.local_denoise(x, sigma, m, 3, backend=backend)
            s = gk.local_score(x, sigma, m, 3, backend=backend)
            assert out.dtype == dtype and s.dtype == dtype and out.shape == x.shape
            sig = torch.as_tensor(sigma, dtype=F64).expand(3)
            want = reference.local_posterior(x.double(), m.images, sig, 3, local_mod.MODES[mode],
                                             local_mod.PADDINGS[padding], SpectralKind.DENOISE)
            tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
            assert (out.double() - want).abs().max() <= tol * 2
            score_want = (want - x.double()) / sig.reshape(3, 1, 1, 1) ** 2
            assert (s.double() - score_want).abs().max() <= tol * 2 * (1 + score_want.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rows_propagate(backend):
    m = _machine(C=3)
    x = _query(m, dtype=torch.float32)
    x[1, 2, 0, 3] = math.nan
    out = gk.local_denoise(x, 0.5, m, 3, backend=backend)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()


def test_clear_errors_name_the_argument():
    m = _machine()
    x = _query(m)
    with pytest.raises(ValueError, match="patch_size"):
        gk.local_denoise(x, 0.5, m, 4)
    with pytest.raises(ValueError, match="patch_size"):
        gk.local_denoise(x, 0.5, m, 0)
    with pytest.raises(ValueError, match="patch_size"):
        gk.local_score(x, 0.5, m, -3)
    with pytest.raises(TypeError, match="patch_size"):
        gk.local_denoise(x, 0.5, m, 3.0)
    with pytest.raises(ValueError, match="bbels"):
        gk.LocalScoreMachine(m.images, mode="bbels", padding="circular")
    with pytest.raises(ValueError, match="mode"):
        gk.LocalScoreMachine(m.images, mode="equivariant")
    with pytest.raises(ValueError, match="padding"):
        gk.LocalScoreMachine(m.images, padding="reflect")
    with pytest.raises(ValueError, match="C, H, W"):
        gk.local_denoise(x[:, :, :4], 0.5, m, 3)
    with pytest.raises(ValueError, match="C, H, W"):
        gk.local_denoise(x.repeat(1, 2, 1, 1), 0.5, m, 3)
    with pytest.raises(ValueError, match="C, H, W"):
        gk.local_denoise(x[0], 0.5, m, 3)
    with pytest.raises(ValueError, match="sigma"):
        gk.local_denoise(x, 0.0, m, 3)
    with pytest.raises(ValueError, match="sigma"):
        gk.local_denoise(x, torch.tensor([0.1, 0.2]), m, 3)
    with pytest.raises(ValueError, match="images"):
        gk.LocalScoreMachine(m.images[0])
    with pytest.raises(TypeError, match="LocalScoreMachine"):
        gk.local_denoise(x, 0.5, "not a machine", 3)


def test_model_to_save_load_and_file_images(tmp_path):
    import numpy as np

    m = _machine(mode="bbels", N=4)
    m32 = m.to(dtype=torch.float32)
    assert m32.dtype == torch.float32 and m32.mode == "bbels" and m32.padding == "zeros"
    m.save(tmp_path / "m.safetensors")
    back = gk.LocalScoreMachine.load(tmp_path / "m.safetensors")
    assert back.mode == "bbels" and torch.equal(back.images, m.images)
    np.save(tmp_path / "imgs.npy", m.images.numpy())
    from_file = gk.LocalScoreMachine(str(tmp_path / "imgs.npy"), mode="bbels")
    x = _query(m)
    assert torch.equal(gk.local_denoise(x, 0.3, from_file, 3, backend="reference"),
                       gk.local_denoise(x, 0.3, m, 3, backend="reference"))
    with pytest.raises(ValueError, match="not a saved LocalScoreMachine"):
        gk.GaussianModel(torch.zeros(3), torch.zeros(3, 0), torch.zeros(0)).save(tmp_path / "g.safetensors")
        gk.LocalScoreMachine.load(tmp_path / "g.safetensors")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,padding", [("ls", "zeros"), ("els", "zeros"), ("els", "circular"), ("bbels", "zeros")])
def test_gradcheck_x(backend, mode, padding):
    m = _machine(mode, padding, N=3, C=2, H=4, W=5)
    x = _query(m, B=2, sigma=0.3).requires_grad_()
    sigma = torch.tensor([0.4, 0.9], dtype=F64)
    for fn in (gk.local_denoise, gk.local_score):  # fast mode: random projections of the Jacobian
        assert torch.autograd.gradcheck(lambda t, fn=fn: fn(t, sigma, m, 3, backend=backend), (x,), atol=1e-7, rtol=1e-5,
                                        fast_mode=True)


def test_sigma_or_images_requiring_grad_raise():
    m = _machine()
    x = _query(m)
    sigma = torch.full((3,), 0.5, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="sigma"):
        gk.local_denoise(x, sigma, m, 3)


def test_local_denoiser_for_samplers_and_calibration():
    m = _machine(mode="els", N=6, H=6, W=6)
    den = local_mod.LocalDenoiser(m, lambda s: 1 if s < 0.5 else 5)
    x = _query(m, B=4)
    sig = torch.tensor([0.1, 1.0, 0.2, 3.0], dtype=F64)
    out = den(x, sig)
    assert den.calls == 2
    want = torch.stack([gk.local_denoise(x[i:i + 1], sig[i:i + 1], m, 1 if sig[i] < 0.5 else 5)[0] for i in range(4)])
    assert torch.allclose(out, want, rtol=0, atol=1e-12)
    res = gk.sampling.sample(den, torch.randn(2, 1, 6, 6, dtype=F64) * 10, gk.schedules.karras(8, 0.05, 10.0), "euler")
    assert res.x.shape == (2, 1, 6, 6) and torch.isfinite(res.x).all()
    hybrid = gk.sampling.HybridDenoiser(lambda x, s: torch.zeros_like(x), den, sigma_threshold=0.5)
    mixed = hybrid(x, sig)
    assert torch.equal(mixed[[0, 2]], torch.zeros_like(x[[0, 2]])) and torch.allclose(mixed[[1, 3]], want[[1, 3]])
    # calibration recovers the patch size of a machine used as the "network"
    target = local_mod.LocalDenoiser(m, 3)
    best, scores = local_mod.calibrate_patch_size(m, target, m.images[:3], [0.3, 1.0], patch_sizes=(1, 3, 5))
    assert best == {0.3: 3, 1.0: 3} and scores[0.3][3] == pytest.approx(1.0)
