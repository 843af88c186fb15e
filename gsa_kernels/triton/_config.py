"""Settings shared by the Triton kernels: interpreter detection, dot precision, autotune configs.

Read at import time of the kernel modules (gaussian.py, mixture.py): Triton decides between
compiled and interpreted kernels when a function is decorated with @triton.jit, so
TRITON_INTERPRET must be set before those modules are imported.
"""
from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Dot precision for float32 operands. Default "split3": three TF32 tensor-core dots on an explicit
# hi/lo split of each operand (gsa_kernels/triton/_dot.py), about float32 accuracy. Opt-outs:
# GSA_KERNELS_TRITON_PRECISION=ieee (exact float32 products on the FMA units, slower) or =tf32
# (one TF32 dot, 10-bit mantissa products: fast, inaccurate at small sigma where the spectral map
# cancels two terms of size 1/sigma^2); =tf32x3 is Triton's own 3xTF32 (not verifiable under the
# interpreter, which ignores input_precision).
_PRECISIONS = ("split3", "ieee", "tf32x3", "tf32")


def dot_precision(compute_dtype: torch.dtype) -> str:
    """PRECISION of every dot for this call. float64 dots are always exact ("ieee")."""
    p = os.environ.get("GSA_KERNELS_TRITON_PRECISION", "split3")
    if p not in _PRECISIONS:
        raise ValueError(f"GSA_KERNELS_TRITON_PRECISION must be one of {_PRECISIONS}, got {p!r}")
    return "ieee" if compute_dtype == torch.float64 else p


def configs(gpu_configs, interpreter_config):
    """Autotune configs: the Ampere/Hopper list on GPU; one small config in the interpreter
    (CI speed; its small blocks also make the tests cross tile edges at small shapes)."""
    if INTERPRET:
        return [triton.Config(interpreter_config, num_warps=4, num_stages=1)]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in gpu_configs]


def target_programs(device: torch.device) -> int:
    """How many programs keep the device busy (split-K over components when B is small)."""
    if device.type == "cuda" and torch.cuda.is_available():  # (fake CUDA tensors: no device)
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: enough to exercise the split path in tests


def launch(kernel):
    """Kernels are launched through wrap_triton on GPU so that torch.compile (triton_op) sees
    them; the interpreter path calls them directly (wrap_triton needs compiled kernels)."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)
