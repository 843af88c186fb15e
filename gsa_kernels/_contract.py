"""The kernel contract: what every backend implements, in one place (docs/architecture.md, section 3).

Six kernel-level ops. The public ops (ops.py) validate, flatten and cast, then call exactly one
of them on one backend (_backends.py). Every backend takes the arguments in the order of
ARGUMENTS below -- the schemas of csrc/ops.cpp, the Triton ops and the reference alike:

    gaussian_map(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind)
        -> out [B, D]. The spectral map of `kind` (SpectralKind): denoise and score read
        sigma_from only (ops.py passes sigma for all four per-row tensors); flow reads all four,
        sigma_from = +inf meaning x is unit noise.
    gaussian_trajectory(x, mean, basis, eigvals, residual_var, sigmas)
        -> out [T, B, D]: x at sigmas[0] carried by the closed-form flow to every sigmas[t].
    mixture_posterior(x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights)
        -> (denoised [B, D] or [0], logp [B], weights [B, K] or [0]).
    gaussian_map_labeled(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to, scale_from,
                         scale_to, kind)
    gaussian_trajectory_labeled(x, labels, means, bases, eigvals, residual_var, sigmas)
        -> as gaussian_map / gaussian_trajectory, row b under component labels[b] of a mixture's
        stacked Gaussians (class-conditional models): labels int64 [B] in [0, K), the model
        tensors as the mixture's (means [K, D], bases [K, D, r], eigvals [K, r], residual_var
        [K]; no log weights). Row b's output is exactly gaussian_map's for that row under the
        Gaussian (means[k], bases[k], eigvals[k], residual_var[k]), k = labels[b].
    local_posterior(x, images, sigma, patch_size, mode, padding, kind)
        -> out [B, C, H, W] in x's dtype: the local score machines (Kamb & Ganguli, arXiv
        2412.20292), a posterior over training patches per query pixel (see the section below).

Tensors: x [B, D] contiguous, float16 / bfloat16 / float32 / float64. Every other tensor
(model tensors, per-row sigma_* / scale_* [B], sigmas [T, B]) is contiguous, on x's device, in
the compute dtype of x (compute_dtype below); Gaussian residual_var is a Python float, mixture
residual_var a [K] tensor (also in the labelled ops); labels int64 [B] on x's device. Outputs: out / denoised in x's dtype, logp and weights in the compute
dtype. A kernel computes in the compute dtype whatever the storage dtype. NaN in x gives NaN in
that row's outputs (never -inf, never another row).

Local score machines (local_posterior). x [B, C, H, W] contiguous (dtypes as above), images
[N, C, H, W] contiguous in the compute dtype, N >= 1, sigma [B] > 0 in the compute dtype;
patch_size P odd >= 1 (p = P // 2), any size (P > H or W is allowed: the window then reaches past
the image on every side); mode LocalMode, padding LocalPadding, kind SpectralKind DENOISE or
SCORE (FLOW is not an op of this family). The window Omega_u is the P x P pixels centred on u;
pixels outside the image are 0 (ZEROS, queries and training images alike) or wrap (CIRCULAR,
indices mod H and mod W, any number of times). A candidate c = (n, v) is images[n] windowed at
pixel v; its value is images[n, :, v]. For row b and pixel u:

    d2(c | u) = sum over the window offsets o and channels of (x[b, :, u + o] - images[n, :, v + o])^2
    w(c | u)  = softmax over the candidates of u of -d2 / (2 sigma_b^2)
    DENOISE:  out[b, :, u] = x[b, :, u] + sum_c w(c | u) (images[n, :, v] - x[b, :, u])
    SCORE:    out[b, :, u] = sum_c w(c | u) (images[n, :, v] - x[b, :, u]) / sigma_b^2

(the denoiser is sum_c w value_c; the difference form is the one that does not cancel, so the
score stays accurate where out ~ x at small sigma). Candidates of u per mode: LS (n, v = u) for
every n; ELS (n, v) for every n and pixel v; BBELS (ZEROS only) (n, v) with v in u's boundary
class: (min(i, p), min(H-1-i, p), min(j, p), min(W-1-j, p)) equal for u = (i, j) and v.
Exactness: d2 is a sum of squared differences, never |a|^2 - 2ab + |b|^2 unless an error bound
separates the candidates (logits scale as 1/sigma^2); per pixel the weights are within total
variation 1e-3 (float32 compute) / 1e-9 (float64) of the float64 truth at every sigma, near ties
included. Streaming: no backend materialises the [N HW, HW] logits; an online softmax per
(row, pixel). NaN: a NaN anywhere in x[b] makes the whole output row out[b] NaN (every pixel
and channel; never -inf, never another row) -- a row-level rule, so that no backend has to
agree on which windows reach the NaN pixel.

Prepared layouts: a model owns GEMM-ready layouts derived from its tensors (gsa_kernels/_layouts.py:
U^T as `basis_rows`, a mixture's `forward_panels` / `backward_panels`) and hands them to the C++
CPU kernels as optional trailing arguments (LAYOUT_ARGUMENTS, after the ones above, so every
argument index above stays valid); other backends take none, fakes ignore them.

Room left on purpose (keep the names and orders above stable):
- Autograd (gsa_kernels/_autograd.py) registers on these same op names: `kind` and the need_*
  flags stay plain int / bool arguments, never folded into the name.
- The per-row `labels` variants of the Gaussian ops are separate op names with `labels` right
  after x, so the ops above are unchanged (and a labels-less call can never reach them).
"""
from __future__ import annotations

