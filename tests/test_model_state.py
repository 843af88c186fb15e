"""Model state (docs/cpu_backend.md, "Model state"): the CPU kernels use GEMM-ready layouts that the model
keeps beside its tensors. A change to a model's tensors through any route must be seen by the
next call: after each mutation the cpu backend must agree with the reference backend, which
reads the model's tensors afresh. And a model's memory must go when the model goes."""
import ctypes
import gc
import math
import os

import numpy as np
import pytest
import torch

import gsa_kernels as gk
from tests._helpers import orthonormal, requires_backend

pytestmark = requires_backend("cpu")


@pytest.fixture(autouse=True)
def _keep_every_layout(monkeypatch):
    """By default U^T is kept only where it pays on this host (_layouts.py); here always, so that
    every mutation route meets a kept layout that could go stale."""
    monkeypatch.setenv("GSA_KERNELS_LAYOUTS", "always")

D, R, K = 37, 5, 6


def _gaussian_arrays(seed, r=R):
    gen = torch.Generator().manual_seed(seed)
    return {"mean": (torch.randn(D, dtype=torch.float64, generator=gen) * 2).numpy(),
            "basis": orthonormal(D, r, gen).numpy(),
            "eigvals": torch.linspace(3.0, 0.2, r, dtype=torch.float64).numpy()}


def _mixture_arrays(seed, r=R):
    gen = torch.Generator().manual_seed(seed)
    return {"means": (torch.randn(K, D, dtype=torch.float64, generator=gen) * 0.7).numpy(),
            "bases": torch.stack([orthonormal(D, r, gen) for _ in range(K)]).numpy(),
            "eigvals": (torch.rand(K, r, dtype=torch.float64, generator=gen) * 2 + 0.1).numpy()}


class Ctx:
    """A float64 model built from numpy arrays without copies (so that the arrays alias it), and
    the tensors of a second model of the same shapes (`new`) and of rank R + 1 (`wide`)."""

    def __init__(self, kind, r=R):
        if kind == "gaussian":
            self.arrays = _gaussian_arrays(0, r)
            t = {k: torch.from_numpy(v) for k, v in self.arrays.items()}
            self.model = gk.GaussianModel(t["mean"], t["basis"], t["eigvals"], 0.05)
            self.new = {k: torch.from_numpy(v) for k, v in _gaussian_arrays(1, r).items()}
            self.wide = {k: torch.from_numpy(v) for k, v in _gaussian_arrays(2, r + 1).items()}
        else:
            self.arrays = _mixture_arrays(0, r)
            t = {k: torch.from_numpy(v) for k, v in self.arrays.items()}
            self.model = gk.GaussianMixture(t["means"], t["bases"], t["eigvals"], 0.3)
            self.new = {k: torch.from_numpy(v) for k, v in _mixture_arrays(1, r).items()}
            self.wide = {k: torch.from_numpy(v) for k, v in _mixture_arrays(2, r + 1).items()}


def _givens(U):
    """Rotate columns 0 and 1 of U [.., D, r] in place by 40 degrees (same span, new directions)."""
    c, s = math.cos(0.7), math.sin(0.7)
    u0, u1 = U[..., 0].clone(), U[..., 1].clone()
    U[..., 0] = c * u0 - s * u1
    U[..., 1] = s * u0 + c * u1


