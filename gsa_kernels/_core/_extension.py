"""Loads the optional compiled extension gsa_kernels._C. Importing the package never fails:
when the extension is missing, `error` says why and the compiled backends are unavailable.
An extension that is there but does not load (typically: built against another torch, whose
C++ ABI it needs) warns once, naming the torch it was built for (_build_info.json, written by
setup.py's build_ext) and the torch found, and how to rebuild."""
import glob
import json
import os
import warnings

import torch

from . import _contract

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # gsa_kernels/: _C*.so, _build_info.json

REBUILD = ("pip install --no-build-isolation --force-reinstall gsa_kernels (from its source), "
           "or in a clone: python setup.py build_ext --inplace (or bash scripts/install.sh)")


def build_info():
    """{"torch": version, "variant": "cu130" | "cpu" | ..., "cuda": ...} of the build here, or None."""
    try:
        with open(os.path.join(PACKAGE_DIR, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def mismatch(info, found=None):
    """A sentence when the build's torch differs from the torch found, else None."""
    found = torch.__version__ if found is None else found
    if info is None or info.get("torch") == found:
        return None
    return f"gsa_kernels' compiled extension was built for torch {info.get('torch')}, but torch {found} is installed"


error = None
try:
    from .. import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)

    loaded = True
except Exception as e:  # ImportError, or an undefined symbol from a torch version mismatch
    loaded = False
    error = f"{type(e).__name__}: {e}"
    if glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")) or glob.glob(
            os.path.join(PACKAGE_DIR, "_C*.pyd")):  # there, but it does not load
        why = mismatch(build_info()) or "the compiled extension does not load"
        error = f"{why} ({error}); rebuild it: {REBUILD}"
        warnings.warn(f"{error}. The compiled backends are off: every op runs on the reference or Triton backend.",
                      RuntimeWarning, stacklevel=2)

if loaded:  # a stale build (older than the contract) would fail below: the backends say why instead
    # the emulated cuda_emu_* ops are always built too: a build that lacks one is just as stale
    missing = [prefix + op for op in _contract.OPS for prefix in ("", "cuda_emu_")
               if not torch._C._dispatch_has_kernel(f"gsa_kernels::{prefix}{op}")]
    if missing:
        loaded = False
        error = (f"the compiled extension is older than the sources (no gsa_kernels::{missing[0]}): rebuild it "
                 "(python setup.py build_ext --inplace, or bash scripts/install.sh)")

if loaded:  # fakes (torch.compile, opcheck) and backward rules of the compiled and the emulated cuda_emu_* ops
    _contract.register("gsa_kernels", layouts=True, fused_mixture_backward=True)
    _contract.register("gsa_kernels", prefix="cuda_emu_")


@torch.compiler.assume_constant_result  # registrations do not change: no graph break under torch.compile
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether gsa_kernels::<op> has an implementation for a dispatch key ("CPU", "CUDA")."""
    return loaded and torch._C._dispatch_has_kernel_for_dispatch_key(f"gsa_kernels::{op}", dispatch_key)
