"""Triton backend: kernels for every op of the kernel-level contract (gsa_kernels/_backends.py).

    gaussian.py   fused spectral map (denoise / score / flow) and the trajectory, also labelled
    mixture.py    mixture posterior: flash-attention-style streaming over components
    local.py      local score machines (LS / ELS / BB-ELS): online softmax over training patches
    _library.py   registration as torch ops gsa_kernels_triton::*
    _config.py    interpreter detection, dot precision, autotune configs

CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 (tests). Inputs float16 / bfloat16 /
float32 are computed with float32 accumulation; float64 inputs are computed in float64 (tl.dot
on float64 operands: DMMA / FMA, exact) -- the kernels are generic in the compute dtype, so
float64 costs no extra code and "auto" on float64 CUDA tensors keeps working. GSA_KERNELS_TRITON_PRECISION=tf32x3|tf32 opts float32 dots into tensor cores.
Importing this package imports triton but not the kernels: the kernel modules are imported on
first use, so TRITON_INTERPRET is honoured if it is set before the first call.
"""
from __future__ import annotations

import os


def status():
    """(usable, reason) for the triton backend on this machine."""
    try:
        import triton
    except Exception as e:  # missing or broken install
        return False, f"triton not importable ({type(e).__name__}: {e})"
    import torch

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, f"Triton {triton.__version__} kernels through the interpreter (TRITON_INTERPRET=1, CPU tensors)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors through the interpreter)"
    return True, f"Triton {triton.__version__} kernels (gsa_kernels/triton)"


def _ops():
    from ._library import ops

    return ops


def gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind):
    """[B, D] -> [B, D] spectral map of `kind` (0 denoise, 1 score, 2 flow)."""
    return _ops().gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind)


def gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas):
    """x [B, D] at sigmas[0] -> [T, B, D] at every sigmas[t]."""
    return _ops().gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas)


def gaussian_map_labeled(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to,
                         kind):
    """gaussian_map with row b under component labels[b] of the stacked Gaussians."""
    return _ops().gaussian_map_labeled(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to, scale_from,
                                       scale_to, kind)


def gaussian_trajectory_labeled(x, labels, means, bases, eigvals, residual_var, sigmas):
    """gaussian_trajectory with row b under component labels[b]."""
    return _ops().gaussian_trajectory_labeled(x, labels, means, bases, eigvals, residual_var, sigmas)


def mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights):
    """(denoised [B, D] or [0], logp [B], weights [B, K] or [0]) of the mixture posterior."""
    return _ops().mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights)


def local_posterior(x, images, sigma, patch_size, mode, padding, kind):
    """[B, C, H, W] -> [B, C, H, W]: the local score machine's denoiser or score (_contract.py)."""
    return _ops().local_posterior(x, images, sigma, patch_size, mode, padding, kind)
