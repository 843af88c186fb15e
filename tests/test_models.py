"""GaussianModel / GaussianMixture: construction checks, fitting, conversion and save/load."""
import math

import pytest
import torch

import gsa_kernels as gk

from ._helpers import random_gaussian, random_mixture


def test_fit_recovers_mean_and_eigenvalues_within_sampling_error():
    D, N = 8, 2000
    true = random_gaussian(D, D, 0.0, spread=3.0, seed=1)
    data = true.sample(N, generator=torch.Generator().manual_seed(2))
    g = gk.GaussianModel.fit(data)
    lam = true.eigvals.sort(descending=True).values
    # mean: per-coordinate standard error sqrt(Sigma_ii / N); allow 5 standard errors
    se = (torch.diagonal(true.basis @ torch.diag(true.eigvals) @ true.basis.T) / N).sqrt()
    assert ((g.mean - true.mean).abs() < 5 * se).all()
    # eigenvalues: relative standard error sqrt(2 / N) for well-separated eigenvalues
    assert torch.allclose(g.eigvals, lam, rtol=5 * math.sqrt(2 / N))
    assert (g.eigvals[:-1] >= g.eigvals[1:]).all(), "fitted eigenvalues come in descending order"
    # a wrong answer (e.g. the biased 1/N scatter of a tiny sample) would not pass
    small = gk.GaussianModel.fit(data[:10])
    assert not torch.allclose(small.eigvals, lam, rtol=5 * math.sqrt(2 / N))


def test_fit_streams_batches_identically():
    data = random_gaussian(20, 5, 0.1).sample(500)
    one = gk.GaussianModel.fit(data, rank=5)
    streamed = gk.GaussianModel.fit((data[i : i + 64] for i in range(0, 500, 64)), rank=5)
    assert torch.allclose(one.mean, streamed.mean, atol=1e-12)
    assert torch.allclose(one.eigvals, streamed.eigvals, rtol=1e-10)
    assert abs(one.residual_var - streamed.residual_var) < 1e-12
    # the subspace (not the sign of each vector) is what must agree
    assert torch.allclose(one.basis @ one.basis.T, streamed.basis @ streamed.basis.T, atol=1e-8)


def test_fit_rank_energy_and_small_n():
    true = random_gaussian(30, 4, 0.01, seed=3)
    data = true.sample(400)
    g = gk.GaussianModel.fit(data, rank=4)
    assert g.rank == 4 and 0.005 < g.residual_var < 0.02
    ge = gk.GaussianModel.fit(data, energy=0.9)
    frac = gk.GaussianModel.fit(data).eigvals.cumsum(0) / gk.GaussianModel.fit(data).eigvals.sum()
    assert frac[ge.rank - 1] >= 0.9 and (ge.rank == 1 or frac[ge.rank - 2] < 0.9)
    few = gk.GaussianModel.fit(data[:10])  # N < D: at most N - 1 directions carry variance
    assert few.rank == 9 and few.residual_var == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="rank or energy"):
        gk.GaussianModel.fit(data, rank=2, energy=0.5)
    with pytest.raises(ValueError, match="at least 2"):
        gk.GaussianModel.fit(data[:1])


def test_fit_accepts_images_and_integer_data():
    imgs = torch.randint(0, 255, (100, 1, 4, 4), dtype=torch.uint8)
    g = gk.GaussianModel.fit(imgs, rank=3)
    assert g.dim == 16 and g.dtype == torch.float32
    assert torch.allclose(g.mean.double(), imgs.double().reshape(100, -1).mean(0), rtol=1e-6)


def test_mixture_fit_recovers_well_separated_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]], dtype=torch.float64)
    sizes = [300, 200, 100]
    data = torch.cat([c + 0.5 * torch.randn(n, 4, dtype=torch.float64) for c, n in zip(centers, sizes)])
    m = gk.GaussianMixture.fit(data, n_components=3, rank=2, seed=0)
    order = torch.cdist(centers, m.means).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(m.means[order], centers, atol=0.15)
    assert torch.allclose(m.log_weights[order].exp(), torch.tensor(sizes, dtype=torch.float64) / 600, atol=1e-9)
    assert torch.allclose(m.eigvals[order], torch.full((3, 2), 0.25, dtype=torch.float64), rtol=0.35)
    assert (m.eigvals[:, :-1] >= m.eigvals[:, 1:]).all()
    again = gk.GaussianMixture.fit(data, n_components=3, rank=2, seed=0)
    assert torch.equal(again.means, m.means), "k-means is reproducible for a seed"


