"""Fake (meta) kernels of the kernel-level ops: output shapes and dtypes only, so torch.compile
can trace through the ops and opcheck can test them. Shared by the compiled extension's
gsa_kernels:: ops (registered by _extension.py) and the Triton interpreter ops."""
import torch


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind, basis_rows=None):
    return torch.empty_like(x)


def gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas, basis_rows=None):
    return x.new_empty((sigmas.shape[0], x.shape[0], x.shape[1]))


def mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights,
                      forward_panels=None, backward_panels=None):
    B, K = x.shape[0], means.shape[0]
    cd = _compute_dtype(x)
    denoised = x.new_empty((B, x.shape[1]) if need_denoised else (0,))
    weights = x.new_empty((B, K) if need_weights else (0,), dtype=cd)
    return denoised, x.new_empty((B,), dtype=cd), weights


FAKES = {"gaussian_map": gaussian_map, "gaussian_trajectory": gaussian_trajectory, "mixture_posterior": mixture_posterior}


def basis_rows(basis):
    return basis.new_empty((basis.shape[1], basis.shape[0]))


def mixture_panels(means, bases):
    n = means.shape[0] * (bases.shape[2] + 1) * means.shape[1]
    return means.new_empty((n,)), means.new_empty((n,))


# the layout ops (gsa_kernels/_layouts.py); content_hash has none: its result is data
LAYOUT_FAKES = {"basis_rows": basis_rows, "mixture_panels": mixture_panels}


def register_compiled_ops():
    """register_fake for gsa_kernels::<op> and the emulated gsa_kernels::cuda_emu_<op>."""
    for prefix in ("", "cuda_emu_"):
        for name, fake in FAKES.items():
            torch.library.register_fake(f"gsa_kernels::{prefix}{name}")(fake)
    for name, fake in LAYOUT_FAKES.items():
        torch.library.register_fake(f"gsa_kernels::{name}")(fake)
