"""gsa_kernels: fused kernels for Gaussian and Gaussian-mixture score fields of diffusion
models, their closed-form probability-flow ODE, and samplers with analytical teleportation."""
import importlib
import sys

__version__ = "0.1.0"

__all__ = [
    "GaussianModel", "GaussianMixture", "available_backends", "gaussian_denoise", "gaussian_score",
    "gaussian_flow", "gaussian_trajectory", "mixture_denoise", "mixture_score", "mixture_logp",
    "reference", "schedules", "sampling", "MixturePartial", "mixture_partial", "merge_partials", "distributed",
    "LocalScoreMachine", "local_denoise", "local_score",
]
_OPS = ["available_backends", "gaussian_denoise", "gaussian_score", "gaussian_flow", "gaussian_trajectory",
        "mixture_denoise", "mixture_score", "mixture_logp"]


def _load():
    """Import torch, the compiled ops (_extension) and the public API into this namespace."""
    from . import distributed, local, models, ops, reference, sampling, schedules  # noqa: F401
    from ._core import _extension  # noqa: F401
    from ._scaleout import partial

    globals().update({name: getattr(ops, name) for name in _OPS},
                     GaussianModel=models.GaussianModel, GaussianMixture=models.GaussianMixture,
                     MixturePartial=partial.MixturePartial, mixture_partial=partial.mixture_partial,
                     merge_partials=partial.merge_partials)
    globals().update(LocalScoreMachine=local.LocalScoreMachine, local_denoise=local.local_denoise,
                     local_score=local.local_score)  # issue 27 (gsa_kernels/local.py)


# `python -m gsa_kernels ...` parses its command line before torch is imported (--help in well
# under a second): while Python locates a -m target, sys.argv[0] is "-m", and then the API loads
# on first use (PEP 562). Every other import loads it at once, compiled ops included.
if getattr(sys, "argv", [None])[:1] == ["-m"]:
    def __getattr__(name):
        if name in ("reference", "schedules", "sampling", "distributed"):  # `from . import reference` asks here first
            return importlib.import_module(f"{__name__}.{name}")
        if name not in __all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        _load()
        return globals()[name]
else:
    _load()
