"""gsa_kernels: fused kernels for Gaussian and Gaussian-mixture score fields of diffusion
models, their closed-form probability-flow ODE, and samplers with analytical teleportation."""
import sys

__version__ = "0.1.0"

SUBMODULES = ("reference", "schedules", "sampling", "distributed")  # public modules, besides the names below


def _load():
    """Import torch, the compiled ops (_extension) and the public API into this namespace: the
    names in the __all__ of ops, models, local and partial (a new public function is listed in
    its own module only)."""
    from . import distributed, local, models, ops, reference, sampling, schedules  # noqa: F401
    from ._core import _extension  # noqa: F401
    from ._scaleout import partial

    names = list(SUBMODULES)
    for module in (models, ops, partial, local):
        globals().update({name: getattr(module, name) for name in module.__all__})
        names += module.__all__
    globals()["__all__"] = names


# `python -m gsa_kernels ...` parses its command line before torch is imported (--help in well
# under a second): while Python locates a -m target, sys.argv[0] is "-m", and then the API loads
# on first use (PEP 562). Every other import loads it at once, compiled ops included.
if getattr(sys, "argv", [None])[:1] == ["-m"]:
    def __getattr__(name):
        import importlib.util

        if name.startswith("__") and name != "__all__":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        if name != "__all__" and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")  # `from . import ops` asks here first
        _load()
        if name not in globals():
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return globals()[name]
else:
    _load()