def test_from_points_is_rank_zero_delta_mixture():
    pts = torch.randn(7, 2, 3)
    m = gk.GaussianMixture.from_points(pts)
    assert m.num_components == 7 and m.dim == 6 and m.rank == 0
    assert torch.equal(m.residual_var, torch.zeros(7))
    assert torch.allclose(m.log_weights, torch.full((7,), -math.log(7)))


@pytest.mark.parametrize("bad,match", [
    (dict(eigvals=-1.0), "eigvals must be >= 0"),
    (dict(residual_var=-0.1), "residual_var"),
    (dict(basis_scale=2.0), "orthonormal"),
    (dict(mean_len=5), "basis must be"),
    (dict(eig_len=3), "eigvals must be"),
    (dict(nan=True), "NaN"),
])
def test_gaussian_model_rejects_bad_parameters(bad, match):
    D, r = 6, 2
    mean = torch.zeros(bad.get("mean_len", D))
    basis = torch.eye(D)[:, :r] * bad.get("basis_scale", 1.0)
    eig = torch.full((bad.get("eig_len", r),), bad.get("eigvals", 1.0))
    if bad.get("nan"):
        eig[0] = float("nan")
    with pytest.raises(ValueError, match=match):
        gk.GaussianModel(mean, basis, eig, bad.get("residual_var", 0.0))
    with pytest.raises(TypeError):
        gk.GaussianModel(torch.zeros(D, dtype=torch.int64), torch.eye(D)[:, :r], torch.ones(r))


def test_mixture_rejects_bad_parameters():
    with pytest.raises(ValueError, match="means must be"):
        gk.GaussianMixture(torch.zeros(0, 3), torch.zeros(0, 3, 0), torch.zeros(0, 0))
    with pytest.raises(ValueError, match="bases must be"):
        gk.GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 4, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="log_weights"):
        gk.GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 3, 0), torch.zeros(2, 0), 0.0, torch.tensor([float("nan"), 0.0]))


def test_save_load_roundtrip_and_to(tmp_path):
    g = random_gaussian(10, 3, 0.2)
    g.save(tmp_path / "g.safetensors")
    h = gk.GaussianModel.load(tmp_path / "g.safetensors")
    assert torch.equal(g.mean, h.mean) and torch.equal(g.basis, h.basis) and g.residual_var == h.residual_var
    m = random_mixture(3, 10, 2)
    m.save(tmp_path / "m.safetensors")
    n = gk.GaussianMixture.load(tmp_path / "m.safetensors")
    for name in ("means", "bases", "eigvals", "residual_var", "log_weights"):
        assert torch.allclose(getattr(m, name), getattr(n, name), atol=1e-15)
    g32 = g.to(dtype=torch.float32)
    assert g32.mean.dtype == torch.float32 and g32.basis.dtype == torch.float32 and g.mean.dtype == torch.float64
    assert m.to(dtype=torch.float32).log_weights.dtype == torch.float32


def test_model_methods_mirror_ops():
    g = random_gaussian(10, 3, 0.2)
    x = torch.randn(4, 10, dtype=torch.float64)
    assert torch.equal(g.denoise(x, 0.5), gk.gaussian_denoise(x, 0.5, g))
    assert torch.equal(g(x, 0.5), gk.gaussian_denoise(x, 0.5, g))
    assert torch.equal(g.flow(x, 2.0, 0.1), gk.gaussian_flow(x, 2.0, 0.1, g))
    m = random_mixture(3, 10, 2)
    assert torch.equal(m.score(x, 0.5), gk.mixture_score(x, 0.5, m))
    assert torch.equal(m.logp(x, 0.5), gk.mixture_logp(x, 0.5, m))
