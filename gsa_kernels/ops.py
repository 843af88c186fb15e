"""Public functional API (docs/architecture.md, section 2): validation, flattening, backend dispatch.

Every op takes x [B, *shape] with prod(shape) == D and returns outputs with x's shape and
dtype. sigma is a float, a 0-d tensor or a [B] tensor (per-sample noise levels), 0 < sigma with
sigma^2 a normal number of the compute dtype (float32: 1.1e-19 <= sigma <= 1.8e19). Model tensors
are cast to the compute dtype (float64 for float64 x, float32 otherwise) but must be on x's
device. Each call is one kernel launch of the chosen backend (`backend=`: "auto", "reference",
"cpu", "triton" or "cuda"; "auto" picks the fastest real backend for x's device).
"""
from __future__ import annotations

import math
from typing import Union

import torch

from . import _autograd, _backends, _layouts, streamed
from ._contract import GaussianOperand, MixtureOperand, SpectralKind, compute_dtype

Sigma = Union[float, torch.Tensor]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_backends() -> tuple:
    """The subset of ("reference", "cpu", "triton", "cuda") usable here."""
    return _backends.available()


# ----------------------------------------------------------------------------- validation


def _flatten(x, D, op):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [B, *shape] with prod(shape) == D = {D}, got shape {tuple(x.shape)}")
    feat = math.prod(x.shape[1:])
    if feat != D:
        raise ValueError(f"{op}: x has {feat} features per sample (shape {tuple(x.shape)}) but the model has D = {D}")
    return x.reshape(x.shape[0], D).contiguous()


def _checks_on_values(t):
    """Value checks read tensor data: only for CPU tensors outside torch.compile tracing
    (CUDA tensors would need a host sync; there the kernels propagate NaN instead)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _rows(v, B, x, name, op, *, allow_zero=False, allow_inf=False):
    """A float / 0-d / [B] per-sample value -> [B] tensor in x's compute dtype on x's device."""
    cd = compute_dtype(x.dtype)
    if isinstance(v, torch.Tensor):
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != B):
            raise ValueError(f"{op}: {name} must be a float, a 0-d tensor or a [B] = [{B}] tensor, got shape {tuple(v.shape)}")
        if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{op}: {name} must be a real tensor, got {v.dtype}")
        if v.device != x.device:
            raise ValueError(f"{op}: {name} is on {v.device} but x is on {x.device}")
        if _checks_on_values(v):
            _check_values(v, name, op, allow_zero, allow_inf, cd)
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
    """The checks of _check_values for a Python float. Comparisons only (no math.isnan): under
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


def _check_values(t, name, op, allow_zero, allow_inf, cd):
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


# the shapes of the model tensors, by letter: D from x, K and r from the first tensor that has them
# (a mixture's eigvals are [K, r])
_MODEL_SHAPES = {"mean": "D", "basis": "Dr", "eigvals": "r", "means": "KD", "bases": "KDr", "residual_var": "K",
                 "log_weights": "K"}


def _model_tensors(model, x, names, op):
    """The model's tensors in x's compute dtype; a clear error if they live on another device.
    Each is read once, as a new reference to its storage (another thread replacing the model's
    tensor, or its .data, mid-call leaves the kernel's inputs alone), and the shapes are checked
    together once: a model reshaped between reads is an error, not an out-of-bounds read."""
    cd = compute_dtype(x.dtype)
    out, dims = [], {"D": x.shape[1]}
    for n in names:
        t = getattr(model, n)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: the model's {n} is a {type(t).__name__}, not a tensor")
        t = t.view_as(t)  # the snapshot: its own TensorImpl on the same storage
        if t.device != x.device:
            raise ValueError(f"{op}: the model is on {t.device} but x is on {x.device}; call model.to({str(x.device)!r})")
        letters = "Kr" if n == "eigvals" and "means" in names else _MODEL_SHAPES[n]
        if t.dim() != len(letters) or any(dims.setdefault(c, s) != s for c, s in zip(letters, t.shape)):
            raise ValueError(f"{op}: the model's {n} has shape {tuple(t.shape)}, inconsistent with the other tensors "
                             f"and x ({dims}): was the model changed during the call?")
        _check_storage(t, n, op)
        out.append(t.to(cd).contiguous())
    return out


def _check_storage(t, name, op):
    """A tensor whose storage was freed or shrunk (the FSDP idiom t.untyped_storage().resize_(0))
    still reports its shape; reading it would read freed memory."""
    if t.numel() == 0 or t.device.type == "meta" or torch.compiler.is_compiling():  # traced: no storage to read
        return
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    need = (t.storage_offset() + extent) * t.element_size()
    have = t.untyped_storage().nbytes()
    if have < need:
        raise ValueError(f"{op}: the model's {name} has no data behind it (its storage holds {have} bytes, it needs "
                         f"{need}): freed or resized (e.g. untyped_storage().resize_(0)); restore it before the call")


