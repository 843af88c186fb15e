"""The public API: shapes, dtypes, sigma forms, clear errors on bad input, empty batches,
backend selection, and torch.compile tracing through the ops."""
import math

import pytest
import torch

import gsa_kernels as gk

from ._helpers import random_gaussian, random_mixture, rel_err

G = random_gaussian(12, 3, 0.2, dtype=torch.float32)
M = random_mixture(4, 12, 2, dtype=torch.float32)

OPS = {
    "gaussian_denoise": lambda x, s, **kw: gk.gaussian_denoise(x, s, G, **kw),
    "gaussian_score": lambda x, s, **kw: gk.gaussian_score(x, s, G, **kw),
    "gaussian_flow": lambda x, s, **kw: gk.gaussian_flow(x, s, 0.5 * s if not isinstance(s, torch.Tensor) else s * 0.5, G, **kw),
    "mixture_denoise": lambda x, s, **kw: gk.mixture_denoise(x, s, M, **kw),
    "mixture_score": lambda x, s, **kw: gk.mixture_score(x, s, M, **kw),
}


def test_available_backends_always_has_reference():
    b = gk.available_backends()
    assert "reference" in b and set(b) <= {"reference", "cpu", "triton", "cuda"}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_outputs_keep_shape_and_dtype(name, dtype):
    x = torch.randn(3, 1, 3, 4).to(dtype)  # image-shaped samples, prod(shape) = D = 12
    out = OPS[name](x, 0.7)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", list(OPS))
def test_sigma_forms_agree(name):
    x = torch.randn(3, 12)
    a = OPS[name](x, 0.7)
    b = OPS[name](x, torch.tensor(0.7))
    c = OPS[name](x, torch.full((3,), 0.7))
    assert torch.allclose(a, b) and torch.allclose(a, c)
    per = OPS[name](x, torch.tensor([0.1, 1.0, 10.0]))
    rows = torch.cat([OPS[name](x[i : i + 1], s) for i, s in enumerate([0.1, 1.0, 10.0])])
    # batched vs row-by-row runs may block the float32 GEMMs differently: ~1e-7 relative in a
    # denoiser, which a score divides by sigma^2 = 0.01
    assert torch.allclose(per, rows, rtol=1e-4, atol=1e-4)


def test_non_contiguous_input_is_handled():
    x = torch.randn(12, 3).T  # [3, 12], non-contiguous
    assert not x.is_contiguous()
    assert torch.allclose(gk.gaussian_denoise(x, 0.5, G), gk.gaussian_denoise(x.contiguous(), 0.5, G))


@pytest.mark.parametrize("name", list(OPS))
def test_empty_batch_gives_empty_result(name):
    x = torch.randn(0, 12)
    out = OPS[name](x, 0.5)
    assert out.shape == (0, 12)
    assert gk.mixture_logp(x, 0.5, M).shape == (0,)
    assert gk.gaussian_trajectory(x, [1.0, 0.5], G).shape == (2, 0, 12)


BAD_SIGMAS = [(0.0, "> 0"), (-1.0, "> 0"), (float("nan"), "NaN"), (float("inf"), "finite")]


@pytest.mark.parametrize("name,sigma,match", [
    (name, sigma, match) for name in OPS for sigma, match in BAD_SIGMAS
    if not (name == "gaussian_flow" and sigma == float("inf"))  # sigma_from = inf: unit-noise input
])
def test_bad_sigma_is_a_value_error(name, sigma, match):
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match=match):
        OPS[name](x, sigma)
    with pytest.raises(ValueError, match=match):
        OPS[name](x, torch.tensor([0.5, sigma]))


def test_bad_shapes_dtypes_devices():
    with pytest.raises(ValueError, match="features"):
        gk.gaussian_denoise(torch.randn(2, 13), 0.5, G)
    with pytest.raises(ValueError, match=r"\[B, \*shape\]"):
        gk.gaussian_denoise(torch.randn(12), 0.5, G)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        gk.gaussian_denoise(torch.ones(2, 12, dtype=torch.int64), 0.5, G)
    with pytest.raises(TypeError, match="torch.Tensor"):
        gk.gaussian_denoise([[0.0] * 12], 0.5, G)
    with pytest.raises(ValueError, match=r"\[B\] = \[2\]"):
        gk.gaussian_denoise(torch.randn(2, 12), torch.ones(3), G)
    with pytest.raises(TypeError, match="GaussianModel"):
        gk.gaussian_denoise(torch.randn(2, 12), 0.5, M)
    with pytest.raises(TypeError, match="GaussianMixture"):
        gk.mixture_denoise(torch.randn(2, 12), 0.5, G)
    with pytest.raises(ValueError, match="model is on meta"):
        gk.gaussian_denoise(torch.randn(2, 12), 0.5, G.to("meta"))
    with pytest.raises(ValueError, match="sigma is on meta"):
        gk.gaussian_denoise(torch.randn(2, 12), torch.ones(2, device="meta"), G)
    with pytest.raises(ValueError, match="backend must be"):
        gk.gaussian_denoise(torch.randn(2, 12), 0.5, G, backend="tpu")
    with pytest.raises(ValueError, match="sigma_to must be >= 0"):
        gk.gaussian_flow(torch.randn(2, 12), 1.0, -0.1, G)
    with pytest.raises(ValueError, match="sigmas must be"):
        gk.gaussian_trajectory(torch.randn(2, 12), torch.ones(3, 3), G)
    with pytest.raises(ValueError, match=r"sigmas\[1:\] must be finite"):
        gk.gaussian_trajectory(torch.randn(2, 12), [1.0, math.inf], G)


