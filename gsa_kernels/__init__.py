"""gsa_kernels: fused kernels for Gaussian and Gaussian-mixture score fields of diffusion
models, their closed-form probability-flow ODE, and samplers with analytical teleportation."""
from . import _extension, distributed, reference, sampling, schedules  # noqa: F401  (_extension: loads the compiled ops when present)
from .models import GaussianMixture, GaussianModel
from .partial import MixturePartial, merge_partials, mixture_partial
from .ops import (
    available_backends,
    gaussian_denoise,
    gaussian_flow,
    gaussian_score,
    gaussian_trajectory,
    mixture_denoise,
    mixture_logp,
    mixture_score,
)

__version__ = "0.1.0"

__all__ = [
    "GaussianModel", "GaussianMixture", "available_backends", "gaussian_denoise", "gaussian_score",
    "gaussian_flow", "gaussian_trajectory", "mixture_denoise", "mixture_score", "mixture_logp",
    "reference", "schedules", "sampling", "MixturePartial", "mixture_partial", "merge_partials", "distributed",
]
