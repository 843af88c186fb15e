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
