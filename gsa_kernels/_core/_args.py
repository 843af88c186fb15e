"""Argument preparation shared by every public op (ops.py, partial.py, distributed.py, streamed.py).

The dtype rules (FLOAT_DTYPES, compute_dtype), the `kind` values (SpectralKind), flattening x to
[B, D], per-row values (sigma, scales) to [B] tensors with their range checks, the no-gradient
check, and the model operands: what the ops read from a model, and the one `posterior` path of a
mixture (an in-memory mixture calls the kernel once; a file-backed one, streamed.py, streams its
points through the same kernel). Imports nothing of the package but _layouts (a leaf), so every
other module may import it.
"""
from __future__ import annotations

import enum
import math

import torch

from . import _layouts

# storage dtypes of x; the order is also the dtype code that gk.distributed exchanges
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel computes in for x of `dtype`: float64 stays float64, every other
    floating dtype (float16, bfloat16, float32) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- x and per-row values


def flatten(x, D, op):
    """x [B, *shape] with prod(shape) == D -> contiguous [B, D]; a clear error otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [B, *shape] with prod(shape) == D = {D}, got shape {tuple(x.shape)}")
    feat = math.prod(x.shape[1:])
    if feat != D:
        raise ValueError(f"{op}: x has {feat} features per sample (shape {tuple(x.shape)}) but the model has D = {D}")
    return x.reshape(x.shape[0], D).contiguous()


def checks_on_values(t):
    """Value checks read tensor data: only for CPU tensors outside torch.compile tracing
    (CUDA tensors would need a host sync; there the kernels propagate NaN instead)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def rows(v, B, x, name, op, *, allow_zero=False, allow_inf=False):
    """A float / 0-d / [B] per-sample value -> [B] tensor in x's compute dtype on x's device."""
    cd = compute_dtype(x.dtype)
    if isinstance(v, torch.Tensor):
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != B):
            raise ValueError(f"{op}: {name} must be a float, a 0-d tensor or a [B] = [{B}] tensor, got shape {tuple(v.shape)}")
        if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{op}: {name} must be a real tensor, got {v.dtype}")
        if v.device != x.device:
            raise ValueError(f"{op}: {name} is on {v.device} but x is on {x.device}")
        if checks_on_values(v):
            check_values(v, name, op, allow_zero, allow_inf, cd)
        return v.to(cd).expand(B).contiguous()
    if isinstance(v, bool) or not isinstance(v, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{op}: {name} must be a float or a tensor, got {type(v).__name__}")
    _check_float_value(v, name, op, allow_zero, allow_inf, cd)
    return torch.full((B,), v, dtype=cd, device=x.device)


def _squarable(cd):
    """The finite values whose square is a normal number of the compute dtype cd: sigma^2 enters
    every op, so a sigma outside this range would turn into 0 or inf there."""
    fi = torch.finfo(cd)
    return math.sqrt(fi.tiny), math.sqrt(fi.max)


def _range_error(v, name, op, cd):
    lo, hi = _squarable(cd)
    return ValueError(f"{op}: {name} = {float(v):g} is outside [{lo:.3g}, {hi:.3g}], where its square is a normal "
                      f"{cd} number ({cd} is the compute dtype of this x; float64 x computes in float64)")


def _check_float_value(v, name, op, allow_zero, allow_inf, cd):
    """The checks of check_values for a Python float. Comparisons only (no math.isnan): under
    torch.compile(dynamic=True) v may be a symbolic float."""
    if v != v:
        raise ValueError(f"{op}: {name} contains NaN")
    if v == math.inf and allow_inf:
        return
    if v == math.inf or v == -math.inf:
        raise ValueError(f"{op}: {name} must be finite")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{op}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    lo, hi = _squarable(cd)
    if v != 0 and (v < lo or v > hi):
        raise _range_error(v, name, op, cd)


def check_values(t, name, op, allow_zero, allow_inf, cd):
    """Checks of a tensor of sigmas / scales before it is converted to the compute dtype cd."""
    if torch.isnan(t).any():
        raise ValueError(f"{op}: {name} contains NaN")
    inf = torch.isinf(t)
    if (inf & (t < 0)).any() or (not allow_inf and inf.any()):
        raise ValueError(f"{op}: {name} must be finite")
    low = (t < 0) if allow_zero else (t <= 0)
    if low.any():
        bad = t[low][0].item()
        raise ValueError(f"{op}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {bad}")
    lo, hi = _squarable(cd)
    a = t.double()
    out = (a != 0) & ~inf & ((a < lo) | (a > hi))
    if out.any():
        raise _range_error(a[out][0].item(), name, op, cd)


def check_no_grad(op: str, **tensors):
    """Raise if, with grad mode on, a tensor that `op` does not differentiate requires grad
    (instead of returning an output silently detached from it)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(
                f"{op}: {name} requires grad, but gsa_kernels has no gradient w.r.t. {name} (differentiable: "
                "x; Gaussian mean, eigvals; mixture means, eigvals, residual_var, log_weights); pass "
                f"{name}.detach() to treat it as a constant")


# ----------------------------------------------------------------------------- model operands


# the shapes of the model tensors, by letter: D from x, K and r from the first tensor that has them
# (a mixture's eigvals are [K, r])
_MODEL_SHAPES = {"mean": "D", "basis": "Dr", "eigvals": "r", "means": "KD", "bases": "KDr", "residual_var": "K",
                 "log_weights": "K"}


def model_tensors(model, x, names, op):
    """The model's tensors in x's compute dtype; a clear error if they live on another device.
    Each is read once, as a new reference to its storage (another thread replacing the model's
    tensor, or its .data, mid-call leaves the kernel's inputs alone), and the shapes are checked
    together once: a model reshaped between reads is an error, not an out-of-bounds read."""
    cd = compute_dtype(x.dtype)
    out, dims, device = [], {"D": x.shape[1]}, x.device
    traced = torch.compiler.is_compiling()  # traced: no storage to read
    mixture = "means" in names
    for n in names:
        t = getattr(model, n)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: the model's {n} is a {type(t).__name__}, not a tensor")
        try:
            t = t.view_as(t)  # the snapshot: its own TensorImpl on the same storage
        except RuntimeError as e:  # its sizes and strides changed while view_as read them (.data = in another thread)
            raise ValueError(f"{op}: the model's {n} changed while it was read, inconsistent with itself: was the model "
                             "changed during the call?") from e
        if t.device != device:
            raise ValueError(f"{op}: the model is on {t.device} but x is on {x.device}; call model.to({str(x.device)!r})")
        letters = "Kr" if mixture and n == "eigvals" else _MODEL_SHAPES[n]
        shape = t.shape
        consistent = len(shape) == len(letters)
        for c, size in zip(letters, shape):
            consistent = consistent and dims.setdefault(c, size) == size
        if not consistent:
            raise ValueError(f"{op}: the model's {n} has shape {tuple(t.shape)}, inconsistent with the other tensors "
                             f"and x ({dims}): was the model changed during the call?")
        if not traced:
            _check_storage(t, n, op)
        out.append(t.to(cd).contiguous())
    return out


def _check_storage(t, name, op):
    """A tensor whose storage was freed or shrunk (the FSDP idiom t.untyped_storage().resize_(0))
    still reports its shape; reading it would read freed memory."""
    if t.numel() == 0 or t.is_meta:
        return
    extent = t.numel() if t.is_contiguous() else 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    need = (t.storage_offset() + extent) * t.element_size()
    have = t.untyped_storage().nbytes()
    if have < need:
        raise ValueError(f"{op}: the model's {name} has no data behind it (its storage holds {have} bytes, it needs "
                         f"{need}): freed or resized (e.g. untyped_storage().resize_(0)); restore it before the call")


class GaussianOperand:
    """What the Gaussian ops read from a model: `mean` [D], `basis` [D, r], `eigvals` [r] tensors
    and a float `residual_var`. GaussianModel is one; the ops accept any subclass instance."""

    TENSORS = ("mean", "basis", "eigvals")


class PosteriorOperand:
    """What the mixture ops (denoise, score, logp) need of a model: `num_components`, `dim`, and
    the one posterior path. MixtureOperand (in memory) implements it with one kernel launch;
    StreamedMixture (points in a file, streamed.py) streams blocks through the same kernel."""

    def posterior_args(self, x2, sigma, op):
        """The checked model part of the mixture_posterior kernel's arguments for x2 [B, D] and
        sigma [B] (both prepared), checked also when B == 0."""
        raise NotImplementedError

    def posterior(self, backend, x2, sigma, need_denoised, need_weights, params, score_rule=None):
        """(denoised [B, D] or [0], logp [B], weights [B, K] or [0]) for B >= 1 rows on `backend`
        (a _backends.Backend row, resolved by the caller: ops.py is the one dispatch point);
        params: what posterior_args returned. score_rule (ops.stable_score) given: applied to
        each kernel launch, and the first output is the score instead of the denoised mean."""
        raise NotImplementedError


class MixtureOperand(PosteriorOperand):
    """What the mixture ops read from an in-memory mixture: `means` [K, D], `bases` [K, D, r],
    `eigvals` [K, r], `residual_var` [K], `log_weights` [K] (normalised). GaussianMixture is one."""

    TENSORS = ("means", "bases", "eigvals", "residual_var", "log_weights")
    LABELED_TENSORS = TENSORS[:4]  # what the labelled Gaussian ops read: no log weights

    def posterior_args(self, x2, sigma, op):
        params = mixture_args(self, x2, op)
        check_no_grad(op, bases=params[1], sigma=sigma)
        return params

    def posterior(self, backend, x2, sigma, need_denoised, need_weights, params, score_rule=None):
        kernel = backend.kernel("mixture_posterior", x2.device.type)
        den, logp, weights = kernel(x2, *params, sigma, need_denoised, need_weights,
                                    *_layouts.mixture(backend.name, self, params[0], params[1]))
        if score_rule is not None:
            den = score_rule(backend, x2, sigma, params, den, weights)
        return den, logp, weights


def gaussian_args(g, x, op):
    """mean, basis, eigvals, residual_var: the model's part of the Gaussian kernels' arguments."""
    if isinstance(g, MixtureOperand):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianModel, got a {type(g).__name__}: to use one of its "
                        "components per row (class-conditional), pass labels=y (int64 [B]); for the mixture "
                        "itself use gk.mixture_denoise / mixture_score")
    if not isinstance(g, GaussianOperand):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianModel, got {type(g).__name__}")
    return (*model_tensors(g, x, GaussianOperand.TENSORS, op), float(g.residual_var))


def labeled_args(m, labels, x, op):
    """labels, means, bases, eigvals, residual_var: the labelled ops' model arguments. labels must
    be int64 [B] on x's device with values in [0, K), checked here (on CUDA tensors one host sync
    of their min / max; under torch.compile not at all: the CPU kernels check them again)."""
    if not isinstance(m, MixtureOperand):
        raise TypeError(f"{op}: labels=... selects a component of a gsa_kernels.GaussianMixture per row, but the "
                        f"model is a {type(m).__name__}; pass a GaussianMixture (one component per class)")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be an int64 tensor [B], got {type(labels).__name__}")
    B, K = x.shape[0], m.num_components
    if labels.dtype != torch.int64:
        raise TypeError(f"{op}: labels must be an int64 tensor, got {labels.dtype}")
    if labels.shape != (B,):
        raise ValueError(f"{op}: labels must be [B] = [{B}], got shape {tuple(labels.shape)}")
    if labels.device != x.device:
        raise ValueError(f"{op}: labels is on {labels.device} but x is on {x.device}")
    if K == 0:
        raise ValueError(f"{op}: the mixture has no components")
    if B > 0 and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(labels)
        if lo < 0 or hi >= K:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{op}: labels must lie in [0, K) = [0, {K}) (one component per class), got {int(bad)}")
    return (labels.contiguous(), *model_tensors(m, x, MixtureOperand.LABELED_TENSORS, op))


def mixture_args(m, x, op):
    """means, bases, eigvals, residual_var, log_weights: the model's part of the kernel arguments."""
    if not isinstance(m, MixtureOperand):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianMixture, got {type(m).__name__}")
    if m.num_components == 0:
        raise ValueError(f"{op}: the mixture has no components (an empty shard, m.shard(i, n) with n > K): "
                         "use gk.mixture_partial and gk.merge_partials")
    return model_tensors(m, x, MixtureOperand.TENSORS, op)


def to_args(args, kwargs, who):
    """(device, dtype) of the torch idioms .to(dtype), .to(device), .to(tensor), .to(device, dtype)
    and the keywords device= / dtype=."""
    try:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    except (TypeError, RuntimeError) as e:
        raise TypeError(f"{who}.to: expected a device, a dtype, a tensor or (device, dtype), got "
                        f"{args!r} {kwargs!r} ({e})") from None
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"{who}.to: a model's dtype must be floating point, got {dtype}")
    return device, dtype
