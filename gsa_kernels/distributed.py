"""Sharded mixtures and fits over torch.distributed (gloo with CPU tensors, NCCL with CUDA tensors).

Every rank of `group` (default: the whole job) calls the same function with the same keyword
arguments; torch.distributed.init_process_group must have run. Only all_gather, all_to_all_single,
all_reduce(SUM) and broadcast are used: all four exist in gloo and NCCL.

mixture_denoise / mixture_score / mixture_logp(x, sigma, shard): each rank holds its own queries
x [B_r, *shape] (B_r may differ, and may be 0) and its own shard of the components
(`m.shard(rank, world)`, log weights as in the whole mixture); each gets the whole mixture's
answer for its own queries. Steps: (1) all_gather of a small header (batch size, D, dtype,
ok flag), so that a bad argument on one rank raises on every rank instead of hanging the others;
(2) all_gather of the queries and their sigmas, padded to the largest batch; (3) each rank's
partial posterior (gk.mixture_partial) of its shard for all queries; (4) all_to_all_single sends
each rank's partial states of rank j's rows to rank j; (5) gk.merge_partials on the owner. No
rank ever holds more than its own shard.

fit_gaussian(data, rank=None, energy=None, group=None, method="auto"): every rank streams its
own data (anything GaussianModel.fit takes; a rank may have none); every rank gets the model
GaussianModel.fit would give on the concatenation. Exact: the rank-local count, sum and scatter
(taken about each rank's own anchor, shifted to the global mean) are all-reduced, the group's
first rank eigendecomposes and broadcasts the model. Randomized: the [D, l] sketch is
all-reduced once per pass (gsa_kernels/fitting.py).

last_call_stats() -> dict of this rank's last call: bytes this rank sent to / received from
the others as payload (a ring all-reduce of n bytes counts 2 n (W - 1) / W each way; the wire
carries protocol bytes on top), the number of collectives, and wall seconds in all and in the
local kernel / fit arithmetic.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from . import fitting
from ._core import _args
from ._core._args import FLOAT_DTYPES, compute_dtype, flatten
from ._scaleout.partial import merge_stacked, partial_state
from .models import GaussianMixture, GaussianModel

_stats: dict = {}


def last_call_stats() -> dict:
    """This rank's figures for its last gk.distributed call (see the module docstring)."""
    return dict(_stats)


