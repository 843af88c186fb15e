"""The backends behind the public ops, all with one kernel-level signature (csrc/ops.cpp):

    gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind)
    gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas)
    mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights)

x is [B, D] contiguous; the other tensors are contiguous, in the compute dtype, on x's device
(ops.py prepares them). Each backend says whether it is usable at all (`status`) and whether it
accepts tensors on a device (`accepts`). Backends never call each other.
"""
from __future__ import annotations

import os

import torch

from . import _extension, reference

KIND_DENOISE, KIND_SCORE, KIND_FLOW = 0, 1, 2  # gsa::SpectralKind in csrc/include/gsa/spectral.h


class ReferenceBackend:
    name = "reference"

    def status(self):
        return True, "pure PyTorch (gsa_kernels/reference.py)"

    def accepts(self, device):
        return True, ""

    def gaussian_map(self, x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind):
        if kind == KIND_DENOISE:
            return reference.gaussian_denoise(x, sigma_from, mean, basis, eigvals, residual_var)
        if kind == KIND_SCORE:
            return reference.gaussian_score(x, sigma_from, mean, basis, eigvals, residual_var)
        return reference.gaussian_flow(x, sigma_from, sigma_to, mean, basis, eigvals, residual_var, scale_from, scale_to)

    def gaussian_trajectory(self, x, mean, basis, eigvals, residual_var, sigmas):
        return reference.gaussian_trajectory(x, sigmas, mean, basis, eigvals, residual_var)

    def mixture_posterior(self, x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights):
        denoised, logp, weights = reference.mixture_posterior(x, sigma, means, bases, eigvals, residual_var, log_weights)
        return denoised, logp, weights


class CPUBackend:
    """The C++ kernels: gsa_kernels::<op> torch ops, CPU dispatch key."""

    name = "cpu"

    def status(self):
        if not _extension.loaded:
            return False, f"compiled extension not loaded ({_extension.error})"
        if not _extension.has_kernel("gaussian_map", "CPU"):
            return False, "extension has no CPU kernels"
        return True, "C++ kernels (csrc/cpu)"

    def accepts(self, device):
        return (device.type == "cpu", "the cpu backend takes CPU tensors")

    def gaussian_map(self, *args):
        return torch.ops.gsa_kernels.gaussian_map(*args)

    def gaussian_trajectory(self, *args):
        return torch.ops.gsa_kernels.gaussian_trajectory(*args)

    def mixture_posterior(self, *args):
        return torch.ops.gsa_kernels.mixture_posterior(*args)


def cuda_emulation_requested():
    return os.environ.get("GSA_KERNELS_CUDA_EMULATE", "0") == "1"


class CUDABackend:
    """CUDA kernels on CUDA tensors; with GSA_KERNELS_CUDA_EMULATE=1, the same kernel sources
    compiled for the host through the SIMT emulation, on CPU tensors (tests only)."""

    name = "cuda"

    def _native(self):
        return _extension.has_kernel("gaussian_map", "CUDA")

    def _emulated(self):
        return cuda_emulation_requested() and _extension.has_kernel("cuda_emu_gaussian_map", "CPU")

    def status(self):
        if not _extension.loaded:
            return False, f"compiled extension not loaded ({_extension.error})"
        if self._native() and torch.cuda.is_available():
            return True, "CUDA kernels (csrc/cuda)"
        if self._emulated():
            return True, "CUDA kernels through the host SIMT emulation (GSA_KERNELS_CUDA_EMULATE=1, CPU tensors)"
        if not self._native():
            return False, "extension built without CUDA (no CUDA-enabled torch or nvcc at build time, or GSA_KERNELS_CUDA=0)"
        return False, "built with CUDA but no GPU is visible (set GSA_KERNELS_CUDA_EMULATE=1 to run the emulation on CPU tensors)"

    def accepts(self, device):
        if device.type == "cuda":
            return self._native(), "extension built without CUDA"
        if device.type == "cpu":
            return self._emulated(), "CPU tensors need GSA_KERNELS_CUDA_EMULATE=1 and the emulated kernels"
        return False, f"no CUDA kernels for {device.type} tensors"

    def gaussian_map(self, x, *args):
        return self._pick(x, "gaussian_map")(x, *args)

    def gaussian_trajectory(self, x, *args):
        return self._pick(x, "gaussian_trajectory")(x, *args)

    def mixture_posterior(self, x, *args):
        return self._pick(x, "mixture_posterior")(x, *args)

    def _pick(self, x, name):
        # the dispatcher cannot tell a CPU tensor meant for emulation from one for the C++ CPU
        # kernels, so the emulated kernels are separate ops (cuda_emu_*), picked here by device
        return getattr(torch.ops.gsa_kernels, ("cuda_emu_" if x.device.type == "cpu" else "") + name)


class TritonBackend:
    """Triton kernels (gsa_kernels/triton). CUDA tensors; CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"

    def _module(self):
        from . import triton as triton_backend  # imported lazily: importing triton is slow

        return triton_backend

    def status(self):
        try:
            return self._module().status()
        except Exception as e:  # triton missing or broken
            return False, f"{type(e).__name__}: {e}"

    def accepts(self, device):
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            return True, ""
        return False, "the triton backend takes CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"

    def gaussian_map(self, *args):
        return self._module().gaussian_map(*args)

    def gaussian_trajectory(self, *args):
        return self._module().gaussian_trajectory(*args)

    def mixture_posterior(self, *args):
        return self._module().mixture_posterior(*args)


BACKENDS = {b.name: b for b in (ReferenceBackend(), CPUBackend(), TritonBackend(), CUDABackend())}


def status():
    """{name: (usable, reason)} for every backend."""
    return {name: b.status() for name, b in BACKENDS.items()}


def available():
    return tuple(name for name, b in BACKENDS.items() if b.status()[0])


# "auto" order per device type: never an interpreted or emulated path.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def resolve(name: str, device: torch.device):
    """The backend object for backend=name on tensors of `device`, or a clear error."""
    return BACKENDS[_resolve_name(name, device.type)]


@torch.compiler.assume_constant_result  # torch.compile evaluates the choice once, at trace time
def _resolve_name(name: str, device_type: str) -> str:
    device = torch.device(device_type)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            b = BACKENDS[candidate]
            if b.status()[0] and b.accepts(device)[0]:
                return candidate
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {tuple(BACKENDS)}, got {name!r}")
    b = BACKENDS[name]
    ok, why = b.status()
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    ok, why = b.accepts(device)
    if not ok:
        raise ValueError(f"backend {name!r} cannot run on {device_type} tensors: {why}")
    return name
