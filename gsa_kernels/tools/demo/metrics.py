"""Frechet distance between two sample sets (Gaussian fits), in the classifier's feature space
("FID" for MNIST) and in pixel space:

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))

tr (S_a S_b)^(1/2) = sum_i sqrt(eig_i(S_a^(1/2) S_b S_a^(1/2))) -- two symmetric eigendecompositions
in float64, no non-symmetric matrix square root (the scipy.linalg.sqrtm formula of the FID code
gives the same number; tests compare them)."""
import torch


def _mean_cov(x):
    x = x.reshape(x.shape[0], -1).double()
    if x.shape[0] < 2:
        raise ValueError(f"a Frechet distance needs at least 2 samples per set, got {x.shape[0]}")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(s):
    evals, evecs = torch.linalg.eigh(s)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """FD between N(mu_a, cov_a) and N(mu_b, cov_b); mu [D], cov [D, D]."""
    mu_a, cov_a, mu_b, cov_b = (t.double() for t in (mu_a, cov_a, mu_b, cov_b))
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def frechet_distance(a, b) -> float:
    """FD between the Gaussian fits of two sample sets a [N, ...] and b [M, ...] (same D)."""
    return frechet_distance_from_stats(*_mean_cov(a), *_mean_cov(b))


@torch.no_grad()
def classifier_features(classifier, x, batch_size=500):
    """Penultimate-layer features [N, 128] of images x [N, 1, 28, 28] (or [N, 784])."""
    return torch.cat([classifier.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def bootstrap_fd(sets, reference, resamples, seed=0):
    """Frechet distances of resampled sets to a fixed reference: {name: [resamples] float64}.
    sets: {name: [N, D]}, all with the same N; every resample draws ONE index set (with
    replacement) used for every set: paired, as the demo's settings share their initial noise
    (row i of every setting comes from noise i), so the spread of a difference between settings
    is that of the difference, not of two independent FDs. The reference (held-out digits) is
    not resampled: the uncertainty is that of the generated samples only."""
    mu_r, cov_r = _mean_cov(reference)
    root_r = _sqrt_psd(cov_r)  # eig(R S R) with R = S_r^(1/2): the same cross term as the formula above
    n = next(iter(sets.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    out = {name: torch.empty(resamples, dtype=torch.float64) for name in sets}
    for b in range(resamples):
        idx = torch.randint(0, n, (n,), generator=gen)
        for name, x in sets.items():
            mu, cov = _mean_cov(x[idx])
            cross = torch.linalg.eigvalsh(root_r @ cov @ root_r).clamp_min(0).sqrt().sum()
            out[name][b] = ((mu - mu_r).pow(2).sum() + cov.trace() + cov_r.trace() - 2 * cross).item()
    return out
