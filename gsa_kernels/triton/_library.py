"""The Triton kernels as torch ops gsa_kernels_triton::{gaussian_map, gaussian_trajectory,
mixture_posterior, gaussian_map_labeled, gaussian_trajectory_labeled, local_posterior} (own namespace: never clashes with the compiled extension's gsa_kernels::).

Registration is picked per case (checked here, see tests/test_triton_backend.py):
- GPU: torch.library.triton_op, with every kernel launched through wrap_triton, so that
  torch.compile / Inductor sees the Triton kernels themselves (and can fuse around them).
  triton_op traces the Python launcher with fake tensors, so no register_fake is needed.
- TRITON_INTERPRET=1 (CPU tensors): an opaque torch.library.custom_op + register_fake. Under
  the interpreter, tracing a triton_op with fake tensors reaches the interpreter, which reads
  data pointers and fails; the opaque op compiles with fullgraph=True and passes opcheck.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _autograd
from .._contract import FAKES
from . import _config, gaussian, local, mixture

NAMESPACE = "gsa_kernels_triton"


def _gaussian_map(x: Tensor, mean: Tensor, basis: Tensor, eigvals: Tensor, residual_var: float, sigma_from: Tensor,
                  sigma_to: Tensor, scale_from: Tensor, scale_to: Tensor, kind: int) -> Tensor:
    return gaussian.gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind)


def _gaussian_trajectory(x: Tensor, mean: Tensor, basis: Tensor, eigvals: Tensor, residual_var: float,
                         sigmas: Tensor) -> Tensor:
    return gaussian.gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas)


def _mixture_posterior(x: Tensor, means: Tensor, bases: Tensor, eigvals: Tensor, residual_var: Tensor,
                       log_weights: Tensor, sigma: Tensor, need_denoised: bool,
                       need_weights: bool) -> tuple[Tensor, Tensor, Tensor]:
    return mixture.mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights)


def _gaussian_map_labeled(x: Tensor, labels: Tensor, means: Tensor, bases: Tensor, eigvals: Tensor,
                          residual_var: Tensor, sigma_from: Tensor, sigma_to: Tensor, scale_from: Tensor,
                          scale_to: Tensor, kind: int) -> Tensor:
    return gaussian.gaussian_map_labeled(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to,
                                         scale_from, scale_to, kind)


def _gaussian_trajectory_labeled(x: Tensor, labels: Tensor, means: Tensor, bases: Tensor, eigvals: Tensor,
                                 residual_var: Tensor, sigmas: Tensor) -> Tensor:
    return gaussian.gaussian_trajectory_labeled(x, labels, means, bases, eigvals, residual_var, sigmas)


def _local_posterior(x: Tensor, images: Tensor, sigma: Tensor, patch_size: int, mode: int, padding: int,
                     kind: int) -> Tensor:
    return local.local_posterior(x, images, sigma, patch_size, mode, padding, kind)


_OPS = (
    ("gaussian_map", _gaussian_map),
    ("gaussian_trajectory", _gaussian_trajectory),
    ("mixture_posterior", _mixture_posterior),
    ("gaussian_map_labeled", _gaussian_map_labeled),
    ("gaussian_trajectory_labeled", _gaussian_trajectory_labeled),
    ("local_posterior", _local_posterior),
)

for _name, _impl in _OPS:
    if _config.INTERPRET:
        _op = torch.library.custom_op(f"{NAMESPACE}::{_name}", _impl, mutates_args=())
        _op.register_fake(FAKES[_name])
    else:
        torch.library.triton_op(f"{NAMESPACE}::{_name}", _impl, mutates_args=())

_autograd.register(NAMESPACE)  # backward formulas (gsa_kernels/_autograd.py)
ops = getattr(torch.ops, NAMESPACE)
