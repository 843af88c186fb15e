"""Fake (meta) kernels of the compiled ops: output shapes and dtypes only, so torch.compile
can trace through the ops and opcheck can test them."""
import torch


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind):
    return torch.empty_like(x)


def _gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas):
    return x.new_empty((sigmas.shape[0], x.shape[0], x.shape[1]))


def _mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights):
    B, K = x.shape[0], means.shape[0]
    cd = _compute_dtype(x)
    denoised = x.new_empty((B, x.shape[1]) if need_denoised else (0,))
    weights = x.new_empty((B, K) if need_weights else (0,), dtype=cd)
    return denoised, x.new_empty((B,), dtype=cd), weights


for _prefix in ("", "cuda_emu_"):
    torch.library.register_fake(f"gsa_kernels::{_prefix}gaussian_map")(_gaussian_map)
    torch.library.register_fake(f"gsa_kernels::{_prefix}gaussian_trajectory")(_gaussian_trajectory)
    torch.library.register_fake(f"gsa_kernels::{_prefix}mixture_posterior")(_mixture_posterior)
