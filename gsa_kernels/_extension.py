"""Loads the optional compiled extension gsa_kernels._C. Importing the package never fails:
when the extension is missing, `error` says why and the compiled backends are unavailable."""
import torch

from . import _contract

error = None
try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)

    loaded = True
except Exception as e:  # ImportError, or an undefined symbol from a torch version mismatch
    loaded = False
    error = f"{type(e).__name__}: {e}"

if loaded:  # a stale build (older than the contract) would fail below: the backends say why instead
    missing = [op for op in _contract.OPS if not torch._C._dispatch_has_kernel(f"gsa_kernels::{op}")]
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