def _gaussian_args(g, x, op):
    """mean, basis, eigvals, residual_var: the model's part of the kernel arguments."""
    if isinstance(g, MixtureOperand):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianModel, got a {type(g).__name__}: to use one of its "
                        "components per row (class-conditional), pass labels=y (int64 [B]); for the mixture "
                        "itself use gk.mixture_denoise / mixture_score")
    if not isinstance(g, GaussianOperand):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianModel, got {type(g).__name__}")
    return (*_model_tensors(g, x, GaussianOperand.TENSORS, op), float(g.residual_var))


def _labeled_args(m, labels, x, op):
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
    return (labels.contiguous(), *_model_tensors(m, x, MixtureOperand.LABELED_TENSORS, op))


def _mixture_args(m, x, op):
    """means, bases, eigvals, residual_var, log_weights: the model's part of the kernel arguments."""
    if not isinstance(m, MixtureOperand):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianMixture, got {type(m).__name__}")
    if m.num_components == 0:
        raise ValueError(f"{op}: the mixture has no components (an empty shard, m.shard(i, n) with n > K): "
                         "use gk.mixture_partial and gk.merge_partials")
    return _model_tensors(m, x, MixtureOperand.TENSORS, op)


# ----------------------------------------------------------------------------- Gaussian ops


def _gaussian_map(x, g, sigma_from, sigma_to, scale_from, scale_to, kind, backend, op, labels=None):
    x2 = _flatten(x, g.dim, op)
    B = x2.shape[0]
    flow = kind == SpectralKind.FLOW
    sigma_from = _rows(sigma_from, B, x2, "sigma_from" if flow else "sigma", op, allow_inf=flow)
    # denoise and score read sigma_from only: the other per-row tensors are sigma_from itself
    sigma_to = _rows(sigma_to, B, x2, "sigma_to", op, allow_zero=True) if flow else sigma_from
    scale_from = _rows(scale_from, B, x2, "scale_from", op) if flow else sigma_from
    scale_to = _rows(scale_to, B, x2, "scale_to", op) if flow else sigma_from
    if labels is None:
        name, params = "gaussian_map", _gaussian_args(g, x2, op)
        basis = params[1]
    else:
        name, params = "gaussian_map_labeled", _labeled_args(g, labels, x2, op)
        basis = params[2]
    _autograd.check_no_grad(op, **{"bases" if labels is not None else "basis": basis},
                            **({"sigma_from": sigma_from, "sigma_to": sigma_to, "scale_from": scale_from,
                                "scale_to": scale_to} if flow else {"sigma": sigma_from}))
    if B == 0:
        return torch.empty_like(x)
    be = _backends.resolve_backend(backend, x2.device)
    kernel = be.kernel(name, x2.device.type)
    layouts = _layouts.gaussian(be.name, g, basis, B) if labels is None else ()
    out = kernel(x2, *params, sigma_from, sigma_to, scale_from, scale_to, int(kind), *layouts)
    return out.reshape(x.shape)


# Every Gaussian op also takes labels=y (int64 [B]) with g a GaussianMixture (one component per
# class): row b then uses component y[b]'s Gaussian (mean, basis, eigvals, residual_var; the log
# weights are ignored) -- class-conditional models.


def gaussian_denoise(x, sigma: Sigma, g, backend: str = "auto", *, labels=None):
    """Posterior mean E[x0 | x] under the Gaussian model g at noise sigma. x [B, *shape].
    labels: int64 [B] with g a GaussianMixture: row b under component labels[b]."""
    return _gaussian_map(x, g, sigma, sigma, 1.0, 1.0, SpectralKind.DENOISE, backend, "gaussian_denoise", labels)


def gaussian_score(x, sigma: Sigma, g, backend: str = "auto", *, labels=None):
    """Score grad_x log p_sigma(x) = -(Sigma + sigma^2 I)^-1 (x - mean). x [B, *shape].
    labels: int64 [B] with g a GaussianMixture: row b under component labels[b]."""
    return _gaussian_map(x, g, sigma, sigma, 1.0, 1.0, SpectralKind.SCORE, backend, "gaussian_score", labels)


def gaussian_flow(x, sigma_from: Sigma, sigma_to: Sigma, g, scale_from: Sigma = 1.0, scale_to: Sigma = 1.0, backend: str = "auto",
                  *, labels=None):
    """Closed-form PF-ODE jump of x from sigma_from to sigma_to (per sample) under the Gaussian
    model g, for states x = scale * (x0 + sigma * eps). sigma_from = math.inf: x is unit noise eps.
    sigma_to = 0 gives the ODE's end point. labels: int64 [B] with g a GaussianMixture: row b
    under component labels[b]."""
    return _gaussian_map(x, g, sigma_from, sigma_to, scale_from, scale_to, SpectralKind.FLOW, backend, "gaussian_flow",
                         labels)


