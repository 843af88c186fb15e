"""Adapters that hand a teleported latent to other libraries' samplers (optional extras).

    gsa_kernels.integrations.k_diffusion   needs `pip install k-diffusion` (and setuptools<81)
    gsa_kernels.integrations.diffusers     needs `pip install diffusers`

Import the submodule you need; this package itself imports neither library.
"""
from ..sampling import HybridDenoiser  # noqa: F401  (a k-diffusion-compatible model wrapper)
