"""Mergeable partial posteriors of a Gaussian mixture (the split-K online-softmax state, public).

For the components k of some subset of a mixture (a shard), with logits
`l_k(x) = log_weights_k + log N(x; mu_k, Sigma_k + sigma^2 I)`, a MixturePartial holds per row

    max_logit [B]     M = max_k l_k                      (-inf: no component with any weight)
    sum_exp   [B]     S = sum_k exp(l_k - M)             (0 for an empty subset)
    weighted  [B, D]  W = sum_k exp(l_k - M) D_k(x)      (D_k: component k's posterior mean)

so that logp = M + log S and denoised = W / S. Two states merge exactly by rescaling both to the
larger M. A shard's posterior (denoised_s, logp_s) from the mixture kernel already is such a
state (M = logp_s, S = 1, W = denoised_s): no kernel knows about partials.

One exactness rule for every merge (blocks of a points file, shards, ranks): states are carried
in float64, M as a double-double (max_logit + max_logit_lo). A kernel's logp is exact only up to
its rounding at |logp| ~ |x - mu|^2 / 2 sigma^2 (1e7 at sigma 0.002, D 784: ~0.4 in float32,
~2e-9 in float64), harmless inside one kernel (only logit differences enter its weights) but it
would tilt the weights of two parts by that much. So every part's M is refined (exact_state):
the kernel's weights name each row's heaviest component k* (weight w* >= 1 / K_part, accurate to
its dtype's relative rounding), its logit l_k* is recomputed from the differences x - mu_k* in
float64 (float32 kernels) or float64 plus a long-double rest (float64 kernels), and
M = l_k* - log w*, S = 1. Merges rescale by (hi_p - hi_top) + (lo_p - lo_top).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import ops
from .._core._args import MixtureOperand, compute_dtype, flatten, rows

__all__ = ["MixturePartial", "mixture_partial", "merge_partials"]


class MixturePartial:
    """Per-row state (max_logit [B], sum_exp [B], weighted [B, D]) of a mixture posterior over a
    subset of its components, in float64 (the module docstring: merges are exact).
    `shape` is x's per-sample shape and `dtype` x's dtype, used by denoised()."""

    def __init__(self, max_logit: torch.Tensor, sum_exp: torch.Tensor, weighted: torch.Tensor, shape, dtype,
                 max_logit_lo: torch.Tensor = None):
        self.max_logit, self.sum_exp, self.weighted = max_logit, sum_exp, weighted
        # M = max_logit + max_logit_lo (double-double): |M| reaches 1e7, where a float64 ulp
        # (2e-9) would already tilt a float64 near tie beyond its 1e-9 bound
        self.max_logit_lo = torch.zeros_like(max_logit) if max_logit_lo is None else max_logit_lo
        self.shape, self.dtype = tuple(shape), dtype

    @property
    def batch_size(self) -> int:
        return self.max_logit.shape[0]

    def logp(self) -> torch.Tensor:
        """log of the (unnormalised, if this is a shard) mixture density over the merged
        components, [B] in the compute dtype; -inf where no component has weight."""
        return (self.max_logit + (self.max_logit_lo + torch.log(self.sum_exp))).to(compute_dtype(self.dtype))

    def denoised_exact(self) -> torch.Tensor:
        """denoised() in float64, [B, D] (not rounded to x's dtype: the score subtracts x)."""
        if self.sum_exp.device.type == "cpu" and bool((self.sum_exp == 0).any()):
            raise ValueError("MixturePartial.denoised: some rows have no component with nonzero weight "
                             "(an empty shard, or only -inf log weights): merge the partials of all shards first")
        return self.weighted / self.sum_exp[:, None]

    def denoised(self) -> torch.Tensor:
        """Posterior mean over the merged components, [B, *shape] in x's dtype. A row with no
        weighted component has no posterior mean: a ValueError (CPU tensors) or NaN (CUDA);
        a NaN row of x gives a NaN row, as from the ops."""
        return self.denoised_exact().to(self.dtype).reshape((self.batch_size,) + self.shape)

    def __repr__(self):
        return f"MixturePartial(B={self.batch_size}, shape={self.shape}, dtype={self.dtype})"


def mixture_partial(x, sigma, m, backend: str = "auto") -> MixturePartial:
    """The partial posterior state of the mixture (or shard) m at x [B, *shape], noise sigma
    (float, 0-d or [B]). One kernel launch through the usual backend dispatch; a shard with no
    components (m.shard(i, n) with n > K) gives the empty state without a launch."""
    return partial_state(x, sigma, m, backend, "mixture_partial")


def partial_state(x, sigma, m, backend, op, score=False) -> MixturePartial:
    """mixture_partial; score=True: the state's weighted sum W carries the components' scores
    sum_k exp(l_k - M) s_k (ops.stable_score of each launch) instead of their denoised means, so
    that merged W / S is the whole mixture's score (gk.distributed.mixture_score)."""
    if not isinstance(m, MixtureOperand):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianMixture, got {type(m).__name__}")
    x2 = flatten(x, m.dim, op)
    # the kernel reads x in the compute dtype: a float16 denoised would be rounded twice
    xc = x2.to(compute_dtype(x2.dtype))
    B = xc.shape[0]
    if m.num_components == 0:
        rows(sigma, B, xc, "sigma", op)  # same argument checks as a launch
        return _empty(B, m.dim, xc.device, x.shape[1:], x.dtype)
    states = []
    # components in chunks: the refinement reads the kernel's weights [B, chunk]
    for chunk in _component_chunks(m, B):
        den, logp, weights, s = ops.posterior(xc, sigma, chunk, True, True, backend, op, score=score)
        states.append(exact_state(den, logp, weights, xc, chunk.means, chunk.bases, chunk.eigvals, chunk.residual_var,
                                  chunk.log_weights, s, x.shape[1:], x.dtype))
    return merge_partials(states)


WEIGHTS_BUDGET_BYTES = 64 * 2**20  # the [B, chunk] weights a refined partial reads per launch


def _component_chunks(m, B):
    """m itself, or views of consecutive components (no copy) so that B x chunk weights stay
    within WEIGHTS_BUDGET_BYTES."""
    K = m.num_components
    step = max(1, WEIGHTS_BUDGET_BYTES // (8 * max(B, 1)))
    if K <= step:
        return [m]
    chunks = []
    for k0 in range(0, K, step):
        c = type(m).__new__(type(m))  # m's class, built like m.shard: views, weights as in m (not renormalised)
        c.means, c.bases, c.eigvals = m.means[k0:k0 + step], m.bases[k0:k0 + step], m.eigvals[k0:k0 + step]
        c.residual_var, c.log_weights = m.residual_var[k0:k0 + step], m.log_weights[k0:k0 + step]
        chunks.append(c)
    return chunks


def _row_logits64(x, s2, means, bases, eigvals, residual_var, log_weights, k, extended):
    """Float64 logit log w_k + log N(x_b; mu_k, Sigma_k + s^2 I) of component k[b] for each row b,
    from the differences x - mu (as reference.component_terms, one component per row), in row
    chunks of ~32 MB of gathered bases: (hi [B], lo [B]) with hi differentiable and, when
    `extended`, lo the rest of the logit evaluated in numpy's long double (64-bit mantissa on
    x86, 113 on others: |x - mu|^2 / 2 sigma^2 of 1e7 to ~1e-11), else zeros."""
    import numpy as np

    B, D = x.shape
    r = bases.shape[2]
    step = max(1, (1 << 22) // max(1, D * max(r, 1)))
    his, los = [], []
    for b0 in range(0, B, step):
        kb = k[b0:b0 + step]
        parts = (x[b0:b0 + step], s2[b0:b0 + step], means[kb], bases[kb], eigvals[kb], residual_var[kb], log_weights[kb])
        hi = _logits_of(torch, *(t.double() for t in parts), D, r)
        his.append(hi)
        if extended:
            ld = [t.detach().cpu().double().numpy().astype(np.longdouble) for t in parts]
            lo = _logits_of(np, *ld, D, r) - hi.detach().cpu().double().numpy().astype(np.longdouble)
            los.append(torch.from_numpy(lo.astype(np.float64)).to(hi.device))
        else:
            los.append(torch.zeros_like(hi.detach()))
    if not his:
        return x.new_empty((0,), dtype=torch.float64), x.new_empty((0,), dtype=torch.float64)
    return torch.cat(his), torch.cat(los)


def _logits_of(xp, x, s2, mu, U, lam, rv, logw, D, r):
    """The per-row logits of _row_logits64 with array module xp (torch or numpy)."""
    y = x - mu
    c = xp.einsum("bd,bdr->br", y, U)
    v_low = lam + s2[:, None]
    v_perp = rv + s2
    perp_sq = 0.0 * v_perp if r == D else ((y - xp.einsum("br,bdr->bd", c, U)) ** 2).sum(-1)
    log2pi = math.log(2 * math.pi) if xp is torch else xp.log(xp.ones_like(v_perp) * 2 * xp.pi)
    return logw - 0.5 * ((c * c / v_low).sum(-1) + perp_sq / v_perp + xp.log(v_low).sum(-1) + (D - r) * xp.log(v_perp)
                         + D * log2pi)


def exact_state(den, logp, weights, x, means, bases, eigvals, residual_var, log_weights, sigma, shape, dtype):
    """The float64 MixturePartial of one kernel launch over some components (module docstring):
    den [B, D] (or [B, 0] when not asked for), logp [B], weights [B, k] (read only for a float32
    kernel), x [B, D] and sigma [B] as the kernel got them, the launch's component tensors."""
    x64, s2 = x.double(), sigma.double() ** 2
    k = weights.argmax(1)  # a NaN row's pick does not matter: its logp stays NaN
    w_top = weights.gather(1, k[:, None])[:, 0].double()
    # float64 kernels: the float64 logit's own rounding matters (1e-9 weights), so its rest too
    hi, lo = _row_logits64(x64, s2, means, bases, eigvals, residual_var, log_weights, k, logp.dtype == torch.float64)
    keep = torch.isnan(logp) | torch.isinf(logp)  # NaN rows and rows without weight keep the kernel's value
    state = from_posterior(den.double(), torch.where(keep, logp.double(), hi - torch.log(w_top)), shape, dtype)
    state.max_logit_lo = torch.where(keep, torch.zeros_like(lo), lo)
    return state


def split_posterior(kernel, x, means, bases, eigvals, residual_var, log_weights, sigma, need_denoised, need_weights,
                    bounds):
    """The kernel-level mixture_posterior computed the way every scale-out path computes it: the
    components cut at `bounds` (k0 = 0 < ... < K), one kernel launch per part, each part's float64
    state (exact_state) merged with merge_partials. Same outputs and dtypes as kernel(...) itself
    (the conformance suite runs every backend through it: tests/conformance)."""
    B, D = x.shape
    states, parts = [], []
    for k0, k1 in zip(bounds[:-1], bounds[1:]):
        comps = (means[k0:k1], bases[k0:k1], eigvals[k0:k1], residual_var[k0:k1], log_weights[k0:k1])
        den, logp, w = kernel(x, *comps, sigma, need_denoised, True)
        den = den.to(sigma.dtype) if need_denoised else x.new_zeros((B, 0), dtype=sigma.dtype)
        states.append(exact_state(den, logp, w, x.to(sigma.dtype), *comps, sigma, (D,), x.dtype))
        parts.append(w)
    merged = merge_partials(states)
    den = merged.denoised_exact().to(x.dtype) if need_denoised else x.new_empty((0,))
    if need_weights:
        weights = torch.cat([(w.double() * weight_share(st, merged)[:, None]).to(sigma.dtype) for w, st in zip(parts, states)], 1)
    else:
        weights = x.new_empty((0,), dtype=sigma.dtype)
    return den, merged.logp().to(sigma.dtype), weights


def weight_share(part: MixturePartial, merged: MixturePartial):
    """exp(logp_part - logp_merged) [B]: the part's share of the merged posterior weight, from
    the double-double logits (0 for an empty part; NaN rows give 0, their weights stay NaN)."""
    diff = (part.max_logit - merged.max_logit) + (part.max_logit_lo - merged.max_logit_lo)
    return (torch.exp(diff) * part.sum_exp / merged.sum_exp).nan_to_num(0.0)


def from_posterior(den, logp, shape, dtype) -> MixturePartial:
    """The float64 state of a (sub)mixture's posterior as a kernel returns it: M = logp, S = 1,
    W = den; a row where every component has weight 0 (logp = -inf) gets the empty state, a NaN
    row (NaN in x) a NaN state that stays in its own row."""
    den, logp = den.double(), logp.double()
    has_weight = logp != -math.inf
    return MixturePartial(logp, has_weight.to(logp.dtype), torch.where(has_weight[:, None], den, torch.zeros_like(den)),
                          shape, dtype)


def _empty(B, D, device, shape, out_dtype):
    f64 = dict(dtype=torch.float64, device=device)
    return MixturePartial(torch.full((B,), -math.inf, **f64), torch.zeros(B, **f64), torch.zeros(B, D, **f64), shape,
                          out_dtype)


def merge_partials(partials: Sequence[MixturePartial]) -> MixturePartial:
    """Exact merge of partial states of the same rows (any number, any order): rescale each to
    the largest max_logit and add. Differentiable (plain tensor algebra)."""
    partials = list(partials)
    if not partials:
        raise ValueError("merge_partials: needs at least one MixturePartial")
    for i, p in enumerate(partials):
        if not isinstance(p, MixturePartial):
            raise TypeError(f"merge_partials: partials[{i}] is a {type(p).__name__}, not a MixturePartial")
    first = partials[0]
    for i, p in enumerate(partials[1:], 1):
        if p.weighted.shape != first.weighted.shape or p.shape != first.shape:
            raise ValueError(f"merge_partials: partials[{i}] covers rows of shape {tuple(p.weighted.shape)} "
                             f"(sample shape {p.shape}), partials[0] {tuple(first.weighted.shape)} ({first.shape})")
        if p.weighted.dtype != first.weighted.dtype or p.weighted.device != first.weighted.device:
            raise ValueError(f"merge_partials: partials[{i}] is {p.weighted.dtype} on {p.weighted.device}, "
                             f"partials[0] {first.weighted.dtype} on {first.weighted.device}")
    if len(partials) == 1:
        return first
    stack = lambda name: torch.stack([getattr(p, name) for p in partials])
    return merge_stacked(stack("max_logit"), stack("sum_exp"), stack("weighted"), first.shape, first.dtype, stack("max_logit_lo"))


def merge_stacked(max_logit, sum_exp, weighted, shape, dtype, max_logit_lo=None) -> MixturePartial:
    """Merge stacked states: max_logit, sum_exp, max_logit_lo [P, B], weighted [P, B, D] -> one
    state. The rescaling exp(M_p - M_top) is taken as (hi_p - hi_top) + (lo_p - lo_top): the hi
    difference of two near logits is exact (Sterbenz), so near ties keep every bit."""
    lo = torch.zeros_like(max_logit) if max_logit_lo is None else max_logit_lo
    pick = max_logit.argmax(0, keepdim=True)  # NaN rows pick a NaN part: NaN stays in its row
    top, top_lo = max_logit.gather(0, pick)[0], lo.gather(0, pick)[0]
    # rows where every part is empty keep M = -inf; exp(-inf - -inf) would be NaN
    safe_top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    safe_lo = torch.where(torch.isinf(top), torch.zeros_like(top_lo), top_lo)
    scale = torch.where(sum_exp > 0, torch.exp((max_logit - safe_top) + (lo - safe_lo)), torch.zeros_like(sum_exp))
    return MixturePartial(top, (scale * sum_exp).sum(0), (scale[..., None] * weighted).sum(0), shape, dtype, safe_lo)