def test_unavailable_backend_is_a_clear_error():
    missing = [b for b in ("cpu", "triton", "cuda") if b not in gk.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises((RuntimeError, ValueError), match="not available|cannot run"):
        gk.gaussian_denoise(torch.randn(2, 12), 0.5, G, backend=missing[0])


def test_model_dtype_follows_x():
    g64 = random_gaussian(12, 3, 0.2)
    x = torch.randn(3, 12)
    out = gk.gaussian_denoise(x, 0.5, g64)  # float64 model, float32 x -> float32 compute
    assert out.dtype == torch.float32
    assert rel_err(out, gk.gaussian_denoise(x.double(), 0.5, g64)) < 1e-5


def test_flow_roundtrip_and_trajectory_consistency():
    x = torch.randn(3, 12, dtype=torch.float64)
    g = random_gaussian(12, 3, 0.2)
    back = gk.gaussian_flow(gk.gaussian_flow(x, 3.0, 0.1, g), 0.1, 3.0, g)
    assert torch.allclose(back, x, atol=1e-10)
    traj = gk.gaussian_trajectory(x, [3.0, 1.0, 0.1, 0.0], g)
    assert torch.allclose(traj[2], gk.gaussian_flow(x, 3.0, 0.1, g), atol=1e-12)
    assert torch.allclose(traj[0], x, atol=1e-12)


def test_torch_compile_fullgraph_through_gaussian_denoise():
    g = random_gaussian(12, 3, 0.2, dtype=torch.float32)

    def f(x, s):
        return gk.gaussian_denoise(x, s, g) * 2 + 1

    x, s = torch.randn(4, 12), torch.rand(4) + 0.1
    compiled = torch.compile(f, fullgraph=True)
    assert torch.allclose(compiled(x, s), f(x, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [
    lambda x, s: gk.gaussian_score(x, s, G, backend="reference"),
    lambda x, s: gk.gaussian_flow(x, s, 0.1, G),
    lambda x, s: gk.mixture_denoise(x, s, M),
])
def test_torch_compile_fullgraph_traces_other_ops(fn):
    x, s = torch.randn(4, 12), torch.rand(4) + 0.1
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, s), fn(x, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_mixture_score_16bit_is_computed_before_rounding(dtype, tol):
    """(D - x) / sigma^2 cancels at small sigma: a denoiser rounded to 16 bits first is off by
    0.2 (float16) / 0.8 (bfloat16) relative at sigma = 0.01; computed in float32, only the
    output is rounded."""
    m = gk.GaussianMixture.from_points(torch.randn(6, 12))
    x = (m.means[:3] + 0.01 * torch.randn(3, 12)).to(dtype)
    got = gk.mixture_score(x, 0.01, m)
    want = gk.mixture_score(x.double(), 0.01, m.to(dtype=torch.float64), backend="reference")
    assert got.dtype == dtype and rel_err(got, want) < tol


# ----------------------------------------------------------------------------- labels (class-conditional)

Y = torch.tensor([3, 0, 0, 2])  # component 1 unused


@pytest.mark.parametrize("backend", gk.available_backends())
def test_labels_pick_each_rows_component(backend):
    """Row b under component labels[b] of the mixture, shapes [B, *shape] kept, on every backend
    usable here; the same numbers as the single-Gaussian op of that component."""
    x = torch.randn(4, 3, 4)
    for k in range(M.num_components):
        g = gk.GaussianModel(M.means[k], M.bases[k], M.eigvals[k], float(M.residual_var[k]))
        rows = Y == k
        if not rows.any():
            continue
        for got, want in (
            (gk.gaussian_denoise(x, 0.7, M, backend=backend, labels=Y), gk.gaussian_denoise(x, 0.7, g)),
            (gk.gaussian_score(x, 0.7, M, backend=backend, labels=Y), gk.gaussian_score(x, 0.7, g)),
            (gk.gaussian_flow(x, 2.0, 0.3, M, scale_to=0.5, backend=backend, labels=Y),
             gk.gaussian_flow(x, 2.0, 0.3, g, scale_to=0.5)),
            (gk.gaussian_trajectory(x, [2.0, 0.5, 0.0], M, backend=backend, labels=Y)[:, rows],
             gk.gaussian_trajectory(x, [2.0, 0.5, 0.0], g)[:, rows]),
        ):
            if got.dim() == x.dim():
                assert got.shape == x.shape
                got, want = got[rows], want[rows]
            assert rel_err(got, want) < 1e-5


def test_labels_empty_batch():
    x = torch.randn(0, 12)
    y = torch.zeros(0, dtype=torch.int64)
    assert gk.gaussian_denoise(x, 0.5, M, labels=y).shape == (0, 12)
    assert gk.gaussian_trajectory(x, [1.0, 0.0], M, labels=y).shape == (2, 0, 12)


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in gk.available_backends()])
def test_torch_compile_fullgraph_with_labels(backend):
    def f(x, s, y):
        return gk.gaussian_denoise(x, s, M, backend=backend, labels=y) * 2 + 1

    x, s = torch.randn(4, 12), torch.rand(4) + 0.1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, s, Y), f(x, s, Y), rtol=1e-5, atol=1e-5)