def gaussian_trajectory(x, sigmas, g, backend: str = "auto", *, labels=None):
    """x at sigmas[0] carried by the closed-form flow to every sigma: sigmas [T] (or [T, B]),
    returns [T, B, *shape]. sigmas[0] > 0 and finite (the state at infinite noise is not a
    point: start with gaussian_flow(eps, math.inf, sigmas[0], g)); later sigmas >= 0.
    labels: int64 [B] with g a GaussianMixture: row b under component labels[b]."""
    op = "gaussian_trajectory"
    x2 = _flatten(x, g.dim, op)
    B = x2.shape[0]
    sigmas = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas, dtype=torch.float64, device=x2.device)
    if sigmas.dim() not in (1, 2) or sigmas.shape[0] == 0 or (sigmas.dim() == 2 and sigmas.shape[1] != B):
        raise ValueError(f"{op}: sigmas must be [T] or [T, B] with T >= 1, got shape {tuple(sigmas.shape)}")
    if sigmas.device != x2.device:
        raise ValueError(f"{op}: sigmas is on {sigmas.device} but x is on {x2.device}")
    cd = compute_dtype(x2.dtype)
    if _checks_on_values(sigmas) and B > 0:
        _check_values(sigmas[0], "sigmas[0]", op, allow_zero=False, allow_inf=False, cd=cd)
        _check_values(sigmas[1:], "sigmas[1:]", op, allow_zero=True, allow_inf=False, cd=cd)
    sigmas = sigmas.to(cd)
    sigmas = (sigmas[:, None] if sigmas.dim() == 1 else sigmas).expand(sigmas.shape[0], B).contiguous()
    if labels is None:
        name, params = "gaussian_trajectory", _gaussian_args(g, x2, op)
        _autograd.check_no_grad(op, basis=params[1], sigmas=sigmas)
    else:
        name, params = "gaussian_trajectory_labeled", _labeled_args(g, labels, x2, op)
        _autograd.check_no_grad(op, bases=params[2], sigmas=sigmas)
    if B == 0:
        return x.new_empty((sigmas.shape[0],) + tuple(x.shape))
    be = _backends.resolve_backend(backend, x2.device)
    kernel = be.kernel(name, x2.device.type)
    layouts = _layouts.gaussian(be.name, g, params[1], B) if labels is None else ()
    out = kernel(x2, *params, sigmas, *layouts)
    return out.reshape((sigmas.shape[0],) + tuple(x.shape))


# ----------------------------------------------------------------------------- mixture ops


def _mixture(x2, sigma, m, need_denoised, need_weights, backend, op):
    """(denoised, logp, weights, sigma [B]) for flattened x2 [B, D]."""
    B = x2.shape[0]
    sigma = _rows(sigma, B, x2, "sigma", op)
    params = None if isinstance(m, streamed.StreamedMixture) else _mixture_args(m, x2, op)
    if params is not None:
        _autograd.check_no_grad(op, bases=params[1], sigma=sigma)
    if B == 0:
        cd = compute_dtype(x2.dtype)
        return x2.new_empty(x2.shape), x2.new_empty((0,), dtype=cd), x2.new_empty((0, m.num_components), dtype=cd), sigma
    if params is None:  # points in a file: streamed block by block
        if x2.device.type != "cpu":
            raise ValueError(f"{op}: a file-backed mixture streams its points on the CPU; x is on {x2.device}")
        denoised, logp, weights = streamed.mixture_posterior(x2, sigma, m, need_denoised, need_weights, backend)
        return denoised, logp, weights, sigma
    be = _backends.resolve_backend(backend, x2.device)
    kernel = be.kernel("mixture_posterior", x2.device.type)
    denoised, logp, weights = kernel(x2, *params, sigma, need_denoised, need_weights,
                                     *_layouts.mixture(be.name, m, params[0], params[1]))
    return denoised, logp, weights, sigma


def mixture_denoise(x, sigma: Sigma, m, return_weights: bool = False, backend: str = "auto"):
    """Posterior mean under the mixture m: sum_k w_k(x) D_k(x). With return_weights, also the
    posterior component weights [B, K]."""
    op = "mixture_denoise"
    denoised, _, weights, _ = _mixture(_flatten(x, m.dim, op), sigma, m, True, return_weights, backend, op)
    denoised = denoised.reshape(x.shape)
    return (denoised, weights) if return_weights else denoised


def mixture_score(x, sigma: Sigma, m, backend: str = "auto"):
    """Score of the noised mixture: (D(x) - x) / sigma^2. x [B, *shape]."""
    op = "mixture_score"
    # (D - x) / sigma^2 cancels at small sigma: the denoiser must come back in the compute
    # dtype, not rounded to a 16-bit x's dtype first, so the kernel reads x in the compute dtype
    x2 = _flatten(x, m.dim, op)
    x2 = x2.to(compute_dtype(x2.dtype))
    denoised, _, _, sigma = _mixture(x2, sigma, m, True, False, backend, op)
    if x.shape[0] == 0:
        return torch.empty_like(x)
    return ((denoised - x2) / (sigma * sigma)[:, None]).to(x.dtype).reshape(x.shape)


def mixture_logp(x, sigma: Sigma, m, backend: str = "auto"):
    """log p_sigma(x) of the noised mixture, [B] in the compute dtype."""
    op = "mixture_logp"
    _, logp, _, _ = _mixture(_flatten(x, m.dim, op), sigma, m, False, False, backend, op)
    return logp
