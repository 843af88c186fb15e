"""Public functional API (DESIGN.md section 2): validation, flattening, backend dispatch.

Every op takes x [B, *shape] with prod(shape) == D and returns outputs with x's shape and
dtype. sigma is a float, a 0-d tensor or a [B] tensor (per-sample noise levels). Model tensors
are cast to the compute dtype (float64 for float64 x, float32 otherwise) but must be on x's
device. Each call is one kernel launch of the chosen backend (`backend=`: "auto", "reference",
"cpu", "triton" or "cuda"; "auto" picks the fastest real backend for x's device).
"""
from __future__ import annotations

import math
from typing import Union

import torch

from . import _backends
from ._backends import KIND_DENOISE, KIND_FLOW, KIND_SCORE

Sigma = Union[float, torch.Tensor]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_backends() -> tuple:
    """The subset of ("reference", "cpu", "triton", "cuda") usable here."""
    return _backends.available()


# ----------------------------------------------------------------------------- validation


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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
    cd = _compute_dtype(x)
    if isinstance(v, torch.Tensor):
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != B):
            raise ValueError(f"{op}: {name} must be a float, a 0-d tensor or a [B] = [{B}] tensor, got shape {tuple(v.shape)}")
        if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{op}: {name} must be a real tensor, got {v.dtype}")
        if v.device != x.device:
            raise ValueError(f"{op}: {name} is on {v.device} but x is on {x.device}")
        t = v.to(cd).expand(B).contiguous()
        if _checks_on_values(t):
            _check_values(t, name, op, allow_zero, allow_inf)
        return t
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a float or a tensor, got {type(v).__name__}")
    _check_float_value(float(v), name, op, allow_zero, allow_inf)
    return torch.full((B,), float(v), dtype=cd, device=x.device)


def _check_float_value(v, name, op, allow_zero, allow_inf):
    """The checks of _check_values for a Python float (no tensor: traceable by torch.compile)."""
    if math.isnan(v):
        raise ValueError(f"{op}: {name} contains NaN")
    if not allow_inf and math.isinf(v):
        raise ValueError(f"{op}: {name} must be finite")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{op}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def _check_values(t, name, op, allow_zero, allow_inf):
    if torch.isnan(t).any():
        raise ValueError(f"{op}: {name} contains NaN")
    if not allow_inf and torch.isinf(t).any():
        raise ValueError(f"{op}: {name} must be finite")
    low = (t < 0) if allow_zero else (t <= 0)
    if low.any():
        bad = t[low][0].item()
        raise ValueError(f"{op}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {bad}")


def _model_tensors(model, x, names, op):
    """The model's tensors in x's compute dtype; a clear error if they live on another device."""
    cd = _compute_dtype(x)
    out = []
    for n in names:
        t = getattr(model, n)
        if t.device != x.device:
            raise ValueError(f"{op}: the model is on {t.device} but x is on {x.device}; call model.to({str(x.device)!r})")
        out.append(t.to(cd).contiguous())
    return out


def _gaussian_args(g, x, op):
    from .models import GaussianModel

    if not isinstance(g, GaussianModel):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianModel, got {type(g).__name__}")
    mean, basis, eigvals = _model_tensors(g, x, ("mean", "basis", "eigvals"), op)
    return mean, basis, eigvals, float(g.residual_var)


def _mixture_args(m, x, op):
    from .models import GaussianMixture

    if not isinstance(m, GaussianMixture):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianMixture, got {type(m).__name__}")
    if m.num_components == 0:
        raise ValueError(f"{op}: the mixture has no components (an empty shard, m.shard(i, n) with n > K): "
                         "use gk.mixture_partial and gk.merge_partials")
    return _model_tensors(m, x, ("means", "bases", "eigvals", "residual_var", "log_weights"), op)


# ----------------------------------------------------------------------------- Gaussian ops


def _gaussian_map(x, g, sigma_from, sigma_to, scale_from, scale_to, kind, backend, op):
    x2 = _flatten(x, g.dim, op)
    B = x2.shape[0]
    flow = kind == KIND_FLOW
    sa = _rows(sigma_from, B, x2, "sigma_from" if flow else "sigma", op, allow_inf=flow)
    sb = _rows(sigma_to, B, x2, "sigma_to", op, allow_zero=True) if flow else sa
    ka = _rows(scale_from, B, x2, "scale_from", op) if flow else sa
    kb = _rows(scale_to, B, x2, "scale_to", op) if flow else sa
    params = _gaussian_args(g, x2, op)
    if B == 0:
        return torch.empty_like(x)
    out = _backends.resolve(backend, x2.device).gaussian_map(x2, *params, sa, sb, ka, kb, kind)
    return out.reshape(x.shape)


