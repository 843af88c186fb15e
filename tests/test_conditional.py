"""Class-conditional Gaussians outside the kernels: GaussianMixture.fit_per_class (against one
GaussianModel.fit per class), and the samplers' labels (teleport, sample, HybridDenoiser) against
the same computation done class by class with GaussianModels. float64, small D: the tolerances
are float64 rounding (the kernels' labels themselves: tests/conformance)."""
import math

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import sampling, schedules

F64 = torch.float64


def labelled_data(counts=(40, 25, 60), D=12, seed=0, dtype=F64):
    """Rows of class k drawn around mean 5 k with a class-specific covariance, interleaved."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for k, n in enumerate(counts):
        A = torch.randn(D, D, dtype=F64, generator=g) * (0.3 + 0.4 * k)
        xs.append(5.0 * k + torch.randn(n, D, dtype=F64, generator=g) @ A)
        ys.append(torch.full((n,), k, dtype=torch.int64))
    perm = torch.randperm(sum(counts), generator=g)
    return torch.cat(xs)[perm].to(dtype), torch.cat(ys)[perm]


def covariance(mean, basis, eigvals, residual_var):
    D = mean.shape[0]
    return basis @ torch.diag(eigvals) @ basis.T + residual_var * (torch.eye(D, dtype=basis.dtype) - basis @ basis.T)


def component(m, k):
    return gk.GaussianModel(m.means[k], m.bases[k], m.eigvals[k], float(m.residual_var[k]))


def assert_same_gaussian(a, b, tol=1e-9):
    """Same mean and covariance (eigenvectors are defined up to sign, padded bases differ)."""
    assert torch.allclose(a.mean, b.mean, rtol=0, atol=tol)
    ca, cb = covariance(a.mean, a.basis, a.eigvals, a.residual_var), covariance(b.mean, b.basis, b.eigvals, b.residual_var)
    assert torch.allclose(ca, cb, rtol=0, atol=tol * cb.abs().max().item())


# ----------------------------------------------------------------------------- fit_per_class


@pytest.mark.parametrize("kw", [dict(rank=4), dict(), dict(energy=0.8)])
def test_fit_per_class_is_one_fit_per_class(kw):
    x, y = labelled_data()
    m = gk.GaussianMixture.fit_per_class(x, y, **kw)
    assert m.num_components == 3 and m.dtype == F64
    for k in range(3):
        separate = gk.GaussianModel.fit(x[y == k], **kw)
        c = component(m, k)
        # the same float64 moments and eigh: rounding only (means ~10, covariances ~10)
        assert_same_gaussian(c, separate)
        assert torch.allclose(c.eigvals[:separate.rank], separate.eigvals, rtol=1e-10, atol=1e-12)
        assert torch.allclose(c.basis[:, :separate.rank].abs(), separate.basis.abs(), atol=1e-8)
        assert m.residual_var[k].item() == pytest.approx(separate.residual_var, rel=1e-10, abs=1e-14)
    torch.testing.assert_close(m.log_weights, torch.tensor([40, 25, 60], dtype=F64).div(125).log(), rtol=0, atol=1e-14)


def test_fit_per_class_pads_to_a_common_rank_without_changing_a_covariance():
    x, y = labelled_data(counts=(40, 6, 60))  # class 1: 6 rows, at most 5 directions with variance
    m = gk.GaussianMixture.fit_per_class(x, y, energy=0.95)
    ranks = [gk.GaussianModel.fit(x[y == k], energy=0.95).rank for k in range(3)]
    assert m.rank == max(ranks) and min(ranks) < m.rank  # some class was padded
    for k in range(3):
        assert_same_gaussian(component(m, k), gk.GaussianModel.fit(x[y == k], energy=0.95))
    U = m.bases
    torch.testing.assert_close(U.transpose(1, 2) @ U, torch.eye(m.rank, dtype=F64).expand(3, -1, -1), rtol=0, atol=1e-12)


def test_fit_per_class_streams_pairs_identically():
    x, y = labelled_data()
    one = gk.GaussianMixture.fit_per_class(x, y, rank=4)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, x.shape[0], 16)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=23)  # yields [x, y] lists
    for data in (batches, lambda: iter(batches), (b for b in batches), loader):
        streamed = gk.GaussianMixture.fit_per_class(data, rank=4)
        torch.testing.assert_close(streamed.log_weights, one.log_weights, rtol=0, atol=1e-14)
        for k in range(3):
            assert_same_gaussian(component(streamed, k), component(one, k))


def test_fit_per_class_images_integers_and_num_classes():
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 255, (60, 1, 3, 3), dtype=torch.uint8, generator=g)
    y = torch.arange(60) % 4
    m = gk.GaussianMixture.fit_per_class(imgs, y.int(), rank=2)  # int32 labels are class indices too
    assert (m.num_components, m.dim, m.rank, m.dtype) == (4, 9, 2, torch.float32)
    torch.testing.assert_close(m.means[3].double(), imgs[y == 3].double().reshape(15, 9).mean(0), rtol=1e-6, atol=1e-4)
    assert gk.GaussianMixture.fit_per_class(imgs, y, rank=2, num_classes=4).num_components == 4


def test_fit_per_class_errors():
    x, y = labelled_data()
    fit = gk.GaussianMixture.fit_per_class
    with pytest.raises(ValueError, match=r"classes \[1\] have \[0\]"):  # an absent class
        fit(x[y != 1], torch.where(y[y != 1] == 2, 2, 0))
    with pytest.raises(ValueError, match=r"classes \[3, 4\] have \[0, 0\]"):
        fit(x, y, num_classes=5)
    with pytest.raises(ValueError, match=r"classes \[0\] have \[1\]"):  # one row: no covariance
        fit(x[:21], torch.cat([torch.zeros(1, dtype=torch.long), torch.ones(20, dtype=torch.long)]))
    with pytest.raises(ValueError, match="num_classes = 2"):
        fit(x, y, num_classes=2)
    with pytest.raises(ValueError, match=">= 0"):
        fit(x, y - 1)
    with pytest.raises(TypeError, match="integer class indices"):
        fit(x, y.double())
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        fit(x, y[:-1])
    with pytest.raises(TypeError, match="give labels"):
        fit(x)
    with pytest.raises(TypeError, match="labels must be None"):
        fit([(x, y)], y)
    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        fit([x])
    with pytest.raises(ValueError, match="rank or energy"):
        fit(x, y, rank=2, energy=0.5)
    with pytest.raises(ValueError, match="NaN"):
        fit(torch.full_like(x, math.nan), y)


def test_fit_per_class_randomized_is_the_randomized_fit_of_each_class():
    """method='randomized' sketches every class in the same passes: class k is exactly
    fitting.fit_randomized of its rows with test matrix seed k; streamed data gives the same
    model; on data of rank <= 3 per class plus small noise it matches the exact fit."""
    from gsa_kernels import fitting

    x, y = labelled_data(counts=(50, 40, 70), D=20)
    m = gk.GaussianMixture.fit_per_class(x, y, rank=3, method="randomized")
    assert (m.num_components, m.rank) == (3, 3)
    for k in range(3):
        assert_same_gaussian(component(m, k), fitting.fit_randomized(x[y == k], 3, seed=k), tol=1e-11)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, x.shape[0], 16)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=23)
    for data in (batches, lambda: iter(batches), loader):
        streamed = gk.GaussianMixture.fit_per_class(data, rank=3, method="randomized")
        torch.testing.assert_close(streamed.log_weights, m.log_weights, rtol=0, atol=1e-14)
        for k in range(3):
            assert_same_gaussian(component(streamed, k), component(m, k), tol=1e-9)
    g = torch.Generator().manual_seed(4)  # rank-3 classes + 1e-3 noise: the sketch captures them
    low = torch.cat([5.0 * k + torch.randn(n, 3, dtype=F64, generator=g) @ torch.randn(3, 20, dtype=F64, generator=g)
                     for k, n in enumerate((50, 40, 70))]) + 1e-3 * torch.randn(160, 20, dtype=F64, generator=g)
    ylow = torch.repeat_interleave(torch.arange(3), torch.tensor([50, 40, 70]))
    fast, exact = (gk.GaussianMixture.fit_per_class(low, ylow, rank=3, method=how) for how in ("randomized", "exact"))
    for k in range(3):
        assert_same_gaussian(component(fast, k), component(exact, k), tol=1e-8)


def test_fit_per_class_auto_turns_randomized_over_the_budget(monkeypatch):
    from gsa_kernels import fitting

    x, y = labelled_data(D=20)
    monkeypatch.setattr(fitting, "EXACT_FIT_BUDGET_BYTES", 2 * 8 * 20 * 20)  # two classes' D x D, not three
    auto = gk.GaussianMixture.fit_per_class(x, y, rank=3)
    randomized = gk.GaussianMixture.fit_per_class(x, y, rank=3, method="randomized")
    for k in range(3):
        assert_same_gaussian(component(auto, k), component(randomized, k), tol=1e-12)
    with pytest.raises(ValueError, match="over the .* budget: give rank=r"):  # energy: no randomized fit
        gk.GaussianMixture.fit_per_class(x, y, energy=0.9)
    with pytest.raises(ValueError, match="over the .* budget"):
        gk.GaussianMixture.fit_per_class(x, y, rank=3, method="exact")
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, x.shape[0], 16)]
    with pytest.raises(ValueError, match="over the .* budget"):  # a one-shot stream cannot be read again
        gk.GaussianMixture.fit_per_class((b for b in batches), rank=3)
    # a one-shot stream with method='randomized': every class in one pass (fitting.fit_one_pass_per_class);
    # its sketch (3 r + 16 rows) spans D = 20 here, so nothing is discarded: the exact fit
    one_pass = gk.GaussianMixture.fit_per_class((b for b in batches), rank=3, method="randomized")
    torch.testing.assert_close(one_pass.log_weights, auto.log_weights, rtol=0, atol=1e-14)
    for k in range(3):
        assert_same_gaussian(component(one_pass, k), gk.GaussianModel.fit(x[y == k], rank=3, method="exact"), tol=1e-9)
    with pytest.raises(ValueError, match="needs rank"):
        gk.GaussianMixture.fit_per_class(x, y, energy=0.9, method="randomized")
    with pytest.raises(ValueError, match="method must be"):
        gk.GaussianMixture.fit_per_class(x, y, rank=3, method="fast")
    calls = iter(range(10))
    with pytest.raises(ValueError, match="changed between passes"):  # a pass that drops rows
        gk.GaussianMixture.fit_per_class(lambda: iter(batches[: len(batches) - next(calls)]), rank=3, method="randomized")


# ----------------------------------------------------------------------------- sampling with labels


@pytest.fixture(scope="module")
def per_class():
    x, y = labelled_data(counts=(40, 30, 50), D=12, seed=3)
    return gk.GaussianMixture.fit_per_class(x, y, rank=3)


def by_class(m, labels, fn):
    """fn(GaussianModel of class k, its row indices) put together row by row: the computation
    class by class, without labels."""
    out = None
    for k in labels.unique().tolist():
        rows = (labels == k).nonzero()[:, 0]
        v = fn(component(m, k), rows)
        if out is None:
            out = v.new_empty((labels.shape[0],) + v.shape[1:])
        out[rows] = v
    return out


LABELS = torch.tensor([2, 0, 0, 1, 2, 2, 1])


@pytest.mark.parametrize("s_from,s_to,scale_from,scale_to", [(80.0, 5.0, 1.0, 1.0), (math.inf, 2.0, 1.0, 0.5),
                                                             (10.0, 0.0, 0.8, 1.0)])
def test_teleport_with_labels_is_per_row_class_teleport(per_class, s_from, s_to, scale_from, scale_to):
    x = torch.randn(7, 3, 4, dtype=F64)
    out = sampling.teleport(x, s_from, s_to, per_class, scale_from, scale_to, labels=LABELS)
    want = by_class(per_class, LABELS, lambda g, rows: sampling.teleport(x[rows], s_from, s_to, g, scale_from, scale_to))
    assert out.shape == x.shape
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    # the classes differ: the same rows with other labels land elsewhere
    assert (sampling.teleport(x, s_from, s_to, per_class, scale_from, scale_to, labels=(LABELS + 1) % 3) - out).abs().max() > 1


def test_teleport_labels_type_errors(per_class):
    x = torch.randn(7, 12, dtype=F64)
    with pytest.raises(TypeError, match="GaussianMixture with one component per class"):
        sampling.teleport(x, 80.0, 5.0, component(per_class, 0), labels=LABELS)
    with pytest.raises(TypeError, match="labels="):
        sampling.teleport(x, 80.0, 5.0, per_class)


class Recorder:
    """A conditional denoiser (the class Gaussians' exact one) that records the labels it gets."""

    def __init__(self, m):
        self.m, self.seen = m, []

    def __call__(self, x, sigma, labels):
        self.seen.append(labels)
        return gk.gaussian_denoise(x, sigma, self.m, labels=labels)


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
def test_sample_passes_labels_and_teleports_per_class(per_class, method):
    sigmas = schedules.karras(10)
    x = 80.0 * torch.randn(7, 12, dtype=F64)
    den = Recorder(per_class)
    res = sampling.sample(den, x, sigmas, method, skip_fraction=0.3, gaussian=per_class, labels=LABELS)
    assert res.nfe == len(den.seen) == sampling.expected_nfe(method, sigmas[3:]) and res.teleport == (80.0, float(sigmas[3]))
    assert all(seen is LABELS for seen in den.seen)
    # class by class with GaussianModels and no labels anywhere
    want = by_class(per_class, LABELS, lambda g, rows: sampling.sample(g, x[rows], sigmas, method, skip_fraction=0.3).x)
    torch.testing.assert_close(res.x, want, rtol=1e-10, atol=1e-10)
    # the per-class mixture as the denoiser itself: m(x, sigma, labels=y) is its class-conditional denoiser
    torch.testing.assert_close(sampling.sample(per_class, x, sigmas, method, skip_fraction=0.3, labels=LABELS).x, want,
                               rtol=1e-10, atol=1e-10)


def test_sample_labels_with_one_gaussian_for_every_class(per_class):
    sigmas = schedules.karras(8)
    x = 80.0 * torch.randn(7, 12, dtype=F64)
    g = component(per_class, 1)
    den = Recorder(per_class)
    res = sampling.sample(den, x, sigmas, "euler", skip_fraction=0.25, gaussian=g, labels=LABELS)
    assert all(seen is LABELS for seen in den.seen)  # the network still gets its labels
    start = sampling.teleport(x, 80.0, float(sigmas[2]), g)
    torch.testing.assert_close(res.x, sampling.euler(lambda x, s: den(x, s, labels=LABELS), start, sigmas[2:]))
    with pytest.raises(ValueError, match="needs gaussian="):
        sampling.sample(den, x, sigmas, "euler", skip_fraction=0.25, labels=LABELS)


def test_hybrid_denoiser_labels_key(per_class):
    calls = []

    def network(x, sigma, class_labels):
        calls.append(class_labels.shape[0])
        return gk.gaussian_denoise(x, sigma, per_class, labels=class_labels)

    hybrid = sampling.HybridDenoiser(network, per_class, sigma_threshold=2.0, labels_key="class_labels")
    x = torch.randn(7, 12, dtype=F64)
    sigma = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 0.1, 2.5], dtype=F64)  # rows on both sides of the threshold
    out = hybrid(x, sigma, class_labels=LABELS)
    want = by_class(per_class, LABELS, lambda g, rows: g.denoise(x[rows], sigma[rows]))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert calls == [7] and hybrid.analytic_calls == 1
    # every row above the threshold: the class Gaussians alone
    torch.testing.assert_close(hybrid(x, 50.0, class_labels=LABELS),
                               by_class(per_class, LABELS, lambda g, rows: g.denoise(x[rows], 50.0)), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="class_labels="):
        hybrid(x, 50.0)
    with pytest.raises(TypeError, match="labels_key needs"):
        sampling.HybridDenoiser(network, component(per_class, 0), 2.0, labels_key="class_labels")
