"""The table of backends behind the public ops. Each row says how to call each kernel-level op of
the contract (_contract.py: op names and argument order), which tensors' devices it takes,
whether it is usable here and why not, and its "auto" priority per device type. ops.py calls
resolve() once per op call; backends never call each other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import reference
from . import _extension


@dataclass(frozen=True)
class Backend:
    name: str
    kernel: Callable[[str, str], Callable]  # (op, device type) -> the op in kernel argument order
    devices: Optional[Callable[[], dict]]  # {device type: (accepted, reason if not)} now; None: every device
    status: Callable[[], tuple]  # (usable here, reason)
    auto: dict  # {device type: priority}: "auto" takes the highest usable; absent = never


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_emulation_requested():
    return os.environ.get("GSA_KERNELS_CUDA_EMULATE", "0") == "1"


# ----------------------------------------------------------------------------- reference


def _reference_status():
    return True, "pure PyTorch (gsa_kernels/reference.py)"


REFERENCE = Backend(
    name="reference",
    kernel=lambda op, device_type: getattr(reference, op),
    devices=None,
    status=_reference_status,
    auto={"cpu": 0, "cuda": 0},
)


# ----------------------------------------------------------------------------- cpu: csrc/cpu


def _cpu_status():
    if not _extension.loaded:
        return False, f"compiled extension not loaded ({_extension.error})"
    if not _extension.has_kernel("gaussian_map", "CPU"):
        return False, "extension has no CPU kernels"
    return True, "C++ kernels (csrc/cpu)"


CPU = Backend(
    name="cpu",
    kernel=lambda op, device_type: getattr(torch.ops.gsa_kernels, op),
    devices=lambda: {"cpu": (True, "")},
    status=_cpu_status,
    auto={"cpu": 10},
)


# ----------------------------------------------------------------------------- triton: gsa_kernels/triton


def _triton_module():
    from .. import triton as triton_backend  # lazily: importing triton is slow

    return triton_backend


def _triton_status():
    try:
        return _triton_module().status()
    except Exception as e:  # triton missing or broken
        return False, f"{type(e).__name__}: {e}"


TRITON = Backend(
    name="triton",
    kernel=lambda op, device_type: getattr(_triton_module().ops(), op),
    devices=lambda: {"cuda": (True, ""),
                     "cpu": (_interpreting(), "the triton backend takes CPU tensors only with TRITON_INTERPRET=1")},
    status=_triton_status,
    auto={"cuda": 20},  # never on CPU: that is the interpreter
)


# ----------------------------------------------------------------------------- cuda: csrc/cuda


def _cuda_native():
    return _extension.has_kernel("gaussian_map", "CUDA")


def _cuda_emulated():
    return cuda_emulation_requested() and _extension.has_kernel("cuda_emu_gaussian_map", "CPU")


def _cuda_status():
    if not _extension.loaded:
        return False, f"compiled extension not loaded ({_extension.error})"
    if _cuda_native() and torch.cuda.is_available():
        return True, "CUDA kernels (csrc/cuda)"
    if _cuda_emulated():
        return True, "CUDA kernels through the host SIMT emulation (GSA_KERNELS_CUDA_EMULATE=1, CPU tensors)"
    if not _cuda_native():
        return False, "extension built without CUDA (no CUDA-enabled torch or nvcc at build time, or GSA_KERNELS_CUDA=0)"
    return False, "built with CUDA but no GPU is visible (set GSA_KERNELS_CUDA_EMULATE=1 to run the emulation on CPU tensors)"


def _cuda_kernel(op, device_type):
    # the dispatcher cannot tell a CPU tensor meant for the emulation from one for the C++ CPU
    # kernels, so the emulated kernels are separate ops (cuda_emu_*), picked by device
    return getattr(torch.ops.gsa_kernels, ("cuda_emu_" if device_type == "cpu" else "") + op)


CUDA = Backend(
    name="cuda",
    kernel=_cuda_kernel,
    devices=lambda: {"cuda": (_cuda_native(), "extension built without CUDA"),
                     "cpu": (_cuda_emulated(), "CPU tensors need GSA_KERNELS_CUDA_EMULATE=1 and the emulated kernels")},
    status=_cuda_status,
    auto={"cuda": 10},
)


BACKENDS = {b.name: b for b in (REFERENCE, CPU, TRITON, CUDA)}


def accepts(backend: Backend, device_type: str):
    """(accepted, reason) for tensors on `device_type`."""
    if backend.devices is None:
        return True, ""
    return backend.devices().get(device_type, (False, f"no {backend.name} kernels for {device_type} tensors"))


def status():
    """{name: (usable, reason)} for every backend."""
    return {name: b.status() for name, b in BACKENDS.items()}


def available():
    return tuple(name for name, b in BACKENDS.items() if b.status()[0])


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend row for backend=name on tensors of `device`; a clear error if it cannot run here."""
    return BACKENDS[_resolve_name(name, device.type)]


def resolve(name: str, device: torch.device, op: str):
    """The kernel of `op` (a _contract op name) for backend=name on tensors of `device`, in
    kernel argument order; a clear error if that backend cannot run it here."""
    return resolve_backend(name, device).kernel(op, device.type)


@torch.compiler.assume_constant_result  # torch.compile evaluates the choice once, at trace time
def _resolve_name(name: str, device_type: str) -> str:
    if name == "auto":
        ranked = sorted((b for b in BACKENDS.values() if device_type in b.auto), key=lambda b: -b.auto[device_type])
        for b in ranked:
            if b.status()[0] and accepts(b, device_type)[0]:
                return b.name
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {tuple(BACKENDS)}, got {name!r}")
    b = BACKENDS[name]
    ok, why = b.status()
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    ok, why = accepts(b, device_type)
    if not ok:
        raise ValueError(f"backend {name!r} cannot run on {device_type} tensors: {why}")
    return name
