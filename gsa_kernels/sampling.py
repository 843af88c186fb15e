"""Minimal reference samplers in the EDM convention, and analytical teleportation.

A denoiser is any callable `denoiser(x, sigma) -> x0` with x [B, *shape] and sigma a [B]
tensor (per-sample noise levels, on x's device, float64 for float64 x and float32 otherwise).
That is the k-diffusion model convention, so k-diffusion-wrapped networks, `GaussianModel` and
`GaussianMixture` instances (which accept a float or a [B] sigma) and `HybridDenoiser` all plug
in. Samplers integrate the probability-flow ODE dx/dsigma = (x - denoiser(x, sigma)) / sigma
over a descending schedule `sigmas` [N + 1]: x is the state at sigmas[0], the return value the
state at sigmas[-1] (use `schedules.karras(N)`, which ends at 0).

Teleportation (Wang & Vastola, arXiv 2412.09726): the first steps of a sampler, where the
data distribution is well approximated by a Gaussian, are replaced by one closed-form jump
`gaussian_flow` of that Gaussian's ODE (zero network evaluations).

Model evaluations (NFE) per schedule of N steps: euler N, dpmpp_2m N, heun 2N - 1 when the
schedule ends at 0 (no correction on the last step), else 2N. `sample()` reports them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import ops, schedules
from .local import LocalDenoiser  # a local score machine with its patch sizes (HybridDenoiser's analytic)
from .models import GaussianMixture, GaussianModel

Denoiser = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- helpers


def _schedule(sigmas) -> list:
    """Validated descending schedule as Python floats (the step coefficients are computed in
    float64 whatever the dtype of x)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64) if not isinstance(sigmas, torch.Tensor) else sigmas.detach()
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-d schedule, got shape {tuple(s.shape)}")
    vals = s.double().cpu().tolist()
    if any(math.isnan(v) or math.isinf(v) or v < 0 for v in vals):
        raise ValueError("sigmas must be finite and >= 0")
    if any(b >= a for a, b in zip(vals, vals[1:])):
        raise ValueError("sigmas must be strictly decreasing")
    return vals


def _sigma_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sigma_rows(x, s: float):
    return torch.full((x.shape[0],), s, dtype=_sigma_dtype(x), device=x.device)


def _check_x(x):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must be [B, *shape]")


class CountingDenoiser:
    """Wraps a denoiser and counts its calls in `.nfe` (one call = one batched evaluation)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x, sigma, **kwargs):
        self.nfe += 1
        return self.denoiser(x, sigma, **kwargs)


def expected_nfe(method: str, sigmas) -> int:
    """Model evaluations that `method` spends on the schedule `sigmas`."""
    s = _schedule(sigmas)
    n = len(s) - 1
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {tuple(SAMPLERS)}, got {method!r}")
    if method == "heun" and n > 0:
        return 2 * n - (1 if s[-1] == 0 else 0)
    return n


# ----------------------------------------------------------------------------- samplers


def euler(denoiser: Denoiser, x: torch.Tensor, sigmas, *, callback=None) -> torch.Tensor:
    """Euler's method on the PF-ODE: one model evaluation per step. x at sigmas[0] -> x at sigmas[-1]."""
    _check_x(x)
    s = _schedule(sigmas)
    for i in range(len(s) - 1):
        den = denoiser(x, _sigma_rows(x, s[i]))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s[i], "denoised": den})
        x = x + (s[i + 1] - s[i]) / s[i] * (x - den)
    return x


def heun(denoiser: Denoiser, x: torch.Tensor, sigmas, *, callback=None) -> torch.Tensor:
    """Heun's 2nd-order method, EDM Algorithm 1 (deterministic, no churn): an Euler step
    corrected with the slope at its end point, except on a final step to sigma = 0."""
    _check_x(x)
    s = _schedule(sigmas)
    for i in range(len(s) - 1):
        den = denoiser(x, _sigma_rows(x, s[i]))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s[i], "denoised": den})
        dt = s[i + 1] - s[i]
        d = (x - den) / s[i]
        x_euler = x + dt * d
        if s[i + 1] == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoiser(x_euler, _sigma_rows(x, s[i + 1]))) / s[i + 1]
            x = x + dt * 0.5 * (d + d_next)
    return x


def dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas, *, callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction), as k-diffusion's
    sample_dpmpp_2m: exact exponential integration in lambda = -log(sigma) with the denoiser
    extrapolated linearly from the previous step; first order on the first and on a final
    step to sigma = 0. One model evaluation per step."""
    _check_x(x)
    s = _schedule(sigmas)
    prev = None  # denoised at the previous step
    for i in range(len(s) - 1):
        den = denoiser(x, _sigma_rows(x, s[i]))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s[i], "denoised": den})
        if s[i + 1] == 0:
            x = den
        else:
            h = math.log(s[i]) - math.log(s[i + 1])  # step in lambda = -log(sigma)
            if prev is None:
                target = den
            else:
                r = (math.log(s[i - 1]) - math.log(s[i])) / h
                target = (1 + 0.5 / r) * den - (0.5 / r) * prev
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * target
        prev = den
    return x


SAMPLERS = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}


# ----------------------------------------------------------------------------- teleportation


def teleport(x: torch.Tensor, sigma_from, sigma_to, g, scale_from=1.0, scale_to=1.0, backend: str = "auto", *,
             labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Jump x from sigma_from to sigma_to along the closed-form PF-ODE of the Gaussian g
    (gk.gaussian_flow): states x = scale * (x0 + sigma * eps) as in schedules.py.
    sigma_from = math.inf means x is unit noise eps. Floats or [B] tensors; x [B, *shape].
    Class-conditional: g a GaussianMixture with one component per class (e.g.
    GaussianMixture.fit_per_class) and labels [B] int64: row b jumps along component
    labels[b]'s flow (the weights play no part)."""
    if labels is not None:
        if not isinstance(g, GaussianMixture):
            raise TypeError(f"teleport with labels needs a GaussianMixture with one component per class (e.g. "
                            f"GaussianMixture.fit_per_class), got {type(g).__name__}")
        return ops.gaussian_flow(x, sigma_from, sigma_to, g, labels=labels, scale_from=scale_from, scale_to=scale_to,
                                 backend=backend)
    if isinstance(g, GaussianMixture):
        raise TypeError("teleport needs a GaussianModel; for a mixture use gaussian_approximation(mixture), or pass "
                        "labels= to use one component per class")
    return ops.gaussian_flow(x, sigma_from, sigma_to, g, scale_from, scale_to, backend=backend)


def gaussian_approximation(m: GaussianMixture) -> GaussianModel:
    """The Gaussian with the mixture's mean and covariance (computed in float64 without
    forming K D x D matrices; the result has the mixture's dtype). Its closed-form flow is the
    teleport for a mixture data model: at high noise the mixture's score tends to its score."""
    if not isinstance(m, GaussianMixture):
        raise TypeError(f"expected a GaussianMixture, got {type(m).__name__}")
    means, bases, eigvals = m.means.double(), m.bases.double(), m.eigvals.double()
    residual_var, w = m.residual_var.double(), m.log_weights.double().exp()
    K, D, r = bases.shape
    mean = w @ means
    iso = float(w @ residual_var)  # isotropic part of the covariance
    # Sigma - iso I = A diag(var) A^T, columns U_k with signed variances w_k (lam_k - residual_var_k)
    # and mu_k - mean with variances w_k: a rank <= K (r + 1) correction.
    A = torch.cat([bases.permute(1, 0, 2).reshape(D, K * r), (means - mean).T], 1)
    var = torch.cat([(w[:, None] * (eigvals - residual_var[:, None])).reshape(K * r), w])
    if A.shape[1] >= D:
        low = (A * var) @ A.T
        evals, evecs = torch.linalg.eigh(0.5 * (low + low.T))
    else:
        q, rr = torch.linalg.qr(A)
        small = (rr * var) @ rr.T
        evals, vecs = torch.linalg.eigh(0.5 * (small + small.T))
        evecs = q @ vecs
    evals, evecs = (evals + iso).clamp_min(0).flip(0), evecs.flip(1)
    return GaussianModel(mean.to(m.dtype), evecs.to(m.dtype), evals.to(m.dtype), iso)


def _teleport_gaussian(denoiser, gaussian, labels=None):
    """The model a teleport jumps with: `gaussian`, else the denoiser if it is a model. A
    GaussianMixture is replaced by its moment-matched Gaussian, except with labels: then it is
    taken as one component per class (and a GaussianModel serves every class)."""
    g = gaussian if gaussian is not None else denoiser
    if isinstance(g, GaussianMixture):
        return g if labels is not None else gaussian_approximation(g)
    if isinstance(g, GaussianModel):
        return g
    raise ValueError("teleporting a general denoiser needs gaussian= (e.g. GaussianModel.fit(training_data), or "
                     "with labels GaussianMixture.fit_per_class(training_data, training_labels))")


def teleport_with_model(x, sigma_from, sigma_to, denoiser, gaussian, labels=None, scale_from=1.0, scale_to=1.0):
    """teleport() with the Gaussian _teleport_gaussian picks for `denoiser` / `gaussian` (sample() and the
    adapters in integrations/)."""
    g = _teleport_gaussian(denoiser, gaussian, labels)
    return teleport(x, sigma_from, sigma_to, g, scale_from, scale_to,
                    labels=labels if isinstance(g, GaussianMixture) else None)


@dataclass
class SampleResult:
    """x: the samples at sigmas[-1]; nfe: model evaluations spent; sigmas: the schedule the
    sampler ran (after the teleport); teleport: (sigma_from, sigma_to) or None."""

    x: torch.Tensor
    nfe: int
    sigmas: torch.Tensor
    teleport: Optional[tuple]