def gaussian_denoise(x, sigma: Sigma, g, backend: str = "auto"):
    """Posterior mean E[x0 | x] under the Gaussian model g at noise sigma. x [B, *shape]."""
    return _gaussian_map(x, g, sigma, sigma, 1.0, 1.0, KIND_DENOISE, backend, "gaussian_denoise")


def gaussian_score(x, sigma: Sigma, g, backend: str = "auto"):
    """Score grad_x log p_sigma(x) = -(Sigma + sigma^2 I)^-1 (x - mean). x [B, *shape]."""
    return _gaussian_map(x, g, sigma, sigma, 1.0, 1.0, KIND_SCORE, backend, "gaussian_score")


def gaussian_flow(x, sigma_from: Sigma, sigma_to: Sigma, g, scale_from: Sigma = 1.0, scale_to: Sigma = 1.0, backend: str = "auto"):
    """Closed-form PF-ODE jump of x from sigma_from to sigma_to (per sample) under the Gaussian
    model g, for states x = scale * (x0 + sigma * eps). sigma_from = math.inf: x is unit noise eps.
    sigma_to = 0 gives the ODE's end point."""
    return _gaussian_map(x, g, sigma_from, sigma_to, scale_from, scale_to, KIND_FLOW, backend, "gaussian_flow")


def gaussian_trajectory(x, sigmas, g, backend: str = "auto"):
    """x at sigmas[0] carried by the closed-form flow to every sigma: sigmas [T] (or [T, B]),
    returns [T, B, *shape]. sigmas[0] > 0 and finite (the state at infinite noise is not a
    point: start with gaussian_flow(eps, math.inf, sigmas[0], g)); later sigmas >= 0."""
    op = "gaussian_trajectory"
    x2 = _flatten(x, g.dim, op)
    B = x2.shape[0]
    sigmas = torch.as_tensor(sigmas, device=x2.device) if not isinstance(sigmas, torch.Tensor) else sigmas
    if sigmas.dim() not in (1, 2) or sigmas.shape[0] == 0 or (sigmas.dim() == 2 and sigmas.shape[1] != B):
        raise ValueError(f"{op}: sigmas must be [T] or [T, B] with T >= 1, got shape {tuple(sigmas.shape)}")
    if sigmas.device != x2.device:
        raise ValueError(f"{op}: sigmas is on {sigmas.device} but x is on {x2.device}")
    sig = sigmas.to(_compute_dtype(x2))
    sig = (sig[:, None] if sig.dim() == 1 else sig).expand(sig.shape[0], B).contiguous()
    if _checks_on_values(sig) and B > 0:
        _check_values(sig[0], "sigmas[0]", op, allow_zero=False, allow_inf=False)
        _check_values(sig[1:], "sigmas[1:]", op, allow_zero=True, allow_inf=False)
    params = _gaussian_args(g, x2, op)
    if B == 0:
        return x.new_empty((sig.shape[0],) + tuple(x.shape))
    out = _backends.resolve(backend, x2.device).gaussian_trajectory(x2, *params, sig)
    return out.reshape((sig.shape[0],) + tuple(x.shape))


# ----------------------------------------------------------------------------- mixture ops


def _mixture(x, sigma, m, need_denoised, need_weights, backend, op):
    x2 = _flatten(x, m.dim, op)
    B = x2.shape[0]
    s = _rows(sigma, B, x2, "sigma", op)
    params = _mixture_args(m, x2, op)
    if B == 0:
        cd = _compute_dtype(x2)
        return x2.new_empty(x2.shape), x2.new_empty((0,), dtype=cd), x2.new_empty((0, m.num_components), dtype=cd), s
    den, logp, w = _backends.resolve(backend, x2.device).mixture_posterior(x2, *params, s, need_denoised, need_weights)
    return den, logp, w, s


def mixture_denoise(x, sigma: Sigma, m, return_weights: bool = False, backend: str = "auto"):
    """Posterior mean under the mixture m: sum_k w_k(x) D_k(x). With return_weights, also the
    posterior component weights [B, K]."""
    den, _, w, _ = _mixture(x, sigma, m, True, return_weights, backend, "mixture_denoise")
    den = den.reshape(x.shape)
    return (den, w) if return_weights else den


def mixture_score(x, sigma: Sigma, m, backend: str = "auto"):
    """Score of the noised mixture: (D(x) - x) / sigma^2. x [B, *shape]."""
    den, _, _, s = _mixture(x, sigma, m, True, False, backend, "mixture_score")
    if x.shape[0] == 0:
        return torch.empty_like(x)
    x2 = x.reshape(den.shape).to(s.dtype)
    return ((den.to(s.dtype) - x2) / (s * s)[:, None]).to(x.dtype).reshape(x.shape)


def mixture_logp(x, sigma: Sigma, m, backend: str = "auto"):
    """log p_sigma(x) of the noised mixture, [B] in the compute dtype."""
    _, logp, _, _ = _mixture(x, sigma, m, False, False, backend, "mixture_logp")
    return logp
