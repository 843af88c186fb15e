"""Backends, inputs, truth and the one tolerance function per dtype of the conformance suite.

Error measures (the same for every backend; `tol(dtype)` is the only tolerance):
- Gaussian ops, per row b:  |out_b - truth_b| / scale_b <= tol(x dtype), where
  scale_b = |truth_b| + (largest gain of the map) |y_b| + |b mu|: relative to the largest term
  the spectral map adds up (a y, U diag(f) c, b mu; docs/architecture.md, section 1). Where those
  terms cancel (the score at small sigma with residual_var 0: a y and the in-span part are both
  ~|y| / sigma^2) no float32 evaluation order does better than a few ulps of the largest term.
  At full rank there are no residual directions, so the residual gain is not a term.
- mixture logp, per row: |logp - truth| <= tol(compute dtype) * (|truth| + the largest
  quadratic form + log-determinant of a component with weight): the logits are those terms.
- mixture weights, per row: total variation <= 1e-3 (float32 compute; the spec, at every sigma,
  near ties included) or 1e-9 (float64); components with log weight -inf get exactly 0.
- mixture denoised, per row: |out - truth| <= tol(x dtype) * (|x| + max_k |D_k|) + 2 TV_b max_k
  |D_k - truth|, TV_b the row's measured weight error: the denoised mean is the weighted sum of the
  component denoisers D_k, so a weight error moves it by at most that much.
- mixture score (the public gk.mixture_score), per row: |out - truth| <= tol(x dtype) (|truth| +
  max_k gain_k |y_k|) + 2 TV_b max_k |s_k - truth|, maxima over the components with truth weight
  > 1e-12, s_k = -(Sigma_k + sigma^2 I)^-1 y_k their scores (truth = sum_k w_k s_k), gain_k the
  largest 1 / (variance + sigma^2) of component k, TV_b the row's measured weight error (this
  backend's weights): for one component exactly the Gaussian score's bound above; a weight error
  moves the weighted sum of the s_k by at most 2 TV times their spread.
- local_posterior, per row b and pixel u (norms over the C channels): |out - truth| <= allowed,
  denoise: tol(x dtype) (|x_u| + max_c |value_c|) + 2 TV max_c |value_c - truth_u|,
  score:   (tol(x dtype) max_c |value_c - x_u| + 2 TV max_c |value_c - truth_u|) / sigma^2
           + tol(x dtype) |truth_u|,
  maxima over the candidates c with truth weight > 1e-12, TV the weights' bound above (1e-3
  float32 compute, 1e-9 float64): a pixel's output is the weighted mean of its candidates'
  values (minus x_u), so a weight error of TV moves it by at most 2 TV times their spread.
  A NaN anywhere in x[b] makes all of out[b] NaN.
- NaN: outputs are NaN exactly where the truth is NaN (NaN rows of x), never -inf; other rows
  are checked as usual.

tol: float64 1e-10 (the kernels reach ~1e-14; a float32 constant in a float64 path shows);
float32 1e-5 (~100 ulp: sums over D <= 3072 terms); float16 1.5e-3 and bfloat16 1e-2 (the
computation is float32 and the truth sees the same rounded x: what is left is the output's
rounding, half an ulp = 2^-11 and 2^-8 relative).
"""
from __future__ import annotations

import math
import os

import torch

from gsa_kernels import reference
from gsa_kernels._core import _backends
from gsa_kernels._core._contract import LocalMode, LocalPadding, SpectralKind, compute_dtype

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
WEIGHTS_TV = {torch.float64: 1e-9, torch.float32: 1e-3}


def tol(dtype):
    return TOL[dtype]


# ----------------------------------------------------------------------------- backends and devices


def device_type():
    """"cuda" when GSA_CONFORMANCE_DEVICE=cuda (then triton and cuda run on CUDA tensors,
    compiled; an error if no GPU is visible); else "cpu" (triton through the interpreter, cuda
    through the SIMT emulation)."""
    if os.environ.get("GSA_CONFORMANCE_DEVICE") == "cuda":
        if not torch.cuda.is_available():  # asked for the GPU: the CPU stand-ins must not pass for it
            raise RuntimeError("GSA_CONFORMANCE_DEVICE=cuda but torch sees no CUDA device")
        return "cuda"
    return "cpu"


