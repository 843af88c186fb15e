"""Loads the optional compiled extension gsa_kernels._C. Importing the package never fails:
when the extension is missing, `error` says why and the compiled backends are unavailable."""
import torch

error = None
try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)

    loaded = True
except Exception as e:  # ImportError, or an undefined symbol from a torch version mismatch
    loaded = False
    error = f"{type(e).__name__}: {e}"

if loaded:  # fake / meta kernels for torch.compile and opcheck, also of the emulated cuda_emu_* ops
    from . import _contract

    _contract.register_fakes("gsa_kernels", layouts=True)  # fake / meta kernels for torch.compile and opcheck
    _contract.register_fakes("gsa_kernels", prefix="cuda_emu_")
    from . import _autograd

    _autograd.register("gsa_kernels", fused_mixture_backward=True)  # backward formulas (gsa_kernels/_autograd.py)
    _autograd.register("gsa_kernels", prefix="cuda_emu_")


@torch.compiler.assume_constant_result  # registrations do not change: no graph break under torch.compile
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether gsa_kernels::<op> has an implementation for a dispatch key ("CPU", "CUDA")."""
    return loaded and torch._C._dispatch_has_kernel_for_dispatch_key(f"gsa_kernels::{op}", dispatch_key)
