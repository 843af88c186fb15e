"""Mergeable partial posteriors of a Gaussian mixture (the split-K online-softmax state, public).

For the components k of some subset of a mixture (a shard), with logits
`l_k(x) = log_weights_k + log N(x; mu_k, Sigma_k + sigma^2 I)`, a MixturePartial holds per row

    max_logit [B]     M = max_k l_k                      (-inf: no component with any weight)
    sum_exp   [B]     S = sum_k exp(l_k - M)             (0 for an empty subset)
    weighted  [B, D]  W = sum_k exp(l_k - M) D_k(x)      (D_k: component k's posterior mean)

so that logp = M + log S and denoised = W / S. Two states merge exactly by rescaling both to the
larger M. A shard's posterior (denoised_s, logp_s) from the mixture kernel already is such a
state (M = logp_s, S = 1, W = denoised_s): no kernel knows about partials.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import ops
from ._args import MixtureOperand, compute_dtype, flatten, rows


class MixturePartial:
    """Per-row state (max_logit [B], sum_exp [B], weighted [B, D]) of a mixture posterior over a
    subset of its components, in the compute dtype (float64 for float64 x, else float32).
    `shape` is x's per-sample shape and `dtype` x's dtype, used by denoised()."""

    def __init__(self, max_logit: torch.Tensor, sum_exp: torch.Tensor, weighted: torch.Tensor, shape, dtype):
        self.max_logit, self.sum_exp, self.weighted = max_logit, sum_exp, weighted
        self.shape, self.dtype = tuple(shape), dtype

    @property
    def batch_size(self) -> int:
        return self.max_logit.shape[0]

    def logp(self) -> torch.Tensor:
        """log of the (unnormalised, if this is a shard) mixture density over the merged
        components, [B] in the compute dtype; -inf where no component has weight."""
        return self.max_logit + torch.log(self.sum_exp)

    def denoised(self) -> torch.Tensor:
        """Posterior mean over the merged components, [B, *shape] in x's dtype. A row with no
        weighted component has no posterior mean: a ValueError (CPU tensors) or NaN (CUDA)."""
        if self.sum_exp.device.type == "cpu" and bool((self.sum_exp == 0).any()):
            raise ValueError("MixturePartial.denoised: some rows have no component with nonzero weight "
                             "(an empty shard, or only -inf log weights): merge the partials of all shards first")
        out = self.weighted / self.sum_exp[:, None]
        return out.to(self.dtype).reshape((self.batch_size,) + self.shape)

    def __repr__(self):
        return f"MixturePartial(B={self.batch_size}, shape={self.shape}, dtype={self.dtype})"


def mixture_partial(x, sigma, m, backend: str = "auto") -> MixturePartial:
    """The partial posterior state of the mixture (or shard) m at x [B, *shape], noise sigma
    (float, 0-d or [B]). One kernel launch through the usual backend dispatch; a shard with no
    components (m.shard(i, n) with n > K) gives the empty state without a launch."""
    op = "mixture_partial"
    if not isinstance(m, MixtureOperand):
        raise TypeError(f"{op}: expected a gsa_kernels.GaussianMixture, got {type(m).__name__}")
    x2 = flatten(x, m.dim, op)
    # partials are merged in the compute dtype: a float16 denoised would be rounded twice
    xc = x2.to(compute_dtype(x2.dtype))
    B = xc.shape[0]
    if m.num_components == 0:
        rows(sigma, B, xc, "sigma", op)  # same argument checks as a launch
        return _empty(B, m.dim, xc.dtype, xc.device, x.shape[1:], x.dtype)
    den, logp, _, _ = ops.posterior(xc, sigma, m, True, False, backend, op)
    return from_posterior(den, logp, x.shape[1:], x.dtype)


def from_posterior(den, logp, shape, dtype) -> MixturePartial:
    """The state of a (sub)mixture's posterior as a kernel returns it: M = logp, S = 1,
    W = den; a row where every component has weight 0 (logp = -inf) gets the empty state."""
    has_weight = logp > -math.inf
    return MixturePartial(logp, has_weight.to(logp.dtype), torch.where(has_weight[:, None], den, torch.zeros_like(den)),
                          shape, dtype)


def _empty(B, D, dtype, device, shape, out_dtype):
    return MixturePartial(torch.full((B,), -math.inf, dtype=dtype, device=device),
                          torch.zeros(B, dtype=dtype, device=device),
                          torch.zeros(B, D, dtype=dtype, device=device), shape, out_dtype)


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
    return merge_stacked(torch.stack([p.max_logit for p in partials]), torch.stack([p.sum_exp for p in partials]),
                  torch.stack([p.weighted for p in partials]), first.shape, first.dtype)


def merge_stacked(max_logit, sum_exp, weighted, shape, dtype) -> MixturePartial:
    """Merge stacked states: max_logit, sum_exp [P, B], weighted [P, B, D] -> one state."""
    top = max_logit.max(0).values
    # rows where every part is empty keep M = -inf; exp(-inf - -inf) would be NaN
    safe_top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    scale = torch.where(sum_exp > 0, torch.exp(max_logit - safe_top), torch.zeros_like(sum_exp))
    return MixturePartial(top, (scale * sum_exp).sum(0), (scale[..., None] * weighted).sum(0), shape, dtype)