def backends():
    return ("triton", "cuda") if device_type() == "cuda" else ("reference", "cpu", "triton", "cuda")


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel(backend, op):
    """The backend's kernel of `op` through the one dispatch point (_backends.resolve)."""
    return _backends.resolve(backend, torch.device(device_type()), op)


def split_kernel(kernel, K, parts):
    """The mixture_posterior kernel run the way the scale-out paths run it (blocks of a points
    file, shards, ranks): the K components cut into `parts` near-equal parts, one launch each,
    merged by gsa_kernels._scaleout.partial.split_posterior."""
    from gsa_kernels._scaleout import partial

    bounds = [i * (K // parts) + min(i, K % parts) for i in range(parts + 1)]
    return lambda *args: partial.split_posterior(kernel, *args, bounds)


def cast(args, dtype):
    """x (args[0]) to dtype, every other floating tensor to the compute dtype, all on the test
    device; integer tensors (labels), floats and flags unchanged."""
    cd, dev = compute_dtype(dtype), device_type()
    out = [args[0].to(dtype).to(dev)]
    for a in args[1:]:
        out.append((a.to(cd) if a.is_floating_point() else a).to(dev) if isinstance(a, torch.Tensor) else a)
    return out


def as_f64(args):
    return [(a.to("cpu", torch.float64) if a.is_floating_point() else a.cpu()) if isinstance(a, torch.Tensor) else a
            for a in args]


# ----------------------------------------------------------------------------- checks


def _nan_rows_match(out, truth, what):
    """Same NaN positions as the truth (NaN rows of x), no infinities where the truth is finite.
    Returns the rows without NaN in the truth, for the numeric checks."""
    out = out.double().cpu()
    nan_t = torch.isnan(truth)
    bad = (torch.isnan(out) != nan_t).nonzero()
    assert bad.numel() == 0, f"{what}: NaN pattern differs from the truth at {bad[:4].tolist()}"
    bad = (torch.isinf(out) & torch.isfinite(truth)).nonzero()
    assert bad.numel() == 0, f"{what}: infinite where the truth is finite, at {bad[:4].tolist()}"
    rows = ~nan_t.reshape(nan_t.shape[0], -1).any(1)
    return out[rows], truth[rows], rows


def _gains(kind, lam, sigma_from, sigma_to, scale_from, scale_to):
    """|gain| of the spectral map along eigen-directions of variance lam [1, n]; per-row [B, 1] args."""
    if kind == SpectralKind.DENOISE:
        return lam / (lam + sigma_from**2)
    if kind == SpectralKind.SCORE:
        return 1.0 / (lam + sigma_from**2)
    inf = torch.isinf(sigma_from)
    finite = torch.sqrt((lam + sigma_to**2) / (lam + torch.where(inf, 1.0, sigma_from) ** 2)) / scale_from
    return scale_to.abs() * torch.where(inf, torch.sqrt(lam + sigma_to**2), finite)


def gaussian_scale(args64, kind):
    """The terms of scale_b (module docstring) besides |truth_b|, [B], for gaussian_map args (float64)."""
    x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, _ = args64
    D, r = basis.shape
    lam = eigvals if r == D else torch.cat([eigvals, torch.tensor([residual_var], dtype=torch.float64)])
    rows = [t[:, None] for t in (sigma_from, sigma_to, scale_from, scale_to)]
    gain = _gains(kind, lam[None], *rows).max(1).values if lam.numel() else torch.zeros(x.shape[0], dtype=torch.float64)
    if kind == SpectralKind.FLOW:
        y = torch.where(torch.isinf(sigma_from)[:, None], x, x / scale_from[:, None] - mean)
        mu_term = scale_to.abs() * mean.norm()
    else:
        y = x - mean
        mu_term = (1.0 if kind == SpectralKind.DENOISE else 0.0) * mean.norm() * torch.ones(x.shape[0], dtype=torch.float64)
    return gain * torch.nan_to_num(y, nan=0.0).norm(dim=1) + mu_term


def labeled_scale(args64, kind):
    """gaussian_scale of each row under its own component, for gaussian_map_labeled args (float64)."""
    x, labels, means, bases, eigvals, residual_var, *rows, _ = args64
    scale = torch.zeros(x.shape[0], dtype=torch.float64)
    for k in labels.unique().tolist():
        sel = labels == k
        scale[sel] = gaussian_scale((x[sel], means[k], bases[k], eigvals[k], float(residual_var[k]), *[v[sel] for v in rows],
                                     kind), kind)
    return scale


def steps_as_rows(labels_args64):
    """gaussian_map_labeled flow args whose rows are the T x B (t, b) pairs of trajectory args
    (x, labels, means, bases, eigvals, residual_var, sigmas): step t is the flow from sigmas[0]
    to sigmas[t], scales 1."""
    x, labels, means, bases, eigvals, residual_var, sigmas = labels_args64
    T, B = sigmas.shape
    rows = lambda v: v.expand(T, *v.shape).reshape(T * B, *v.shape[1:])
    one = torch.ones(T * B, dtype=torch.float64)
    return (rows(x), rows(labels), means, bases, eigvals, residual_var, rows(sigmas[0]), sigmas.reshape(-1), one, one,
            SpectralKind.FLOW)


def check_rows(out, truth, scale, dtype, what):
    """Per-row |out - truth| <= tol(dtype) * (|truth| + scale) (gaussian_scale); NaN rows as the truth."""
    out, truth, rows = _nan_rows_match(out, truth, what)
    scale = scale[rows]
    out, truth = out.reshape(out.shape[0], -1), truth.reshape(truth.shape[0], -1)
    if out.shape[0] == 0:
        return
    err = (out - truth).norm(dim=1) / (truth.norm(dim=1) + scale).clamp_min(1e-300)
    worst = int(err.argmax())
    assert err[worst] <= tol(dtype), f"{what}: row {worst}: relative error {err[worst].item():.3g} > {tol(dtype):.3g}"


def mixture_terms(args64):
    """Per component, float64: quadratic form + log-determinant of the logits [B, K] and the
    component denoisers D_k [B, K, D]."""
    x, means, bases, eigvals, residual_var, log_weights, sigma = args64
    s2 = sigma[:, None] ** 2
    y, c, perp, logpdf = reference.component_terms(x, s2, means, bases, eigvals, residual_var)
    terms = -2 * logpdf  # quadratic form + log det + D log 2 pi: all positive but the logs
    logdet = torch.log(eigvals[None] + s2[:, :, None]).sum(-1) + (x.shape[1] - bases.shape[2]) * torch.log(residual_var[None] + s2)
    terms = terms - logdet + logdet.abs()
    d_k = means[None] + torch.einsum("bkr,kdr->bkd", c * (eigvals[None] / (eigvals[None] + s2[:, :, None])), bases)
    if perp is not None:
        d_k = d_k + (residual_var[None] / (residual_var[None] + s2))[:, :, None] * perp
    return terms, d_k


def check_mixture(den, logp1, w_empty, den_empty, logp2, weights, args, args64, dtype, what, weights_tv=None):
    cd = compute_dtype(dtype)
    B, K = args[0].shape[0], args[1].shape[0]
    den_t, logp_t, w_t = reference.mixture_posterior(*args64, True, True)
    assert den.dtype == dtype and den.shape == args[0].shape, f"{what}: denoised {den.dtype} {tuple(den.shape)}"
    assert logp1.dtype == cd and logp1.shape == (B,) and logp2.dtype == cd and logp2.shape == (B,), f"{what}: logp"
    assert weights.dtype == cd and weights.shape == (B, K), f"{what}: weights {weights.dtype} {tuple(weights.shape)}"
    assert w_empty.numel() == 0 and den_empty.numel() == 0, f"{what}: an output not asked for is not empty"
    terms, d_k = mixture_terms(args64)
    support = w_t > 1e-12  # [B, K]
    lp_scale = logp_t.abs() + torch.where(support, terms, 0.0).max(1).values
    for name, logp in (("logp (with denoised)", logp1), ("logp (with weights)", logp2)):
        out, truth, rows = _nan_rows_match(logp, logp_t, f"{what}: {name}")
        err = ((out - truth).abs() / lp_scale[rows]).max().item() if rows.any() else 0.0
        assert err <= tol(cd), f"{what}: {name}: relative error {err:.3g} > {tol(cd):.3g}"
    w, w_truth, rows = _nan_rows_match(weights, w_t, f"{what}: weights")
    tv = torch.zeros(B, dtype=torch.float64)
    if rows.any():
        tv[rows] = 0.5 * (w - w_truth).abs().sum(1)
        worst = int(tv.argmax())
        bound = WEIGHTS_TV[cd] if weights_tv is None else weights_tv
        assert tv[worst] <= bound, f"{what}: weights row {worst}: total variation {tv[worst].item():.3g} > {bound:.3g}"
    excluded = torch.isinf(args64[5])
    if excluded.any():
        assert (weights.cpu()[rows][:, excluded] == 0).all(), f"{what}: a component with log weight -inf has weight > 0"
    out, truth, rows = _nan_rows_match(den, den_t, f"{what}: denoised")
    if rows.any():
        spread_support = support | (weights.double().cpu() > 1e-12)
        d_norm = torch.where(spread_support, d_k.norm(dim=2), 0.0).max(1).values
        spread = torch.where(spread_support, (d_k - den_t[:, None]).norm(dim=2), 0.0).max(1).values
        allowed = tol(dtype) * (args64[0].norm(dim=1) + d_norm) + 2 * tv * spread
        err = (out - truth).norm(dim=1) / allowed[rows]
        worst = int(err.argmax())
        assert err[worst] <= 1.0, f"{what}: denoised row {worst}: error {(out - truth).norm(dim=1)[worst].item():.3g} > allowed {allowed[rows][worst].item():.3g}"



def score_terms(args64):
    """(truth [B, D], component scores s_k [B, K, D], the Gaussian scale max_k gain_k |y_k| over
    the supported components [B], support [B, K]) of the mixture score, float64 args (x, means,
    bases, eigvals, residual_var, log_weights, sigma); s_k in the per-direction form."""
    x, means, bases, eigvals, residual_var, log_weights, sigma = args64
    _, _, w_t = reference.mixture_posterior(*args64, False, True)
    s2 = (sigma**2)[:, None]
    D, r = bases.shape[1:]
    s_k = torch.stack([reference._score(x - means[k], s2, bases[k], eigvals[k], float(residual_var[k]))
                       for k in range(means.shape[0])], 1)
    low = eigvals.min(1).values if r else torch.full_like(residual_var, math.inf)
    smallest = torch.minimum(low, residual_var) if r < D else low  # [K]
    gain = 1.0 / (smallest[None] + s2)  # [B, K]
    support = w_t > 1e-12
    scale = torch.where(support, gain * (x[:, None] - means[None]).norm(dim=2), 0.0).max(1).values
    return (w_t[:, :, None] * s_k).sum(1), s_k, scale, support, w_t


def check_score(out, weights, args64, dtype, what):
    """gk.mixture_score's out [B, *shape] (dtype) against the float64 truth sum_k w_k s_k (module
    docstring); weights: this backend's posterior weights [B, K] (their TV enters the bound)."""
    truth, s_k, scale, support, w_t = score_terms(args64)
    assert out.dtype == dtype and out.shape[0] == truth.shape[0], f"{what}: score {out.dtype} {tuple(out.shape)}"
    out = out.double().cpu().reshape(truth.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite score"
    tv = 0.5 * (weights.double().cpu() - w_t).abs().sum(1)
    spread = torch.where(support, (s_k - truth[:, None]).norm(dim=2), 0.0).max(1).values
    allowed = tol(dtype) * (truth.norm(dim=1) + scale) + 2 * tv * spread
    err = (out - truth).norm(dim=1)
    worst = int((err / allowed).argmax())
    assert err[worst] <= allowed[worst], (f"{what}: row {worst}: error {err[worst].item():.3g} > allowed "
                                          f"{allowed[worst].item():.3g} (relative to |truth| {(err / truth.norm(dim=1))[worst].item():.3g})")


def local_allowed(args64, truth):
    """The allowed error [B, HW] of local_posterior per pixel (module docstring), for float64
    args and the float64 truth [B, C, H, W] (rows with NaN get 0: they are checked for NaN only).
    A second pass over the reference's candidate blocks with the truth's logsumexp."""
    x, images, sigma, P, mode, padding, kind = args64
    B, C, H, W = x.shape
    nan_rows = torch.isnan(x).flatten(1).any(1)
    x = torch.where(nan_rows[:, None, None, None], 0.0, x)
    mode, padding = LocalMode(mode), LocalPadding(padding)
    diff, lse = reference._local_posterior_f64(x, images, sigma, P, mode, padding)
    s2 = sigma.reshape(B, 1, 1) ** 2
    xu = x.reshape(B, C, H * W, 1)
    out_u = xu + diff[..., None]
    v_max, vx_max, spread = (torch.zeros((B, H * W), dtype=torch.float64) for _ in range(3))
    for d2, values, _ in reference._local_blocks(x, images, P // 2, mode, padding):
        support = torch.exp(-d2 / (2 * s2) - lse[..., None]) > 1e-12  # [B, HW, M]
        keep = lambda t, support=support: torch.where(support, t, 0.0).amax(-1)
        v_max = torch.maximum(v_max, keep(values.norm(dim=0).expand_as(support)))
        vx_max = torch.maximum(vx_max, keep((values[None] - xu).norm(dim=1)))
        spread = torch.maximum(spread, keep((values[None] - out_u).norm(dim=1)))
    t = torch.nan_to_num(truth, nan=0.0).reshape(B, C, H * W).norm(dim=1)
    return v_max, vx_max, spread, t, s2[:, :, 0], nan_rows


def check_local(out, truth, args64, dtype, what, allowed_terms=None):
    """local_posterior's out [B, C, H, W] (dtype) against the float64 truth, per pixel."""
    x, images, sigma, P, mode, padding, kind = args64
    B, C, H, W = x.shape
    assert out.dtype == dtype and out.shape == x.shape, f"{what}: out {out.dtype} {tuple(out.shape)}"
    out = out.double().cpu()
    nan_rows = torch.isnan(x).flatten(1).any(1)
    assert torch.isnan(out[nan_rows]).all(), f"{what}: a row with NaN in x is not all NaN"
    assert not torch.isnan(out[~nan_rows]).any(), f"{what}: NaN in a row without NaN in x"
    assert not torch.isinf(out[~nan_rows]).any(), f"{what}: infinite output in a row without NaN in x"
    v_max, vx_max, spread, t, s2, _ = allowed_terms if allowed_terms is not None else local_allowed(args64, truth)
    tv = WEIGHTS_TV[compute_dtype(dtype)]
    xn = torch.nan_to_num(x, nan=0.0).reshape(B, C, H * W).norm(dim=1)
    if SpectralKind(kind) == SpectralKind.DENOISE:
        allowed = tol(dtype) * (xn + v_max) + 2 * tv * spread
    else:
        allowed = (tol(dtype) * vx_max + 2 * tv * spread) / s2 + tol(dtype) * t
    err = (out - truth).reshape(B, C, H * W).norm(dim=1)
    ratio = (err / allowed.clamp_min(1e-300))[~nan_rows]
    if ratio.numel() == 0:
        return
    worst = int(ratio.argmax())
    b, u = divmod(worst, H * W)  # b counts the rows without NaN
    assert ratio.flatten()[worst] <= 1.0, (f"{what}: row {b} pixel {divmod(u, W)}: error {err[~nan_rows].flatten()[worst].item():.3g} "
                                           f"> allowed {allowed[~nan_rows].flatten()[worst].item():.3g}")
