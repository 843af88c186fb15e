"""Shared builders for tests: random models with known structure, in float64 unless asked."""

import torch

import gsa_kernels as gk


def random_gaussian(D, r, residual_var=0.3, dtype=torch.float64, seed=0, spread=3.0):
    """A GaussianModel with a random orthonormal basis and eigenvalues spread over decades."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, max(r, 1), dtype=torch.float64, generator=g))[0][:, :r]
    eigvals = torch.exp(spread * torch.rand(r, dtype=torch.float64, generator=g) - 1.5)
    mean = torch.randn(D, dtype=torch.float64, generator=g)
    return gk.GaussianModel(mean.to(dtype), basis.to(dtype), eigvals.to(dtype), residual_var)


def random_mixture(K, D, r, residual_var=0.2, dtype=torch.float64, seed=0, sep=3.0):
    g = torch.Generator().manual_seed(seed)
    means = sep * torch.randn(K, D, dtype=torch.float64, generator=g)
    bases = torch.stack([torch.linalg.qr(torch.randn(D, max(r, 1), dtype=torch.float64, generator=g))[0][:, :r] for _ in range(K)])
    eigvals = torch.exp(2 * torch.rand(K, r, dtype=torch.float64, generator=g) - 1)
    residual_vars = residual_var * (0.5 + torch.rand(K, dtype=torch.float64, generator=g))
    log_weights = torch.randn(K, dtype=torch.float64, generator=g)
    return gk.GaussianMixture(means.to(dtype), bases.to(dtype), eigvals.to(dtype), residual_vars.to(dtype), log_weights.to(dtype))


def dense_covariance(g):
    """Sigma = U diag(lam) U^T + residual_var (I - U U^T) as a dense [D, D] float64 matrix."""
    U = g.basis.double()
    P = torch.eye(g.dim, dtype=torch.float64) - U @ U.T
    return U @ torch.diag(g.eigvals.double()) @ U.T + g.residual_var * P


def dense_covariances(m):
    out = []
    for k in range(m.num_components):
        U = m.bases[k].double()
        P = torch.eye(m.dim, dtype=torch.float64) - U @ U.T
        out.append(U @ torch.diag(m.eigvals[k].double()) @ U.T + m.residual_var[k].double() * P)
    return torch.stack(out)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


SIGMAS = [0.002, 0.05, 1.0, 80.0]
