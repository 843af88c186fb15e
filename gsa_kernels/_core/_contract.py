"""The op registry: every kernel-level op, declared once (docs/architecture.md, sections 3 and 4).

The public ops (ops.py, and the modules built on it) validate, flatten and cast their arguments
(_args.py), then call exactly one of these ops on one backend (_backends.py). Per op, one `Op`
entry holds everything the Python side needs:

- `schema`: argument names, order and types, as csrc/ops.cpp defines them (the compiled ops),
  the Triton ops are defined with (gsa_kernels/triton/_library.py) and the reference functions
  take (gsa_kernels/reference.py);
- `grads`: the arguments with a gradient (every other tensor argument raises when it requires
  grad, naming it); `autograd`: the backward rule (gsa_kernels/_core/_autograd.py);
- `fake`: output shapes and dtypes (torch.compile, opcheck); `layouts`: optional trailing
  arguments of the compiled CPU op (prepared layouts, gsa_kernels/_core/_layouts.py);
- where it is documented and tested: `math` (a section of docs/architecture.md), `kernels`
  (each backend's kernel source), `conformance` (the test file running tests/conformance/cases.py's
  `<name>_cases()` on every backend).

register(namespace, prefix) binds the fakes and the autograd rules of every op to a torch.library
namespace -- the compiled gsa_kernels:: and gsa_kernels::cuda_emu_* ops (_extension.py) and the
Triton gsa_kernels_triton:: ops (triton/_library.py) alike. Adding an op is one entry here, its
kernels, its reference function, its autograd rule and its conformance cases (the list of files
is in docs/architecture.md, section 4).

Tensors: x [B, D] contiguous, float16 / bfloat16 / float32 / float64. Every other tensor (model
tensors, per-row sigma_* / scale_* [B], sigmas [T, B]) is contiguous, on x's device, in the
compute dtype of x (compute_dtype); Gaussian residual_var is a Python float, mixture and labelled
residual_var a [K] tensor; labels int64 [B] on x's device. Outputs: out / denoised in x's dtype,
logp and weights in the compute dtype. A kernel computes in the compute dtype whatever the
storage dtype. NaN in x gives NaN in that row's outputs (never -inf, never another row).

Local score machines (local_posterior(x, images, sigma, patch_size, mode, padding, kind) -> out
[B, C, H, W] in x's dtype; Kamb & Ganguli, arXiv 2412.20292; docs/local_score.md). x [B, C, H, W]
contiguous (dtypes as above), images [N, C, H, W] contiguous in the compute dtype, N >= 1, sigma
[B] > 0 in the compute dtype; patch_size P odd >= 1 (p = P // 2), any size (P > H or W: the window
reaches past the image on every side); mode LocalMode, padding LocalPadding, kind SpectralKind
DENOISE or SCORE. The window Omega_u is the P x P pixels centred on u; pixels outside the image
are 0 (ZEROS, queries and training images alike) or wrap (CIRCULAR, indices mod H and mod W, any
number of times). A candidate c = (n, v) is images[n] windowed at pixel v; its value is
images[n, :, v]. For row b and pixel u:

    d2(c | u) = sum over the window offsets o and channels of (x[b, :, u + o] - images[n, :, v + o])^2
    w(c | u)  = softmax over the candidates of u of -d2 / (2 sigma_b^2)
    DENOISE:  out[b, :, u] = x[b, :, u] + sum_c w(c | u) (images[n, :, v] - x[b, :, u])
    SCORE:    out[b, :, u] = sum_c w(c | u) (images[n, :, v] - x[b, :, u]) / sigma_b^2

(the denoiser is sum_c w value_c; the difference form does not cancel, so the score stays
accurate where out ~ x at small sigma). Candidates of u per mode: LS (n, v = u) for every n; ELS
(n, v) for every n and pixel v; BBELS (ZEROS only) (n, v) with v in u's boundary class:
(min(i, p), min(H-1-i, p), min(j, p), min(W-1-j, p)) equal for u = (i, j) and v. Exactness: d2 is
a sum of squared differences, never |a|^2 - 2ab + |b|^2 unless an error bound separates the
candidates (logits scale as 1/sigma^2); per pixel the weights are within total variation 1e-3
(float32 compute) / 1e-9 (float64) of the float64 truth at every sigma, near ties included.
Streaming: no backend materialises the [N HW, HW] logits; an online softmax per (row, pixel).
NaN: a NaN anywhere in x[b] makes the whole output row out[b] NaN (every pixel and channel; never
-inf, never another row) -- a row-level rule, so that no backend has to agree on which windows
reach the NaN pixel. Gradient: w.r.t. x only (reference.local_posterior_vjp).

Stable on purpose: `kind` and the need_* flags stay plain int / bool arguments, never folded into
an op name (autograd registers on these names); the labelled variants are separate ops with
`labels` right after x, so a labels-less call can never reach them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _autograd
from ._args import (  # noqa: F401  (the contract's names)
    GaussianOperand,
    LocalMode,
    LocalPadding,
    MixtureOperand,
    SpectralKind,
    compute_dtype,
)

# ----------------------------------------------------------------------------- fake (meta) kernels
# Output shapes and dtypes only, so that torch.compile traces through the ops and opcheck tests them.


def fake_gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind,
                      basis_rows=None):
    return torch.empty_like(x)


def fake_gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas, basis_rows=None):
    return x.new_empty((sigmas.shape[0], x.shape[0], x.shape[1]))


def fake_mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights,
                           forward_panels=None, backward_panels=None):
    B, K = x.shape[0], means.shape[0]
    cd = compute_dtype(x.dtype)
    denoised = x.new_empty((B, x.shape[1]) if need_denoised else (0,))
    weights = x.new_empty((B, K) if need_weights else (0,), dtype=cd)
    return denoised, x.new_empty((B,), dtype=cd), weights


def fake_gaussian_map_labeled(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to, scale_from,
                              scale_to, kind):
    return torch.empty_like(x)


def fake_gaussian_trajectory_labeled(x, labels, means, bases, eigvals, residual_var, sigmas):
    return x.new_empty((sigmas.shape[0], x.shape[0], x.shape[1]))


def fake_local_posterior(x, images, sigma, patch_size, mode, padding, kind):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Op:
    name: str
    schema: str  # "(Tensor x, ...) -> Tensor": names, order and types of the arguments, without layouts
    grads: tuple  # argument names with a gradient
    fake: Callable
    math: str  # section of docs/architecture.md with the op's mathematics
    kernels: dict  # backend -> kernel source file (the reference is gsa_kernels/reference.py::<name>)
    conformance: str  # test file of the conformance suite
    layouts: tuple = ()  # optional trailing Tensor? arguments of the compiled CPU op
    # _autograd rule: (lookup, qualname, no_grad, fused) -> (backward, setup_context); None: the
    # VJP of the reference (_autograd.reference_rule)
    autograd: Optional[Callable] = None

    @property
    def backward_rule(self) -> Callable:
        return self.autograd if self.autograd is not None else _autograd.reference_rule(self.name)

    def _arguments(self):
        return torch._C.parse_schema(self.name + self.schema).arguments

    @property
    def arguments(self) -> tuple:
        return tuple(a.name for a in self._arguments())

    @property
    def no_grad(self) -> dict:
        """{index: name} of the tensor arguments without a gradient."""
        return {i: a.name for i, a in enumerate(self._arguments())
                if str(a.type) == "Tensor" and a.name not in self.grads}


_GAUSSIAN_KERNELS = {"cpu": "csrc/cpu/gaussian.cpp", "cuda": "csrc/cuda/gaussian_kernels.cuh",
                     "triton": "gsa_kernels/triton/gaussian.py"}
_LABELED_KERNELS = {"cpu": "csrc/cpu/labeled.cpp", "cuda": "csrc/cuda/gaussian_kernels.cuh",
                    "triton": "gsa_kernels/triton/gaussian.py"}
_MAP_TAIL = "Tensor sigma_from, Tensor sigma_to, Tensor scale_from, Tensor scale_to, int kind) -> Tensor"

REGISTRY = {op.name: op for op in (
    Op("gaussian_map",
       "(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, float residual_var, " + _MAP_TAIL,
       grads=("x", "mean", "eigvals"), fake=fake_gaussian_map, autograd=_autograd.gaussian_map_rule,
       math="1.1", kernels=_GAUSSIAN_KERNELS, conformance="tests/conformance/test_conformance.py",
       layouts=("basis_rows",)),
    Op("gaussian_trajectory",
       "(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, float residual_var, Tensor sigmas) -> Tensor",
       grads=("x", "mean", "eigvals"), fake=fake_gaussian_trajectory, autograd=_autograd.gaussian_trajectory_rule,
       math="1.2", kernels=_GAUSSIAN_KERNELS, conformance="tests/conformance/test_conformance.py",
       layouts=("basis_rows",)),
    Op("mixture_posterior",
       "(Tensor x, Tensor means, Tensor bases, Tensor eigvals, Tensor residual_var, Tensor log_weights, "
       "Tensor sigma, bool need_denoised, bool need_weights) -> (Tensor, Tensor, Tensor)",
       grads=("x", "means", "eigvals", "residual_var", "log_weights"), fake=fake_mixture_posterior,
       autograd=_autograd.mixture_posterior_rule, math="1.3",
       kernels={"cpu": "csrc/cpu/mixture.cpp", "cuda": "csrc/cuda/mixture_kernels.cuh",
                "triton": "gsa_kernels/triton/mixture.py"},
       conformance="tests/conformance/test_conformance.py", layouts=("forward_panels", "backward_panels")),
    Op("gaussian_map_labeled",
       "(Tensor x, Tensor labels, Tensor means, Tensor bases, Tensor eigvals, Tensor residual_var, " + _MAP_TAIL,
       grads=("x", "means", "eigvals", "residual_var"), fake=fake_gaussian_map_labeled,
       autograd=_autograd.gaussian_map_labeled_rule, math="1.4", kernels=_LABELED_KERNELS,
       conformance="tests/conformance/test_labels.py"),
    Op("gaussian_trajectory_labeled",
       "(Tensor x, Tensor labels, Tensor means, Tensor bases, Tensor eigvals, Tensor residual_var, "
       "Tensor sigmas) -> Tensor",
       grads=("x", "means", "eigvals", "residual_var"), fake=fake_gaussian_trajectory_labeled,
       autograd=_autograd.gaussian_trajectory_labeled_rule, math="1.4", kernels=_LABELED_KERNELS,
       conformance="tests/conformance/test_labels.py"),
    Op("local_posterior",
       "(Tensor x, Tensor images, Tensor sigma, int patch_size, int mode, int padding, int kind) -> Tensor",
       grads=("x",), fake=fake_local_posterior, autograd=_autograd.local_posterior_rule, math="1.6",
       kernels={"cpu": "csrc/cpu/local_score.cpp", "cuda": "csrc/cuda/local_kernels.cuh",
                "triton": "gsa_kernels/triton/local.py"},
       conformance="tests/conformance/test_conformance.py"),
)}

OPS = tuple(REGISTRY)
# derived views, for the callers that need only one field
ARGUMENTS = {name: op.arguments for name, op in REGISTRY.items()}
LAYOUT_ARGUMENTS = {name: op.layouts for name, op in REGISTRY.items()}
FAKES = {name: op.fake for name, op in REGISTRY.items()}


def fake_basis_rows(basis):
    return basis.new_empty((basis.shape[1], basis.shape[0]))


def fake_mixture_panels(means, bases):
    n = means.shape[0] * (bases.shape[2] + 1) * means.shape[1]
    return means.new_empty((n,)), means.new_empty((n,))


# the CPU layout builders (gsa_kernels/_core/_layouts.py); content_hash has none: its result is data
LAYOUT_FAKES = {"basis_rows": fake_basis_rows, "mixture_panels": fake_mixture_panels}


# ----------------------------------------------------------------------------- registration


def register(namespace: str, prefix: str = "", *, fakes: bool = True, layouts: bool = False,
             fused_mixture_backward: bool = False):
    """Bind every registered op `namespace::<prefix><name>` (defined elsewhere: in C++, or by
    triton/_library.py) to its fake (unless fakes=False: a triton_op traces its launcher instead)
    and its autograd rule. layouts: also the fakes of the CPU layout builders;
    fused_mixture_backward: CPU tensors take gsa_kernels::mixture_posterior_backward."""
    ops = getattr(torch.ops, namespace)
    lookup = lambda name: getattr(ops, prefix + name)  # noqa: E731
    if layouts:
        for name, fake in LAYOUT_FAKES.items():
            torch.library.register_fake(f"{namespace}::{name}")(fake)
    if fused_mixture_backward:
        torch.library.register_fake(f"{namespace}::mixture_posterior_backward")(_autograd.fused_backward_fake)
    for op in REGISTRY.values():
        qualname = f"{namespace}::{prefix}{op.name}"
        if fakes:
            torch.library.register_fake(qualname)(op.fake)
        backward, setup_context = op.backward_rule(lookup, qualname, op.no_grad, fused_mixture_backward)
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