def sample(denoiser: Denoiser, x: torch.Tensor, sigmas, method: str = "heun", *, teleport_to: Optional[float] = None,
           skip_fraction: Optional[float] = None, gaussian=None, labels: Optional[torch.Tensor] = None,
           callback=None) -> SampleResult:
    """Sample with `method` ("euler", "heun", "dpmpp_2m") from x at sigmas[0] down the schedule,
    optionally replacing the first steps with one analytical teleport:

    - teleport_to=sigma: jump to sigma, then run [sigma] + the schedule's sigmas below sigma;
    - skip_fraction=f: jump onto the grid point after f * N of the N steps (rounded half up,
      schedules.skip_index).

    The teleport uses `gaussian` (a GaussianModel, or a GaussianMixture whose moment-matched
    Gaussian is used); by default the denoiser itself if it is a GaussianModel or a mixture
    (pass gaussian= precomputed when calling repeatedly: the moment match is an eigh of size D).
    Class-conditional: labels [B] int64 go to the denoiser as `denoiser(x, sigma, labels=labels)`;
    a GaussianMixture `gaussian` is then one component per class (GaussianMixture.fit_per_class:
    row b jumps with component labels[b], not with the moment-matched Gaussian), while a
    GaussianModel serves every class alike.
    Returns a SampleResult with the samples and the NFE count (the teleport costs none)."""
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {tuple(SAMPLERS)}, got {method!r}")
    if teleport_to is not None and skip_fraction is not None:
        raise ValueError("give teleport_to or skip_fraction, not both")
    full = torch.tensor(_schedule(sigmas), dtype=torch.float64)
    run, jump = full, None
    if skip_fraction is not None:
        k = schedules.skip_index(len(full) - 1, skip_fraction)
        if k > 0:
            run = full[k:]
    elif teleport_to is not None:
        run = schedules.truncate(full, teleport_to)
    if float(run[0]) < float(full[0]):
        jump = (float(full[0]), float(run[0]))
        x = teleport_with_model(x, jump[0], jump[1], denoiser, gaussian, labels)
    counted = CountingDenoiser(denoiser if labels is None else functools.partial(denoiser, labels=labels))
    out = SAMPLERS[method](counted, x, run, callback=callback)
    return SampleResult(out, counted.nfe, run, jump)


# ----------------------------------------------------------------------------- hybrid denoiser


class HybridDenoiser:
    """Answers with the analytic denoiser (a GaussianModel or GaussianMixture) for samples whose
    sigma is above `sigma_threshold` and with the network at or below it. Callable as
    `(x, sigma, **extra_args)` with sigma a float or [B] tensor, so it is also a k-diffusion
    model (extra_args, e.g. class labels, go to the network). Class-conditional: with
    `labels_key` (the extra_args name of the network's class labels, e.g. "labels",
    "class_labels", "class_cond") and a GaussianMixture of one component per class as
    `analytic`, row b's analytic answer is component extra_args[labels_key][b]'s Gaussian
    denoiser. A batch with sigmas on both sides runs the network on the whole batch, then
    overwrites the high-noise rows. `network_calls` / `analytic_calls` count evaluations."""

    def __init__(self, network: Denoiser, analytic, sigma_threshold: float, *, labels_key: Optional[str] = None):
        if not isinstance(analytic, (GaussianModel, GaussianMixture, LocalDenoiser)):
            raise TypeError(f"analytic must be a GaussianModel, GaussianMixture or gsa_kernels.local.LocalDenoiser, "
                            f"got {type(analytic).__name__}")
        if not sigma_threshold >= 0:
            raise ValueError(f"sigma_threshold must be >= 0, got {sigma_threshold}")
        if labels_key is not None and not isinstance(analytic, GaussianMixture):
            raise TypeError("labels_key needs analytic = a GaussianMixture with one component per class "
                            "(GaussianMixture.fit_per_class)")
        self.network, self.analytic, self.sigma_threshold = network, analytic, float(sigma_threshold)
        self.labels_key = labels_key
        self.network_calls = self.analytic_calls = 0

    def _analytic(self, x, sigma, labels):
        if labels is None:
            return self.analytic(x, sigma)
        return ops.gaussian_denoise(x, sigma, self.analytic, labels=labels)

    def __call__(self, x, sigma, **extra_args):
        labels = None
        if self.labels_key is not None:
            if extra_args.get(self.labels_key) is None:
                raise ValueError(f"HybridDenoiser(labels_key={self.labels_key!r}) needs the class labels as "
                                 f"{self.labels_key}= [B]")
            labels = extra_args[self.labels_key]
        s = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma), device=x.device)
        high = (s.to(x.device).reshape(-1) > self.sigma_threshold).expand(x.shape[0])
        if bool(high.all()):
            self.analytic_calls += 1
            return self._analytic(x, sigma, labels)
        out = self.network(x, sigma, **extra_args)
        self.network_calls += 1
        if bool(high.any()):
            rows = s.expand(x.shape[0])[high] if s.dim() else s
            out = out.clone()
            out[high] = self._analytic(x[high], rows, None if labels is None else labels[high]).to(out.dtype)
            self.analytic_calls += 1
        return out