import enum

import torch


class SpectralKind(enum.IntEnum):
    """The `kind` argument of gaussian_map; values are gsa::SpectralKind (csrc/include/gsa/spectral.h)."""

    DENOISE = 0
    SCORE = 1
    FLOW = 2


class LocalMode(enum.IntEnum):
    """The `mode` argument of local_posterior: which training patches compete for a pixel."""

    LS = 0  # the patch at the same pixel, every training image
    ELS = 1  # every patch of every training image (translation equivariant)
    BBELS = 2  # every patch in the pixel's boundary class (zeros padding only)


class LocalPadding(enum.IntEnum):
    """The `padding` argument of local_posterior."""

    ZEROS = 0
    CIRCULAR = 1


# Op names and their argument names, in kernel argument order (csrc/ops.cpp defines the same).
ARGUMENTS = {
    "gaussian_map": ("x", "mean", "basis", "eigvals", "residual_var", "sigma_from", "sigma_to", "scale_from",
                     "scale_to", "kind"),
    "gaussian_trajectory": ("x", "mean", "basis", "eigvals", "residual_var", "sigmas"),
    "mixture_posterior": ("x", "means", "bases", "eigvals", "residual_var", "log_weights", "sigma", "need_denoised",
                          "need_weights"),
    "gaussian_map_labeled": ("x", "labels", "means", "bases", "eigvals", "residual_var", "sigma_from", "sigma_to",
                             "scale_from", "scale_to", "kind"),
    "gaussian_trajectory_labeled": ("x", "labels", "means", "bases", "eigvals", "residual_var", "sigmas"),
    "local_posterior": ("x", "images", "sigma", "patch_size", "mode", "padding", "kind"),
}
OPS = tuple(ARGUMENTS)
# optional trailing arguments of the compiled CPU ops (csrc/ops.cpp), default None
LAYOUT_ARGUMENTS = {"gaussian_map": ("basis_rows",), "gaussian_trajectory": ("basis_rows",),
                    "mixture_posterior": ("forward_panels", "backward_panels"),
                    "gaussian_map_labeled": (), "gaussian_trajectory_labeled": (), "local_posterior": ()}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel computes in for x of `dtype`: float64 stays float64, every other
    floating dtype (float16, bfloat16, float32) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


FAKES = {"gaussian_map": fake_gaussian_map, "gaussian_trajectory": fake_gaussian_trajectory,
         "mixture_posterior": fake_mixture_posterior, "gaussian_map_labeled": fake_gaussian_map_labeled,
         "gaussian_trajectory_labeled": fake_gaussian_trajectory_labeled, "local_posterior": fake_local_posterior}


def fake_basis_rows(basis):
    return basis.new_empty((basis.shape[1], basis.shape[0]))


def fake_mixture_panels(means, bases):
    n = means.shape[0] * (bases.shape[2] + 1) * means.shape[1]
    return means.new_empty((n,)), means.new_empty((n,))


# the CPU layout builders (gsa_kernels/_layouts.py); content_hash has none: its result is data
LAYOUT_FAKES = {"basis_rows": fake_basis_rows, "mixture_panels": fake_mixture_panels}


def register_fakes(namespace: str, prefix: str = "", layouts: bool = False):
    """register_fake for every op `namespace::<prefix><op>` (ops defined elsewhere, e.g. in C++),
    and with `layouts` for the layout builders too."""
    for name, fake in {**FAKES, **(LAYOUT_FAKES if layouts else {})}.items():
        if not torch._C._dispatch_has_kernel(f"{namespace}::{prefix}{name}") and name == "local_posterior":
            continue  # issue 27: the emulated cuda_emu_local_posterior comes on its own branch
        torch.library.register_fake(f"{namespace}::{prefix}{name}")(fake)


# ----------------------------------------------------------------------------- model operands


class GaussianOperand:
    """What the Gaussian ops read from a model: `mean` [D], `basis` [D, r], `eigvals` [r] tensors
    and a float `residual_var`. GaussianModel is one; ops.py accepts any subclass instance."""

    TENSORS = ("mean", "basis", "eigvals")


class MixtureOperand:
    """What the mixture ops read from a model: `means` [K, D], `bases` [K, D, r], `eigvals` [K, r],
    `residual_var` [K], `log_weights` [K] (normalised). GaussianMixture is one."""

    TENSORS = ("means", "bases", "eigvals", "residual_var", "log_weights")
    LABELED_TENSORS = TENSORS[:4]  # what the labelled Gaussian ops read: no log weights
