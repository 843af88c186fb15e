"""Inputs that used to fail with the wrong error (or none): bfloat16 models, empty k-means
clusters, symbolic float sigmas under torch.compile(dynamic=True), sigmas that round to 0 or inf
in the compute dtype, empty and 1-d data, a file of the other model kind."""

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import sampling
from tests._helpers import random_gaussian, random_mixture, rel_err


def _data(N=200, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, D, dtype=torch.float64)


# ----------------------------------------------------------------------------- bfloat16


def test_bfloat16_fit_save_load_and_ops(tmp_path):
    data = _data().bfloat16()
    g = gk.GaussianModel.fit(data, rank=5)
    assert g.dtype == torch.bfloat16 and g.rank == 5
    x = data[:4].float()
    ref = gk.gaussian_denoise(x.double(), 0.5, g.to(dtype=torch.float64), backend="reference")
    assert rel_err(gk.gaussian_denoise(x, 0.5, g), ref) < 1e-5
    g.save(tmp_path / "g.safetensors")
    h = gk.GaussianModel.load(tmp_path / "g.safetensors")
    assert h.dtype == torch.bfloat16 and torch.equal(h.basis, g.basis)


def test_bfloat16_mixture_fit_and_gaussian_approximation():
    data = torch.cat([_data(100, seed=1) - 5, _data(100, seed=2) + 5]).bfloat16()
    m = gk.GaussianMixture.fit(data, n_components=2, rank=3)
    assert m.dtype == torch.bfloat16
    g = sampling.gaussian_approximation(m)
    assert g.dtype == torch.bfloat16
    ref = sampling.gaussian_approximation(m.to(dtype=torch.float64))
    assert rel_err(g.mean, ref.mean) < 1e-2


def test_bfloat16_tolerance_still_rejects_a_non_orthonormal_basis():
    U = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64))[0]
    U[:, 1] = U[:, 0]  # two equal columns
    with pytest.raises(ValueError, match="orthonormal"):
        gk.GaussianModel(torch.zeros(20).bfloat16(), U.bfloat16(), torch.ones(4).bfloat16())


# ----------------------------------------------------------------------------- k-means


def test_mixture_fit_with_too_few_distinct_points_is_a_clear_error():
    with pytest.raises(ValueError, match="1 distinct points, fewer than n_components = 3"):
        gk.GaussianMixture.fit(torch.ones(50, 4), n_components=3, rank=1)


def test_empty_cluster_is_reseeded():
    """Two centers on one point: the second one's cluster is empty until it is re-seeded on the
    point farthest from its center."""
    from gsa_kernels.fitting import _assign_nonempty

    x = torch.tensor([[0.0, 0.0], [0.0, 0.1], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    centers = x[[0, 0, 2]].clone()
    labels = _assign_nonempty(x, centers)
    assert torch.bincount(labels, minlength=3).tolist() == [2, 1, 1]
    assert torch.equal(centers[1], x[3])


@pytest.mark.parametrize("seed", range(2))
def test_mixture_fit_with_as_many_distinct_points_as_components(seed):
    """Three distinct points, one of them 48 times: one component per point, no IndexError."""
    pts = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    data = torch.cat([pts[:1].expand(48, 2), pts[1:]])
    m = gk.GaussianMixture.fit(data, n_components=3, rank=0, seed=seed)
    found = sorted(map(tuple, m.means.tolist()))
    assert found == sorted(map(tuple, pts.tolist()))
    torch.testing.assert_close(m.log_weights.exp().sort().values, torch.tensor([1 / 50, 1 / 50, 48 / 50]))


# ----------------------------------------------------------------------------- torch.compile


def test_compile_dynamic_with_python_float_sigma():
    g = random_gaussian(16, 3, dtype=torch.float32)
    m = random_mixture(4, 16, 2, dtype=torch.float32)

    def f(x, s, t):
        return gk.gaussian_denoise(x, s, g) + gk.gaussian_flow(x, s, t, g) + gk.mixture_score(x, s, m)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for B, s, t in ((3, 0.5, 0.1), (5, 1.5, 0.0)):
        x = torch.randn(B, 16)
        torch.testing.assert_close(compiled(x, s, t), f(x, s, t), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sigma range


@pytest.mark.parametrize("sigma", [1e300, 1e-50, torch.tensor(1e-50, dtype=torch.float64),
                                   torch.tensor([0.5, 1e30], dtype=torch.float64)])
def test_sigma_outside_the_compute_dtype_is_a_clear_error(sigma):
    """float32 x computes in float32: sigma^2 must be a normal float32 number."""
    m = random_mixture(3, 8, 0, dtype=torch.float32)
    g = random_gaussian(8, 2, dtype=torch.float32)
    x = torch.randn(2, 8)
    for op in (lambda: gk.mixture_score(x, sigma, m), lambda: gk.gaussian_denoise(x, sigma, g),
               lambda: gk.gaussian_flow(x, 1.0, sigma, g)):
        with pytest.raises(ValueError, match=r"sigma.* is outside \[.*float32"):
            op()


def test_small_sigma_is_fine_in_float64():
    m = random_mixture(3, 8, 0)
    x = m.means[:2] + 1e-50
    out = gk.mixture_score(x, 1e-50, m)
    assert torch.isfinite(out).all()


def test_trajectory_sigmas_checked_before_conversion():
    g = random_gaussian(8, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="outside"):
        gk.gaussian_trajectory(torch.randn(2, 8), torch.tensor([1.0, 1e-30], dtype=torch.float64), g)


# ----------------------------------------------------------------------------- data shapes and files


@pytest.mark.parametrize("fit", [lambda d: gk.GaussianModel.fit(d),
                                 lambda d: gk.GaussianMixture.fit(d, 2, 1),
                                 lambda d: gk.GaussianMixture.from_points(d)])
def test_empty_data_is_a_clear_error(fit):
    with pytest.raises(ValueError, match="at least 2 samples|no points"):
        fit(torch.empty(0, 5))


def test_one_dimensional_points_are_a_clear_error():
    with pytest.raises(ValueError, match=r"\[N, \.\.\.\].*points\[:, None\]"):
        gk.GaussianMixture.from_points(torch.randn(10))
    with pytest.raises(ValueError, match=r"\[N, \.\.\.\]"):
        gk.GaussianMixture.fit(torch.randn(10), 2, 0)


def test_loading_the_other_model_kind_is_a_clear_error(tmp_path):
    random_mixture(3, 8, 2).save(tmp_path / "m.safetensors")
    random_gaussian(8, 2).save(tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match="holds a GaussianMixture.*GaussianMixture.load"):
        gk.GaussianModel.load(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="holds a GaussianModel.*GaussianModel.load"):
        gk.GaussianMixture.load(tmp_path / "g.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a saved GaussianModel: it lacks mean"):
        gk.GaussianModel.load(tmp_path / "other.safetensors")