def _storage_view(t):
    """A new tensor on t's untyped storage (own version counter)."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _memmove(dst, src):
    ctypes.memmove(dst.data_ptr(), src.contiguous().data_ptr(), dst.numel() * dst.element_size())


def _set_wide_gaussian(c):
    c.model.basis.data = c.wide["basis"].clone()
    c.model.eigvals = c.wide["eigvals"].clone()


def _set_wide_mixture(c):
    c.model.bases.data = c.wide["bases"].clone()
    c.model.eigvals = c.wide["eigvals"].clone()


# name -> (model kind, mutation). A column's sign flip leaves the model the same distribution
# (the answer must not change), but a kernel that mixed a stale U^T with the live U would not.
SAME_MODEL = {"gaussian: basis[:, 0] *= -1", "gaussian: no_grad basis.mul_", "gaussian: basis.data[:, 0].mul_(-1)"}
ROUTES = {
    "gaussian: basis.copy_": ("gaussian", lambda c: c.model.basis.copy_(c.new["basis"])),
    "gaussian: basis[:, 0] *= -1": ("gaussian", lambda c: c.model.basis[:, 0].mul_(-1)),
    "gaussian: mean.add_": ("gaussian", lambda c: c.model.mean.add_(1)),
    "gaussian: no_grad basis.mul_": ("gaussian", lambda c: _no_grad(lambda: c.model.basis.mul_(-1))),
    "gaussian: inference_mode basis.copy_": ("gaussian", lambda c: _inference(lambda: c.model.basis.copy_(c.new["basis"]))),
    "gaussian: basis.detach().copy_": ("gaussian", lambda c: c.model.basis.detach().copy_(c.new["basis"])),
    "gaussian: basis.set_": ("gaussian", lambda c: c.model.basis.set_(c.new["basis"].clone())),
    "gaussian: basis.data.copy_": ("gaussian", lambda c: c.model.basis.data.copy_(c.new["basis"])),
    "gaussian: basis.data[:, 0].mul_(-1)": ("gaussian", lambda c: c.model.basis.data[:, 0].mul_(-1)),
    "gaussian: mean.data.add_": ("gaussian", lambda c: c.model.mean.data.add_(1)),
    "gaussian: Givens rotation through .data": ("gaussian", lambda c: _givens(c.model.basis.data)),
    "gaussian: basis.data = U2": ("gaussian", lambda c: setattr(c.model.basis, "data", c.new["basis"].clone())),
    "gaussian: basis.data = wider U (+ eigvals)": ("gaussian", _set_wide_gaussian),
    "gaussian: basis = U2": ("gaussian", lambda c: setattr(c.model, "basis", c.new["basis"].clone())),
    "gaussian: mean = mu2": ("gaussian", lambda c: setattr(c.model, "mean", c.new["mean"].clone())),
    "gaussian: eigvals.data.mul_": ("gaussian", lambda c: c.model.eigvals.data.mul_(3)),
    "gaussian: residual_var = ...": ("gaussian", lambda c: setattr(c.model, "residual_var", 0.7)),
    "gaussian: basis.numpy() write": ("gaussian", lambda c: np.copyto(c.model.basis.numpy(), c.new["basis"].numpy())),
    "gaussian: mean.numpy() write": ("gaussian", lambda c: c.model.mean.numpy().__iadd__(1)),
    "gaussian: from_numpy array changed later": ("gaussian", lambda c: np.copyto(c.arrays["basis"], c.new["basis"].numpy())),
    "gaussian: from_dlpack write": ("gaussian", lambda c: torch.from_dlpack(c.model.basis).copy_(c.new["basis"])),
    "gaussian: untyped storage write": ("gaussian", lambda c: _storage_view(c.model.basis).copy_(c.new["basis"])),
    "gaussian: ctypes memmove": ("gaussian", lambda c: _memmove(c.model.basis, c.new["basis"])),
    "mixture: means.add_": ("mixture", lambda c: c.model.means.add_(1)),
    "mixture: bases.copy_": ("mixture", lambda c: c.model.bases.copy_(c.new["bases"])),
    "mixture: means.data.add_": ("mixture", lambda c: c.model.means.data.add_(1)),
    "mixture: bases.data.copy_": ("mixture", lambda c: c.model.bases.data.copy_(c.new["bases"])),
    "mixture: Givens rotation through .data": ("mixture", lambda c: _givens(c.model.bases.data)),
    "mixture: bases.data = wider (+ eigvals)": ("mixture", _set_wide_mixture),
    "mixture: means.data = M2": ("mixture", lambda c: setattr(c.model.means, "data", c.new["means"].clone())),
    "mixture: means = M2": ("mixture", lambda c: setattr(c.model, "means", c.new["means"].clone())),
    "mixture: means.numpy() write": ("mixture", lambda c: np.copyto(c.model.means.numpy(), c.new["means"].numpy())),
    "mixture: bases.numpy() write": ("mixture", lambda c: np.copyto(c.model.bases.numpy(), c.new["bases"].numpy())),
    "mixture: from_numpy array changed later": ("mixture", lambda c: np.copyto(c.arrays["bases"], c.new["bases"].numpy())),
    "mixture: from_dlpack write": ("mixture", lambda c: torch.from_dlpack(c.model.means).copy_(c.new["means"])),
    "mixture: untyped storage write": ("mixture", lambda c: _storage_view(c.model.bases).copy_(c.new["bases"])),
    "mixture: ctypes memmove": ("mixture", lambda c: _memmove(c.model.means, c.new["means"])),
    "mixture: log_weights.data change": ("mixture", lambda c: c.model.log_weights.data.copy_(torch.log_softmax(torch.arange(K, dtype=torch.float64), 0))),
}


def _no_grad(f):
    with torch.no_grad():
        f()


def _inference(f):
    with torch.inference_mode():
        f()


def _outputs(model, x, backend):
    """Every op family of the model, flattened to a list of tensors."""
    if isinstance(model, gk.GaussianModel):
        sig = torch.tensor([0.02, 0.3, 2.0], dtype=torch.float64)
        return [gk.gaussian_denoise(x, 0.3, model, backend=backend),
                gk.gaussian_score(x, sig, model, backend=backend),
                gk.gaussian_flow(x, 2.0, 0.1, model, backend=backend),
                gk.gaussian_trajectory(x, [2.0, 0.5, 0.0], model, backend=backend)]
    den, w = gk.mixture_denoise(x, 0.6, model, return_weights=True, backend=backend)
    return [den, w, gk.mixture_logp(x, 0.6, model, backend=backend)]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_route(name):
    """Run the model on the cpu backend, mutate it by route `name`, and compare the next cpu
    call with the reference. Returns (changed, max relative error vs the reference)."""
    kind, mutate = ROUTES[name]
    c = Ctx(kind)
    x = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    before = _outputs(c.model, x, "cpu")
    mutate(c)
    ref = _outputs(c.model, x, "reference")
    cpu = _outputs(c.model, x, "cpu")
    changed = max(_rel(b, r) for b, r in zip(before, ref)) > 1e-3
    return changed, max(_rel(a, r) for a, r in zip(cpu, ref))


@pytest.mark.parametrize("name", list(ROUTES))
def test_mutation_route_is_seen(name):
    changed, err = check_route(name)
    assert changed != (name in SAME_MODEL), "the mutation did not change the model as intended"
    assert err < 1e-9, f"cpu backend disagrees with the reference after {name!r}: rel err {err:.3g}"


def test_layout_policy(monkeypatch):
    """GSA_KERNELS_LAYOUTS: never keeps no layout, auto keeps U^T exactly when the host's
    measured costs say it pays for the batch (csrc/cpu/layouts.cpp), a bad value is an error;
    the results are the same whichever way."""
    x = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    outs = {}
    for policy in ("always", "never", "auto"):
        monkeypatch.setenv("GSA_KERNELS_LAYOUTS", policy)
        c = Ctx("gaussian")
        outs[policy] = gk.gaussian_denoise(x, 0.5, c.model, backend="cpu")
        kept = any(k[0] == "basis_rows" for k in c.model.__dict__.get("_layouts", {}))
        pays = torch.ops.gsa_kernels.basis_rows_pay(3, c.model.basis)
        assert kept == {"always": True, "never": False, "auto": pays}[policy], policy
    assert torch.equal(outs["always"], outs["never"]) or _rel(outs["always"], outs["never"]) < 1e-14
    assert torch.equal(outs["auto"], outs["always"]) or torch.equal(outs["auto"], outs["never"])
    # an empty batch never pays for a hash of U
    assert torch.ops.gsa_kernels.basis_rows_pay(0, c.model.basis) is False
    monkeypatch.setenv("GSA_KERNELS_LAYOUTS", "sometimes")
    with pytest.raises(ValueError, match="GSA_KERNELS_LAYOUTS must be one of auto, always, never"):
        gk.gaussian_denoise(x, 0.5, Ctx("gaussian").model, backend="cpu")


def test_layouts_live_in_the_model_and_are_rebuilt_only_on_change():
    c = Ctx("mixture")
    x = torch.randn(2, D, dtype=torch.float64)
    gk.mixture_denoise(x, 0.5, c.model, backend="cpu")
    kept = dict(c.model._layouts)
    assert kept, "the cpu backend kept no layout in the model"
    gk.mixture_denoise(x, 0.5, c.model, backend="cpu")
    assert all(c.model._layouts[k][1] is kept[k][1] for k in kept)  # reused, not rebuilt
    c.model.bases.data[0, 0, 0] += 1e-12  # any change of content, however small
    gk.mixture_denoise(x, 0.5, c.model, backend="cpu")
    assert all(c.model._layouts[k][1] is not kept[k][1] for k in kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_content_hash_sees_every_bit_and_every_reordering(dtype):
    """The layouts' staleness check: any flipped bit, swapped rows or shifted data changes the
    hash; the same contents (another tensor, a non-contiguous view of equal values) do not."""
    h = torch.ops.gsa_kernels.content_hash
    t = torch.randn(37, 131, dtype=dtype, generator=torch.Generator().manual_seed(0))  # odd sizes: tails
    base = h(t)
    assert h(t.clone()) == base and h(t.t().contiguous().t()) == base
    raw = t.view(torch.uint8).view(-1)
    for byte in [0, 1, 63, 64, 65, raw.numel() // 2, raw.numel() - 1]:  # stripe edges and the tail
        for bit in (0, 7):
            u = raw.clone()
            u[byte] ^= 1 << bit
            assert h(u.view(dtype).view(t.shape)) != base, (byte, bit)
    assert h(t[[1, 0, *range(2, 37)]]) != base  # two rows swapped
    rows = torch.randn(8, 512 // t.element_size(), generator=torch.Generator().manual_seed(2)).to(dtype)
    assert h(rows[[3, 1, 2, 0, 4, 5, 6, 7]]) != h(rows)  # whole 64-byte stripes swapped
    assert h(torch.roll(t.view(-1), 8).view(t.shape)) != base  # everything moved by one stripe lane
    assert h(t.view(131, 37)) != base  # same bytes, other shape
    big = torch.randn(3 << 19, generator=torch.Generator().manual_seed(1)).to(dtype)  # several 1 MiB chunks
    b = h(big)
    big[-1] += 1
    assert h(big) != b


def test_pickled_model_leaves_its_layouts_behind():
    import pickle

    c = Ctx("mixture")
    c.model.denoise(torch.randn(2, D, dtype=torch.float64), 0.5, backend="cpu")
    assert "_layouts" in c.model.__dict__
    copy = pickle.loads(pickle.dumps(c.model))
    assert "_layouts" not in copy.__dict__ and torch.equal(copy.bases, c.model.bases)


def test_layout_arguments_are_checked():
    g = Ctx("gaussian").model
    x = torch.randn(2, D, dtype=torch.float64)
    s = torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="basis_rows"):
        torch.ops.gsa_kernels.gaussian_map(x, g.mean, g.basis, g.eigvals, 0.0, s, s, s, s, 0,
                                           torch.zeros(R + 1, D, dtype=torch.float64))


def _rss_bytes():
    """Resident memory, after asking glibc to return its free heap memory (30 MiB blocks come
    from the heap once glibc's mmap threshold has risen; what it keeps is not ours)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _big_model(i, mib):
    """A model of about `mib` MiB (float32): a Gaussian, a delta mixture or a low-rank mixture."""
    n = mib * 2**20 // 4
    kind = i % 3
    if kind == 0:  # Gaussian at D = 8192 (at most 256 MiB)
        Dg = 8192
        r = max(1, min(Dg, n // Dg))
        return gk.GaussianModel(torch.zeros(Dg), torch.eye(Dg, r), torch.ones(r)), Dg
    Dm = 1024
    r = 0 if kind == 1 else 8
    Km = max(1, n // (Dm * (r + 1)))
    bases = torch.eye(Dm, r).expand(Km, Dm, r)
    return gk.GaussianMixture(torch.zeros(Km, Dm), bases, torch.ones(Km, r), 0.1), Dm


def test_memory_returns_after_dropping_models():
    """200 models of 30..500 MiB, each created, used on the cpu backend (which builds its
    layouts) and dropped: resident memory comes back to where it started (within 10 %)."""
    sizes = [30] * 39 + [500]  # MiB, cycled: 5 models of 500 MiB, 195 of 30 (8.2 GiB in all)
    warm, _ = _big_model(0, 30)
    gk.gaussian_denoise(torch.randn(2, 8192), 0.5, warm, backend="cpu")
    del warm
    start = _rss_bytes()
    peak = 0
    for i in range(200):
        model, dim = _big_model(i, sizes[i % len(sizes)])
        x = torch.randn(2, dim)
        if isinstance(model, gk.GaussianModel):
            model.denoise(x, 0.5, backend="cpu")
        else:
            model.denoise(x, 0.5, backend="cpu")
            model.logp(x, 0.5, backend="cpu")
        if i % 40 == 39:  # a 500 MiB model and its layouts alive
            peak = max(peak, _rss_bytes())
        del model
    end = _rss_bytes()
    print(f"RSS start {start / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, end {end / 2**20:.0f} MiB")
    assert peak > start + 400 * 2**20  # the loop did allocate its models
    assert end <= 1.1 * start, f"RSS grew from {start / 2**20:.0f} to {end / 2**20:.0f} MiB"


def test_opcheck_with_layouts():
    """The kernel ops with the layouts passed in, and the layout ops themselves."""
    ops = torch.ops.gsa_kernels
    g, m = Ctx("gaussian").model, Ctx("mixture").model
    x = torch.randn(3, D, dtype=torch.float64)
    s = torch.full((3,), 0.5, dtype=torch.float64)
    rows = ops.basis_rows(g.basis)
    torch.testing.assert_close(rows, g.basis.T)
    torch.library.opcheck(ops.basis_rows.default, (g.basis,))
    torch.library.opcheck(ops.mixture_panels.default, (m.means, m.bases))
    torch.library.opcheck(ops.gaussian_map.default, (x, g.mean, g.basis, g.eigvals, 0.1, s, s, s, s, 1, rows))
    torch.library.opcheck(ops.gaussian_trajectory.default,
                          (x, g.mean, g.basis, g.eigvals, 0.1, torch.rand(4, 3, dtype=torch.float64) + 0.1, rows))
    fwd, bwd = ops.mixture_panels(m.means, m.bases)
    args = (x, m.means, m.bases, m.eigvals, m.residual_var, m.log_weights, s, True, True)
    torch.library.opcheck(ops.mixture_posterior.default, args + (fwd, bwd))
    for a, b in zip(ops.mixture_posterior(*args, fwd, bwd), ops.mixture_posterior(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
