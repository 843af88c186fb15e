"""Triton backend: kernels for every op of the kernel-level contract (gsa_kernels/_core/_backends.py).

    gaussian.py   fused spectral map (denoise / score / flow) and the trajectory, also labelled
    mixture.py    mixture posterior: flash-attention-style streaming over components
    local.py      local score machines (LS / ELS / BB-ELS): online softmax over training patches
    _library.py   registration as torch ops gsa_kernels_triton::* (schemas from gsa_kernels/_core/_contract.py)
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
        import triton  # here, not at import of the package: a missing triton is a status, not an error
    except Exception as e:  # missing or broken install
        return False, f"triton not importable ({type(e).__name__}: {e})"
    import torch

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, f"Triton {triton.__version__} kernels through the interpreter (TRITON_INTERPRET=1, CPU tensors)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors through the interpreter)"
    return True, f"Triton {triton.__version__} kernels (gsa_kernels/triton)"


def ops():
    """torch.ops.gsa_kernels_triton: every op of the registry (gsa_kernels/_core/_contract.py),
    registered on first use (_library.py imports the kernel modules)."""
    from ._library import ops as registered  # lazily: the kernel modules read TRITON_INTERPRET at import

    return registered