class _Comm:
    """The collectives of one call on one group, with payload byte counts."""

    def __init__(self, group, op):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"gk.distributed.{op}: call torch.distributed.init_process_group first")
        if group is not None and dist.get_rank(group) < 0:
            raise ValueError(f"gk.distributed.{op}: this rank is not a member of group")
        self.group, self.op = group, op
        self.world, self.me = dist.get_world_size(group), dist.get_rank(group)
        self.first = dist.get_global_rank(group, 0) if group is not None else 0
        self.sent = self.received = self.collectives = 0
        self.t0, self.local_seconds = time.perf_counter(), 0.0

    def all_gather(self, t):
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        self._count(t.nbytes * (self.world - 1), t.nbytes * (self.world - 1))
        return parts

    def all_to_all(self, t, in_rows, out_rows):
        out = t.new_empty((sum(out_rows),) + tuple(t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), output_split_sizes=out_rows, input_split_sizes=in_rows, group=self.group)
        row = t[0].nbytes if t.shape[0] else out[0].nbytes if out.shape[0] else 0
        self._count(row * (sum(in_rows) - in_rows[self.me]), row * (sum(out_rows) - out_rows[self.me]))
        return out

    def all_reduce(self, t):
        dist.all_reduce(t, group=self.group)
        ring = 2 * t.nbytes * (self.world - 1) // self.world
        self._count(ring, ring)
        return t

    def broadcast(self, t):
        dist.broadcast(t, src=self.first, group=self.group)
        nb = t.nbytes
        self._count(nb * (self.world - 1) if self.me == 0 else 0, 0 if self.me == 0 else nb)
        return t

    def _count(self, sent, received):
        self.sent += sent
        self.received += received
        self.collectives += 1

    def local(self, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.local_seconds += time.perf_counter() - t

    def agree(self, error, values):
        """all_gather of [ok, *values] (int64) from every rank, so that an error on one rank
        raises on every rank instead of leaving the others waiting: this rank's own error, or
        a RuntimeError naming the failed ranks. Returns the [W, len(values)] table."""
        dev = _device(self.group)
        row = torch.tensor([int(error is None)] + list(values), dtype=torch.int64, device=dev)
        table = torch.stack(self.all_gather(row))
        if error is not None:
            raise error
        if not bool(table[:, 0].all()):
            bad = [i for i in range(self.world) if not table[i, 0]]
            raise RuntimeError(f"gk.distributed.{self.op}: rank(s) {bad} of the group failed their argument checks "
                               "(each raised its own error)")
        return table[:, 1:]

    def finish(self, **extra):
        _stats.clear()
        _stats.update(op=self.op, world_size=self.world, bytes_sent=self.sent, bytes_received=self.received,
                      collectives=self.collectives, seconds=time.perf_counter() - self.t0,
                      seconds_local=self.local_seconds, **extra)


def _device(group):
    """The device collectives of this group run on: CUDA for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- mixtures


def _sharded(x, sigma, shard, group, backend, op, score=False):
    """(this rank's merged MixturePartial, x2 [B, D], sigma [B]) for the whole mixture; score=True:
    its weighted sums carry the components' scores (partial.partial_state), W / S the score."""
    comm = _Comm(group, op)
    error = None
    try:
        if not isinstance(shard, GaussianMixture):
            raise TypeError(f"gk.distributed.{op}: shard must be a gsa_kernels.GaussianMixture, got {type(shard).__name__}")
        x2 = flatten(x, shard.dim, op)
        _check_no_grad(op, x, sigma, shard)
        cd = compute_dtype(x2.dtype)
        s = _args.rows(sigma, x2.shape[0], x2, "sigma", op)
        header = (x2.shape[0], shard.dim, FLOAT_DTYPES.index(cd))
    except (TypeError, ValueError) as e:
        error, header = e, (0, 0, 0)
    table = comm.agree(error, header)
    sizes = table[:, 0].tolist()
    if len(set(table[:, 1].tolist())) > 1 or len(set(table[:, 2].tolist())) > 1:
        raise ValueError(f"gk.distributed.{op}: ranks disagree on D {table[:, 1].tolist()} or on the compute dtype "
                         f"{[str(FLOAT_DTYPES[i]) for i in table[:, 2].tolist()]} (float64 x on every rank, or on none)")
    B, D, rows = x2.shape[0], shard.dim, max(sizes)
    # one padded [rows, D + 1] block per rank: its queries and their sigmas
    block = torch.zeros(rows, D + 1, dtype=cd, device=x2.device)
    block[:B, :D], block[:B, D] = x2, s
    queries = torch.cat([b[:n] for b, n in zip(comm.all_gather(block), sizes)])
    # state rows [max_logit, sum_exp, ok, max_logit_lo, weighted (D)], float64 (partial.py: exact merges), sent
    # to each row's owner; ok = 0 tells the owners that this rank's kernel failed (its own error
    # is raised after the exchange)
    try:
        p = comm.local(partial_state, queries[:, :D], queries[:, D], shard, backend, op, score)
        state = torch.cat([p.max_logit[:, None], p.sum_exp[:, None], torch.ones_like(p.sum_exp)[:, None],
                           p.max_logit_lo[:, None], p.weighted], 1)
        error = None
    except (TypeError, ValueError, RuntimeError) as e:
        state, error = queries.new_zeros(queries.shape[0], D + 4, dtype=torch.float64), e
    mine = comm.all_to_all(state, sizes, [B] * comm.world).reshape(comm.world, B, D + 4)
    if error is not None:
        raise error
    if not bool((mine[:, :, 2] == 1).all()):
        raise RuntimeError(f"gk.distributed.{op}: another rank failed computing its shard's partials (its own error says why)")
    merged = merge_stacked(mine[:, :, 0], mine[:, :, 1], mine[:, :, 4:], x.shape[1:], x.dtype, mine[:, :, 3])
    comm.finish(rows=B, rows_total=queries.shape[0], components=shard.num_components)
    return merged, x2, s


def _check_no_grad(op, x, sigma, shard):
    """The exchange (all_gather / all_to_all) carries no autograd graph: a gradient w.r.t. x,
    sigma or the shard would silently miss the other ranks' terms, so asking for one is an error."""
    if not torch.is_grad_enabled():
        return
    named = [("x", x), ("sigma", sigma)] + [(n, getattr(shard, n)) for n in ("means", "bases", "eigvals", "residual_var",
                                                                            "log_weights")]
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise TypeError(f"gk.distributed.{op}: {name} requires grad, but the cross-rank exchange is not differentiable "
                            f"(the result would be detached from it); call it under torch.no_grad() or detach {name}, "
                            "or differentiate the single-process op / gk.merge_partials of gk.mixture_partial instead")


def mixture_denoise(x, sigma, shard, group=None, backend: str = "auto"):
    """The whole mixture's posterior mean for this rank's queries x [B, *shape] (module
    docstring); shard: this rank's components (m.shard(rank, world))."""
    merged, _, _ = _sharded(x, sigma, shard, group, backend, "mixture_denoise")
    return merged.denoised()


def mixture_score(x, sigma, shard, group=None, backend: str = "auto"):
    """The whole mixture's score sum_k w_k s_k(x) = (D(x) - x) / sigma^2 for this rank's queries
    x [B, *shape]: each shard's partial carries its launches' scores in the stable form of the
    single-process op (ops.stable_score), merged in float64 and rounded to x's dtype once."""
    merged, _, _ = _sharded(x, sigma, shard, group, backend, "mixture_score", score=True)
    return merged.denoised_exact().to(x.dtype).reshape(x.shape)  # W / S: the merged score


def mixture_logp(x, sigma, shard, group=None, backend: str = "auto"):
    """The whole mixture's log p_sigma(x) for this rank's queries, [B] in the compute dtype."""
    merged, _, _ = _sharded(x, sigma, shard, group, backend, "mixture_logp")
    return merged.logp()


# ----------------------------------------------------------------------------- fitting


def fit_gaussian(data, rank=None, energy=None, group=None, method: str = "auto"):
    """GaussianModel.fit(concatenation of every rank's data, rank, energy, method) on every rank
    (module docstring). data: this rank's data, as GaussianModel.fit takes it, or an empty
    [0, D] tensor / empty list for a rank without data."""
    comm = _Comm(group, "fit_gaussian")
    error = None
    try:
        if method not in ("auto", "exact", "randomized"):
            raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
        if rank is not None and energy is not None:
            raise ValueError("give rank or energy, not both")
        passes = fitting.Passes(data)
        D, dtype, device = passes.peek()
        header = (-1 if D is None else D, -1 if dtype is None else FLOAT_DTYPES.index(dtype), passes.kind == "one-shot")
    except (TypeError, ValueError, RuntimeError) as e:
        error, header = e, (-1, -1, 0)
    table = comm.agree(error, header)
    known = table[table[:, 0] >= 0][:, :2]
    if known.shape[0] == 0:
        raise ValueError("gk.distributed.fit_gaussian: no rank has any data")
    if len(set(known[:, 0].tolist())) > 1 or len(set(known[:, 1].tolist())) > 1:
        raise ValueError(f"gk.distributed.fit_gaussian: ranks disagree on D {known[:, 0].tolist()} or dtype "
                         f"{[str(FLOAT_DTYPES[i]) for i in known[:, 1].tolist()]}")
    D, dtype = int(known[0, 0]), FLOAT_DTYPES[int(known[0, 1])]
    device = device if device is not None else _device(group)
    if method == "auto":
        method = "exact" if 8 * D * D <= fitting.EXACT_FIT_BUDGET_BYTES else "randomized"
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= D):
        raise ValueError(f"gk.distributed.fit_gaussian: rank must be an int in [0, D = {D}], got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"gk.distributed.fit_gaussian: energy must be in (0, 1], got {energy}")
    error = None
    if method == "randomized":
        if rank is None:
            raise ValueError(f"gk.distributed.fit_gaussian: the randomized fit (D = {D}) needs rank=")
        if table[:, 2].any():
            raise ValueError(f"gk.distributed.fit_gaussian: rank(s) {table[:, 2].nonzero()[:, 0].tolist()} passed a one-shot "
                             "iterator, but the randomized fit reads the data several times (see gsa_kernels/fitting.py)")
        g = fitting.fit_randomized(passes, rank, reduce=comm.all_reduce, agreed=(D, dtype, device))
    else:
        local, error = fitting.local_pass(passes)
        n, mean, _, scatter = fitting.centred(local, D, device, None, comm.all_reduce, error)
        if n < 2:
            raise ValueError(f"gk.distributed.fit_gaussian: fitting a Gaussian needs at least 2 samples, got {n}")
        g = None
        if comm.me == 0:
            try:
                g = fitting.exact_from_scatter(n, mean, scatter, rank, energy, dtype, device)
            except (ValueError, RuntimeError) as e:  # told to the others by the broadcast, then raised
                error = e
    g = _broadcast_model(comm, g, D, dtype, device, error)
    comm.finish(method=method, dim=D, model_rank=g.rank)
    return g


def _broadcast_model(comm, g, D, dtype, device, error=None):
    """The group's first rank's model on every rank (bitwise the same everywhere); if that rank
    failed (error), every rank raises."""
    f64 = dict(dtype=torch.float64, device=device)
    head = torch.tensor([float(g.rank), g.residual_var] if g is not None else [-1.0, 0.0], **f64)
    comm.broadcast(head)
    r = int(head[0].item())
    if r < 0:
        if error is not None:
            raise error
        raise RuntimeError("gk.distributed.fit_gaussian: the group's first rank failed the eigendecomposition (its own error says why)")
    body = (torch.cat([g.mean.double(), g.basis.double().reshape(-1), g.eigvals.double()]) if g is not None
            else torch.empty(D * (r + 1) + r, **f64))
    comm.broadcast(body)
    mean, basis, eigvals = body[:D], body[D:D + D * r].reshape(D, r), body[D + D * r:]
    return GaussianModel(mean.to(dtype), basis.to(dtype), eigvals.to(dtype), head[1].item())
