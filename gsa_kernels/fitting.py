"""Fitting a Gaussian without a D x D matrix, and the moment algebra shared with gk.distributed.

`GaussianModel.fit(data, rank=r, method=...)`:
- "exact": the float64 D x D scatter matrix (summed in fit_gaussian) and a full eigendecomposition
  (exact_from_scatter), one pass.
- "randomized": a streamed randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4/5.5)
  with POWER_ITERS = 2 power iterations and a stabilised Nystrom finish (Tropp et al. 2017):
  3 passes over the data, each multiplying the covariance by a [D, l] block, l = 3 r
  (at least r + 10). Memory O(D l) plus one [rows, D] chunk: never D x D. The top-r
  eigenvalues and directions come from the sketch; residual_var = (trace - sum of the top r
  eigenvalues) / (D - r), the trace being summed exactly during the passes. With few rows
  (n <= 4 l, within 256 MiB) the first pass keeps them and the fit is the exact small problem
  (an n x n Gram matrix). A one-shot iterator gets the one-pass fit instead (fit_one_pass: an
  incremental truncated SVD of 3 r + 16 rows, top-r eigenvalues within ~1 % of the exact fit on
  decaying spectra, see tests/test_fit_one_pass.py; fit_per_class: every class in that one
  pass, fit_one_pass_per_class). Constant data fit to zero variance.
- "auto": "exact" while a D x D float64 matrix fits EXACT_FIT_BUDGET_BYTES (1 GiB, D <= 11585),
  else "randomized" (which needs rank).

Data for the fits: a tensor or array [N, ...]; a list / tuple / any re-iterable of [n, ...]
batches (e.g. a DataLoader: iterated once per pass); or a callable returning a fresh iterable of
batches (called once per pass, e.g. a generator function). A one-shot iterator (a generator
object) serves one pass only: the exact fit and the one-pass randomized fit take it (explicit
power_iters > 0 raise a ValueError before reading anything). Every pass must yield the same data.

The moments of each rank's data are taken about that rank's own anchor (its first rows' mean),
which keeps the float64 sums accurate, and shifted to the global mean before any reduction;
`reduce` (in-place sum over ranks; identity in one process) is the only communication.
"""
from __future__ import annotations

import collections.abc
import math
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

EXACT_FIT_BUDGET_BYTES = 1 << 30
# l = r + max(OVERSAMPLE_MIN, 2 r) sketch columns and 2 power iterations (3 passes): on flat
# noisy spectra (eigenvalues ~ j^-1/2 and j^-1, r = 128) the top-r eigenvalues came within
# 0.5 % and 0.1 % of the exact fit's; l = 2 r with 3 iterations (4 passes, as much arithmetic)
# gave 1.7 % and 0.4 %
OVERSAMPLE_MIN = 10
POWER_ITERS = 2
CHUNK_ELEMS = 1 << 23     # rows are converted and multiplied in chunks of ~8M elements
# the first pass of the randomized fit keeps up to 4 x its sketch width rows (at most 256 MiB):
# with so few rows the exact small problem (an n x n Gram matrix) is cheaper and exact, where
# the sketch was 7-23 % off below ~3 x rank rows
SMALL_FIT_ROWS_PER_COLUMN = 4
SMALL_FIT_BUDGET_BYTES = 1 << 28
# the one-pass fit keeps an incremental truncated SVD of ONE_PASS_WIDTH_FACTOR x rank rows
# (+ ONE_PASS_WIDTH_MIN), merging each batch with its Gram matrix (see fit_one_pass)
ONE_PASS_WIDTH_FACTOR = 3
ONE_PASS_WIDTH_MIN = 16


class GaussianFit(NamedTuple):
    """A fitted Gaussian's tensors, as GaussianModel(*fit) takes them."""

    mean: torch.Tensor
    basis: torch.Tensor
    eigvals: torch.Tensor
    residual_var: float

    @property
    def rank(self) -> int:
        return self.basis.shape[1]


def _identity(t):
    return t


class Passes:
    """The data as repeatable passes of 2-d [n, D] batches (see the module docstring)."""

    def __init__(self, data):
        if isinstance(data, (torch.Tensor, np.ndarray)):
            self.kind = "tensor"
        elif isinstance(data, collections.abc.Iterator):
            self.kind = "one-shot"
        elif callable(data):
            self.kind = "callable"
        elif isinstance(data, collections.abc.Iterable):
            self.kind = "iterable"
        else:
            raise TypeError(f"data must be a tensor, an iterable of batches or a callable returning one, got {type(data).__name__}")
        self.data, self.passes_started, self._peeked = data, 0, None

    def check_passes(self, needed: int):
        if self.kind == "one-shot" and needed > 1:
            raise ValueError(f"data is a one-shot iterator (e.g. a generator object) but this fit reads the data {needed} times: "
                             "pass a tensor, a list of batches, a re-iterable (e.g. a DataLoader) or a callable that returns "
                             "a fresh iterator on each call (e.g. the generator function itself)")

    def _raw(self):
        if self.kind == "tensor":
            return iter((self.data,))
        if self.kind == "one-shot":
            if self.passes_started > 1:
                raise ValueError("data is a one-shot iterator and was already consumed")
            return self.data
        return iter(self.data() if self.kind == "callable" else self.data)

    def peek(self):
        """(D, dtype, device) of the first batch ((None,) * 3 if there is none), read as the
        start of the next pass. dtype is the model's: float32 for integer data."""
        if self.kind == "tensor":
            first = self.data
        elif self._peeked is not None:  # peeked already (method="auto", then the fit): the same pass
            first = self._peeked[0]
            if first is None:
                return None, None, None
        else:
            self.passes_started += 1
            it = self._raw()
            first = next(it, None)
            self._peeked = (first, it)
            if first is None:
                return None, None, None
        first = _as_rows(first)
        return first.shape[1], (first.dtype if first.is_floating_point() else torch.float32), first.device

    def __iter__(self):
        """One pass: 2-d batches [n, D] on their own device and dtype."""
        if self._peeked is not None:
            (first, it), self._peeked = self._peeked, None
            if first is None:
                return
            yield _as_rows(first)
        else:
            self.passes_started += 1
            it = self._raw()
        for batch in it:
            yield _as_rows(batch)


def _as_rows(batch):
    if not isinstance(batch, torch.Tensor):
        batch = torch.as_tensor(batch)
    if batch.dim() < 2:
        raise ValueError(f"data batches must be [N, ...] with N samples, got shape {tuple(batch.shape)}")
    return batch.reshape(batch.shape[0], math.prod(batch.shape[1:]))


def plan(data, rank, energy, method):
    """(method, data) for GaussianModel.fit: "auto" resolved; for "exact", data as its loop
    takes it (a tensor, or one pass of 2-d batches); for "randomized", a Passes."""
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    passes = Passes(data)
    if method == "auto":
        D = passes.peek()[0]
        method = "exact" if D is None or 8 * D * D <= EXACT_FIT_BUDGET_BYTES else "randomized"
        if method == "randomized" and rank is None:
            raise ValueError(f"method='auto': a D x D float64 matrix at D = {D} needs {8 * D * D / 2**30:.1f} GiB, over the "
                             f"{EXACT_FIT_BUDGET_BYTES / 2**30:g} GiB budget: give rank= for the randomized fit, or method='exact'")
    if method == "randomized":
        return method, passes
    return method, (data if isinstance(data, torch.Tensor) else iter(passes))


def sketch_width(rank: int, D: int, oversample: Optional[int] = None) -> int:
    return min(D, rank + (max(OVERSAMPLE_MIN, 2 * rank) if oversample is None else oversample))


# ----------------------------------------------------------------------------- local moments


class Moments:
    """One rank's pass: n rows, their anchor a [D] (the first chunk's mean unless given),
    s = sum (x - a) [D], sq = sum |x - a|^2, and prod = sum (x - a)(x - a)^T Q [D, l] (sketch
    mode) or the scatter sum (x - a)(x - a)^T [D, D] (Q is None). Float64 accumulators; the
    sketch products run in the data's compute dtype (float32 unless the data is float64)."""

    def __init__(self, Q=None, anchor=None):
        self.Q, self.anchor, self._Qc = Q, anchor, None
        self.n, self.s, self.sq, self.prod = 0, None, None, None
        self.D, self.dtype, self.device = None, None, None

    def add(self, x):
        if self.D is None:
            self.D, self.device = x.shape[1], x.device
            self.dtype = x.dtype if x.is_floating_point() else torch.float32
        elif x.shape[1] != self.D:
            raise ValueError(f"data batches disagree on D: {x.shape[1]} vs {self.D}")
        elif x.device != self.device:
            raise ValueError(f"data batches are on different devices: {x.device} vs {self.device}")
        if self.Q is not None and self.Q.shape[0] != self.D:
            raise ValueError(f"data has D = {self.D} features but the sketch was built for D = {self.Q.shape[0]}")
        step = max(1, CHUNK_ELEMS // max(self.D, 1))
        for i in range(0, x.shape[0], step):
            self._add_chunk(x[i:i + step].to(torch.float64))

    def _add_chunk(self, chunk):
        if not torch.isfinite(chunk).all():
            raise ValueError("data contains NaN or inf")
        if self.anchor is None:
            self.anchor = chunk.mean(0)
        if self.s is None:
            self.s = torch.zeros(self.D, dtype=torch.float64, device=self.device)
            self.sq = torch.zeros((), dtype=torch.float64, device=self.device)
            width = self.D if self.Q is None else self.Q.shape[1]
            self.prod = torch.zeros(self.D, width, dtype=torch.float64, device=self.device)
        y = chunk - self.anchor
        self.n += y.shape[0]
        self.s += y.sum(0)
        self.sq += (y * y).sum()
        if self.Q is None:
            self.prod += y.T @ y
        else:
            if self._Qc is None:
                cd = torch.float64 if self.dtype == torch.float64 else torch.float32
                self._Qc = self.Q.to(device=self.device, dtype=cd)
            yc = y.to(self._Qc.dtype)
            self.prod += (yc.T @ (yc @ self._Qc)).double()


def centred(local: Moments, D, device, Q, reduce, error=None):
    """Global (n, mean [D], trace of the scatter, scatter times Q [D, l], or the scatter [D, D]
    when Q is None) from every rank's local moments: each rank shifts its sums from its anchor
    to the global mean, then sum-reductions. A rank with no rows contributes zeros; a rank whose
    pass failed (error) contributes a flag, so that every rank raises instead of waiting."""
    f64 = dict(dtype=torch.float64, device=device)
    width = D if Q is None else Q.shape[1]
    if local.n and error is None:
        n_j, a, s, sq, prod = local.n, local.anchor, local.s, local.sq, local.prod
    else:
        n_j, a, s = 0, torch.zeros(D, **f64), torch.zeros(D, **f64)
        sq, prod = torch.zeros((), **f64), torch.zeros(D, width, **f64)
    head = torch.tensor([float(error is not None), float(n_j)], **f64)
    totals = reduce(torch.cat([head, n_j * a + s]))
    if totals[0].item() > 0:
        if error is not None:
            raise error
        raise RuntimeError("another rank failed while reading its data (its own error says why)")
    n = int(round(totals[1].item()))
    mean = totals[2:] / max(n, 1)
    # sum (y - d)(y - d)^T M = sum y y^T M - d (s^T M) - s (d^T M) + n_j d (d^T M),  d = mean - a
    d = mean - a if n_j else torch.zeros_like(mean)
    sM, dM = (s, d) if Q is None else (s @ Q, d @ Q)
    prod = prod - torch.outer(d, sM) - torch.outer(s, dM) + n_j * torch.outer(d, dM)
    sq = sq - 2 * (d @ s) + n_j * (d @ d)
    flat = reduce(torch.cat([prod.reshape(-1), sq.reshape(1)]))
    return n, mean, flat[-1].item(), flat[:-1].reshape(prod.shape)


def local_pass(passes, Q=None, anchor=None):
    """(Moments, error) of one pass over this rank's data; the error is returned, not raised,
    so that the caller can tell the other ranks first."""
    local = Moments(Q, anchor)
    try:
        for x in passes:
            local.add(x)
    except (ValueError, TypeError, RuntimeError) as e:
        return local, e
    return local, None


# ----------------------------------------------------------------------------- the two fits


def select_rank(evals, n, rank, energy, D):
    """The number of directions kept by the fits: rank, else the fewest holding `energy`, else all
    with nonzero variance (min(D, n - 1))."""
    if rank is not None and energy is not None:
        raise ValueError("give rank or energy, not both")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= D:
            raise ValueError(f"rank must be an int in [0, D = {D}], got {rank!r}")
        return rank
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        frac = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-300)
        return min(int((frac < energy - 1e-12).sum().item()) + 1, D)
    return min(D, n - 1)


def exact_from_scatter(n, mean, scatter, rank, energy, dtype, device):
    """The exact fit from the centred scatter sum (x - mean)(x - mean)^T [D, D] of n rows: the
    end of GaussianModel.fit's exact path and of gk.distributed's."""
    if n < 2:
        raise ValueError(f"fitting a Gaussian needs at least 2 samples, got {n}")
    cov = scatter / (n - 1)
    evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)  # descending
    D = evals.shape[0]
    r = select_rank(evals, n, rank, energy, D)
    residual = evals[r:].mean().item() if r < D else 0.0
    return GaussianFit(mean.to(dtype).to(device), evecs[:, :r].to(dtype).to(device), evals[:r].to(dtype).to(device), residual)


def fit_randomized(data, rank: int, *, power_iters: Optional[int] = None, oversample: Optional[int] = None, seed: int = 0,
                   reduce: Callable = _identity, agreed: Optional[tuple] = None):
    """The randomized fit (module docstring): the GaussianFit with the top `rank` directions.
    data: anything Passes accepts, or a Passes. power_iters: POWER_ITERS by default; a one-shot
    iterator in one process gets the one-pass fit (fit_one_pass) instead. gk.distributed
    supplies reduce(t) -> t summed over ranks and agreed = (D, dtype, device) of the whole
    group; the defaults serve one process. The test matrix comes from `seed`, so every rank
    draws the same one. Few rows (at most SMALL_FIT_ROWS_PER_COLUMN x the sketch width, within
    SMALL_FIT_BUDGET_BYTES): the first pass keeps them and the fit is the exact one."""
    passes = data if isinstance(data, Passes) else Passes(data)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"the randomized fit needs rank = an int >= 0, got {rank!r}")
    if power_iters is None:
        if passes.kind == "one-shot" and reduce is _identity:
            return fit_one_pass(passes, rank, width=None if oversample is None else rank + oversample)
        power_iters = POWER_ITERS
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
        raise ValueError(f"power_iters must be an int >= 0, got {power_iters!r}")
    passes.check_passes(power_iters + 1)
    if agreed is None:
        agreed = passes.peek()
        if agreed[0] is None:
            raise ValueError("fitting a Gaussian needs at least 2 samples, got 0")
    D, dtype, device = agreed
    if rank > D:
        raise ValueError(f"rank must be in [0, D = {D}], got {rank}")
    width = sketch_width(rank, D, oversample) if rank else 0
    Q = torch.linalg.qr(torch.randn(D, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)).Q
    anchor, n_first = None, None
    keep = _Kept(SMALL_FIT_ROWS_PER_COLUMN * width, D, dtype) if reduce is _identity and rank else None
    for it in range(power_iters + 1 if rank else 1):
        local, error = local_pass(keep.wrap(passes) if keep is not None and it == 0 else passes, Q, anchor)
        if error is None and n_first is not None and local.n != n_first:
            error = ValueError(f"the data changed between passes: {n_first} rows, then {local.n}; every pass must yield the same data")
        n, mean, trace, Y = centred(local, D, device, Q, reduce, error)
        anchor, n_first = local.anchor, local.n
        if n < 2:
            raise ValueError(f"fitting a Gaussian needs at least 2 samples, got {n}")
        if it == 0 and keep is not None and keep.rows is not None:
            # few rows: the sketch of a rank <= n - 1 scatter is no cheaper than the exact small problem
            return _exact_small(keep.matrix(), mean, trace, rank, dtype)
        if rank and it < power_iters:
            Q = torch.linalg.qr(Y).Q
    return _sketched_model(n, mean, trace, Q, Y, rank, dtype)


def _sketched_model(n, mean, trace, Q, Y, rank, dtype):
    """The end of the randomized fit: the top `rank` eigenpairs from the sketch Y = S Q of the
    scatter S of n rows (trace: S's exact trace), the rest as isotropic residual_var."""
    D = mean.shape[0]
    evals, U = nystrom(Q, Y) if rank else (Y.new_zeros(0), Y.new_zeros(D, 0))
    evals, U = evals[:rank] / (n - 1), U[:, :rank]
    residual = max(trace / (n - 1) - evals.sum().item(), 0.0) / (D - rank) if rank < D else 0.0
    return GaussianFit(mean.to(dtype), U.to(dtype), evals.to(dtype), residual)


def fit_randomized_per_class(pairs: Callable, rank: int, *, power_iters: int = POWER_ITERS,
                             oversample: Optional[int] = None, seed: int = 0):
    """The randomized fit of every class at once (GaussianMixture.fit_per_class): each pass
    over the data updates every class's sketch, so the data is read power_iters + 1 times in
    all, whatever the number of classes K. pairs(): a fresh iterable of (x [n, D], y [n] int64)
    per pass. Class k's test matrix comes from seed + k; memory O(K D l), never D x D.
    Returns {class: (GaussianFit, rows)}."""
    Q, anchors, rows, kept, done, pool = {}, {}, None, {}, {}, [0]
    D = width = dtype = device = None
    for it in range(power_iters + 1 if rank else 1):
        moments = {}
        for x, y in pairs():
            if D is None:
                D, device = x.shape[1], x.device
                dtype = x.dtype if x.is_floating_point() else torch.float32
                if rank > D:
                    raise ValueError(f"rank must be in [0, D = {D}], got {rank}")
                width = sketch_width(rank, D, oversample) if rank else 0
            for k in torch.unique(y).tolist():
                if k not in moments:
                    if k not in Q:
                        if it > 0:
                            raise ValueError(f"the data changed between passes: class {k} appeared in pass {it + 1}")
                        gen = torch.Generator().manual_seed(seed + k)
                        Q[k] = torch.linalg.qr(torch.randn(D, width, dtype=torch.float64, generator=gen).to(device)).Q
                    moments[k] = Moments(Q[k], anchors.get(k))
                    if it == 0 and rank:  # few rows: the exact small problem, as fit_randomized
                        kept[k] = _Kept(SMALL_FIT_ROWS_PER_COLUMN * width, D, dtype, pool)
                rows_k = x[y == k]
                if it == 0 and k in kept:
                    for _ in kept[k].wrap([rows_k]):
                        pass
                moments[k].add(rows_k)
        counts = {k: mom.n for k, mom in moments.items()}
        if rows is not None and counts != rows:
            raise ValueError("the data changed between passes: the rows per class differ; every pass must yield the same data")
        rows, out = counts, {}
        for k, mom in sorted(moments.items()):
            if mom.n < 2:
                out[k] = (None, mom.n)  # the caller names the classes without a covariance
                continue
            if k in done:
                out[k] = done[k]
                continue
            n, mean, trace, Y = centred(mom, D, device, Q[k], _identity)
            anchors[k] = mom.anchor
            if it == 0 and k in kept and kept[k].rows is not None:
                out[k] = done[k] = (_exact_small(kept[k].matrix(), mean, trace, rank, dtype), n)
                kept[k] = None  # the rows are not needed any more
            elif rank and it < power_iters:
                Q[k] = torch.linalg.qr(Y).Q
            else:
                out[k] = (_sketched_model(n, mean, trace, Q[k], Y, rank, dtype), n)
    if D is None:
        raise ValueError("fit_per_class: the data has no rows")
    return out


def nystrom(Q, Y):
    """Eigenpairs (descending) of the Nystrom approximation S Q (Q^T S Q)^+ Q^T S of a PSD
    matrix S from Q [D, l] orthonormal and Y = S Q, stabilised by a small shift (Tropp,
    Yurtsever, Udell & Cevher 2017, alg. 3)."""
    shift = math.sqrt(Y.shape[0]) * torch.finfo(Y.dtype).eps * torch.linalg.matrix_norm(Y).item()
    if shift == 0.0:  # S Q = 0: a zero scatter (constant data); any orthonormal directions serve
        return Y.new_zeros(Y.shape[1]), Q
    for _ in range(8):  # a larger shift if rounding left Q^T Y_shift indefinite
        Ys = Y + shift * Q
        B = Q.T @ Ys
        L, info = torch.linalg.cholesky_ex(0.5 * (B + B.T))
        if info.item() == 0:
            break
        shift *= 100
    else:
        raise RuntimeError("randomized fit: the sketch is not positive semidefinite (data changed between passes?)")
    F = torch.linalg.solve_triangular(L, Ys.T, upper=False).T  # Ys L^-T: F F^T = Ys B^-1 Ys^T
    U, sv, _ = torch.linalg.svd(F, full_matrices=False)
    return (sv * sv - shift).clamp_min(0), U


# ----------------------------------------------------------------------------- the models' fits
# GaussianModel.fit, GaussianMixture.fit and .fit_per_class (models.py) validate their
# arguments' types and build the model from what these return: GaussianFit, or the tensors of a
# GaussianMixture (means, bases, eigvals, residual_var, log_weights).


def _batches(data):
    if isinstance(data, torch.Tensor):
        yield data
    else:
        yield from data


def _labelled_batches(data, labels, num_classes):
    """(x [n, D], y [n] int64) batches of fit_per_class: data with labels, or (x, y) pairs."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        if labels is None:
            raise TypeError("fit_per_class: give labels [N] with data [N, ...] (or stream (x, y) batches)")
        pairs = [(data, labels)]
    else:
        if labels is not None:
            raise TypeError("fit_per_class: streamed data carries its labels, as (x, y) batches; labels must be None")
        pairs = data() if callable(data) and not isinstance(data, collections.abc.Iterable) else data
        if not isinstance(pairs, collections.abc.Iterable):
            raise TypeError(f"fit_per_class: data must be a tensor, an iterable of (x, y) batches or a callable "
                            f"returning one, got {type(data).__name__}")
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"fit_per_class: streamed batches must be (x, y) pairs, got {type(pair).__name__}")
        x, y = (torch.as_tensor(t) for t in pair)
        if x.dim() < 2:
            raise ValueError(f"fit_per_class: data batches must be [N, ...] with N samples, got shape {tuple(x.shape)}")
        if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            raise TypeError(f"fit_per_class: labels must be integer class indices, got {y.dtype}")
        if y.shape != x.shape[:1]:
            raise ValueError(f"fit_per_class: labels must be [N] = [{x.shape[0]}] for data of shape {tuple(x.shape)}, "
                             f"got shape {tuple(y.shape)}")
        if y.numel() and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
            bound = "" if num_classes is None else f" < num_classes = {num_classes}"
            raise ValueError(f"fit_per_class: labels must be class indices >= 0{bound}, got min {y.min().item()}, "
                             f"max {y.max().item()}")
        yield x.reshape(x.shape[0], math.prod(x.shape[1:])), y.long()


def fit_gaussian(data, rank: Optional[int], energy: Optional[float], method: str) -> GaussianFit:
    """GaussianModel.fit (its docstring): the exact fit sums the float64 scatter here."""
    method, data = plan(data, rank, energy, method)
    if method == "randomized":
        if energy is not None:
            raise ValueError("the randomized fit takes rank, not energy")
        return fit_randomized(data, rank)
    if rank is not None and energy is not None:
        raise ValueError("give rank or energy, not both")
    n, s, ss, dtype, device = 0, None, None, None, None
    for batch in _batches(data):
        if not isinstance(batch, torch.Tensor):
            batch = torch.as_tensor(batch)
        if batch.dim() < 2:
            raise ValueError(f"data batches must be [N, ...] with N samples, got shape {tuple(batch.shape)}")
        x = batch.reshape(batch.shape[0], math.prod(batch.shape[1:])).double()
        if s is None:
            D = x.shape[1]
            s, ss = torch.zeros(D, dtype=torch.float64, device=x.device), torch.zeros(D, D, dtype=torch.float64, device=x.device)
            dtype = batch.dtype if batch.is_floating_point() else torch.float32
            device = batch.device
        elif x.shape[1] != s.shape[0]:
            raise ValueError(f"data batches disagree on D: {x.shape[1]} vs {s.shape[0]}")
        if not torch.isfinite(x).all():
            raise ValueError("data contains NaN or inf")
        if n == 0:  # centre on the first batch's mean: keeps the float64 scatter accurate
            anchor = x.mean(0)
        xc = x - anchor
        s += xc.sum(0)
        ss += xc.T @ xc
        n += x.shape[0]
    if n < 2:
        raise ValueError(f"fitting a Gaussian needs at least 2 samples, got {n}")
    mean_c = s / n
    return exact_from_scatter(n, anchor + mean_c, ss - n * torch.outer(mean_c, mean_c), rank, energy, dtype, device)


def fit_mixture(data, n_components: int, rank: int, iters: int, seed: int):
    """GaussianMixture.fit (its docstring) of checked data [N, ...]: the mixture's tensors."""
    x = data.reshape(data.shape[0], math.prod(data.shape[1:])).double()
    N, D = x.shape
    if not 1 <= n_components <= N:
        raise ValueError(f"n_components must be in [1, N = {N}], got {n_components}")
    if not 0 <= rank <= D:
        raise ValueError(f"rank must be in [0, D = {D}], got {rank}")
    labels = kmeans(x, n_components, iters=iters, seed=seed)[1]
    means, bases, eigvals, residual_vars, log_weights = [], [], [], [], []
    for k in range(n_components):
        xk = x[labels == k]
        if xk.shape[0] >= 2:
            g = fit_gaussian(xk, min(rank, xk.shape[0] - 1), None, "auto")
            mean, basis, eig, residual_var = g.mean, g.basis, g.eigvals, g.residual_var
        else:  # a singleton cluster: a point mass
            mean, basis, eig, residual_var = xk[0], x.new_zeros(D, 0), x.new_zeros(0), 0.0
        pad = rank - basis.shape[1]  # small clusters: pad the basis with zero-variance directions
        if pad:
            basis, eig = _complete_basis(basis, rank), torch.cat([eig, eig.new_full((pad,), residual_var)])
        means.append(mean)
        bases.append(basis)
        eigvals.append(eig)
        residual_vars.append(residual_var)
        log_weights.append(math.log(xk.shape[0] / N))
    dt = data.dtype
    return (torch.stack(means).to(dt), torch.stack(bases).to(dt), torch.stack(eigvals).to(dt),
            torch.tensor(residual_vars, dtype=dt), torch.tensor(log_weights, dtype=dt))


def fit_per_class(data, labels, rank, energy, num_classes, method):
    """GaussianMixture.fit_per_class (its docstring): the mixture's tensors."""
    if rank is not None and energy is not None:
        raise ValueError("give rank or energy, not both")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    reiterable = not isinstance(data, collections.abc.Iterator)
    if method == "randomized":
        if energy is not None or isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"fit_per_class(method='randomized') needs rank = an int >= 0 (not energy), got {rank!r}")
        if not reiterable:  # a one-shot iterator: every class sketched in one pass (fit_one_pass_per_class)
            return _from_class_fits(fit_one_pass_per_class(_labelled_batches(data, labels, num_classes), rank),
                                    num_classes)
        return _from_class_fits(fit_randomized_per_class(
            lambda: _labelled_batches(data, labels, num_classes), rank), num_classes)
    moments, D = {}, None
    for x, y in _labelled_batches(data, labels, num_classes):
        if D is None:
            D, device = x.shape[1], x.device
            dtype = x.dtype if x.is_floating_point() else torch.float32
        elif x.shape[1] != D:
            raise ValueError(f"data batches disagree on D: {x.shape[1]} vs {D}")
        y = y.to(x.device)
        for k in torch.unique(y).tolist():
            if k not in moments and (len(moments) + 1) * 8 * D * D > EXACT_FIT_BUDGET_BYTES:
                if method == "auto" and rank is not None and energy is None and reiterable:
                    return fit_per_class(data, labels, rank, None, num_classes, "randomized")
                raise ValueError(f"fit_per_class: {len(moments) + 1} classes of D = {D} need {len(moments) + 1} "
                                 f"float64 D x D matrices, over the {EXACT_FIT_BUDGET_BYTES / 2**30:g} GiB "
                                 "budget: give rank=r for method='randomized' (one pass over a one-shot iterator)")
            moments.setdefault(k, Moments()).add(x[y == k])
    if D is None:
        raise ValueError("fit_per_class: the data has no rows")
    fits = {}
    for k, mom in moments.items():
        if mom.n < 2:
            fits[k] = (None, mom.n)
            continue
        n, mean, _, scatter = centred(mom, D, device, None, _identity)
        fits[k] = (exact_from_scatter(n, mean, scatter, rank, energy, dtype, device), n)
    return _from_class_fits(fits, num_classes)


def _from_class_fits(class_fits, num_classes):
    """The mixture of fit_per_class from {class: (GaussianFit or None, rows)}: every class
    0..K-1 present with 2 rows or more, one shared rank, log weights the class frequencies."""
    K = num_classes if num_classes is not None else max(class_fits) + 1
    short = [k for k in range(K) if k not in class_fits or class_fits[k][1] < 2]
    if short:
        raise ValueError(f"fit_per_class: every class 0..{K - 1} needs at least 2 rows; classes {short} have "
                         f"{[class_fits[k][1] if k in class_fits else 0 for k in short]}")
    fits = [class_fits[k][0] for k in range(K)]
    counts = torch.tensor([class_fits[k][1] for k in range(K)], dtype=torch.float64)
    dtype, device = fits[0].mean.dtype, fits[0].mean.device
    r = max(g.rank for g in fits)
    bases = [g.basis if g.rank == r else _complete_basis(g.basis, r) for g in fits]
    eigvals = [torch.cat([g.eigvals, g.eigvals.new_full((r - g.rank,), g.residual_var)]) for g in fits]
    return (torch.stack([g.mean for g in fits]), torch.stack(bases), torch.stack(eigvals),
               torch.tensor([g.residual_var for g in fits], dtype=dtype, device=device),
               (counts / counts.sum()).log().to(dtype=dtype, device=device))


def _complete_basis(b: torch.Tensor, r: int) -> torch.Tensor:
    """Extend orthonormal columns b [D, r0] to r orthonormal columns."""
    D, r0 = b.shape
    g = torch.Generator().manual_seed(r0)
    extra = torch.randn(D, r - r0, dtype=torch.float64, generator=g).to(b)
    extra = extra - b @ (b.T @ extra)
    q, _ = torch.linalg.qr(torch.cat([b, extra], 1))
    return torch.cat([b, q[:, r0:]], 1)


def _assign_nonempty(x, centers):
    """Labels of the nearest center, after re-seeding each empty cluster with the point farthest
    from its center (which then is its own nearest center). With fewer distinct points than
    centers no re-seeding helps: a clear error."""
    k = centers.shape[0]
    exact = False  # exact differences once re-seeding: coinciding points at distance exactly 0
    for _ in range(k + 2):  # each re-seed puts one more center on a data point: <= k of them
        mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist_if_necessary"
        dist = torch.cdist(x, centers, compute_mode=mode)
        labels = dist.argmin(1)
        empty = (torch.bincount(labels, minlength=k) == 0).nonzero()
        if empty.numel() == 0:
            return labels
        if not exact:
            exact = True
            continue
        j = int(empty[0])
        far = dist.gather(1, labels[:, None])[:, 0]
        i = int(far.argmax())
        if far[i] == 0:
            n = torch.unique(x, dim=0).shape[0]
            raise ValueError(f"GaussianMixture.fit: the data has {n} distinct points, fewer than "
                             f"n_components = {k}")
        centers[j] = x[i]
    raise RuntimeError("k-means re-seeding did not converge")  # unreachable (see the loop bound)


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0):
    """Lloyd's k-means with k-means++ seeding on rows of x [N, D]. Returns (centers [k, D],
    labels [N]). Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    N = x.shape[0]
    centers = x[torch.randint(N, (1,), generator=g)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / N)
        nxt = x[torch.multinomial(p.cpu(), 1, generator=g)]
        centers = torch.cat([centers, nxt])
        d2 = torch.minimum(d2, ((x - nxt) ** 2).sum(1))
    labels = None
    for _ in range(iters):
        new = _assign_nonempty(x, centers)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            mask = labels == j
            if mask.any():
                centers[j] = x[mask].mean(0)
    return centers, labels


# ----------------------------------------------------------------------------- few rows, one pass


class _Kept:
    """The rows of one pass while they are few (at most `limit` rows and SMALL_FIT_BUDGET_BYTES
    as float64); rows is None once the pass outgrew that."""

    def __init__(self, limit, D, dtype, pool=None):
        self.limit = min(limit, SMALL_FIT_BUDGET_BYTES // (8 * max(D, 1)))
        self.rows, self.n, self.D = [], 0, D
        self.pool = [0] if pool is None else pool  # float64 elements kept, shared by every class's _Kept

    def wrap(self, passes):
        for x in passes:
            if self.rows is not None:
                self.n += x.shape[0]
                self.pool[0] += x.shape[0] * self.D
                if self.n > self.limit or 8 * self.pool[0] > SMALL_FIT_BUDGET_BYTES:
                    self.rows = None
                else:
                    self.rows.append(x.detach().to(torch.float64))
            yield x

    def matrix(self):
        return torch.cat(self.rows)


def _top_directions(M):
    """(eigenvalues of M^T M in descending order, their orthonormal directions [D, m]) for a short
    wide M [m, D], from the m x m Gram matrix (float64). Directions of zero eigenvalues are made
    up orthonormal (any serve)."""
    G = M @ M.T
    evals, V = torch.linalg.eigh(0.5 * (G + G.T))
    evals, V = evals.flip(0).clamp_min(0), V.flip(1)
    tiny = evals.max().item() * M.shape[0] * torch.finfo(M.dtype).eps if evals.numel() else 0.0
    good = evals > max(tiny, 0.0)
    U = (M.T @ V) / evals.clamp_min(1e-300).sqrt()
    if not bool(good.all()):
        k = int(good.sum())
        evals, U = evals[:k], U[:, :k]  # descending: the good ones come first
        evals, U = _pad_directions(evals, U, M.shape[0])
    return evals, U


def _pad_directions(evals, U, count):
    """evals / orthonormal U [D, k] padded to `count` (at most D) with zero-variance directions
    orthogonal to U."""
    D, k = U.shape
    count = min(count, D)
    if count <= k:
        return evals, U
    gen = torch.Generator().manual_seed(0)
    extra = torch.randn(D, count - k, dtype=U.dtype, generator=gen).to(U.device)
    extra = extra - U @ (U.T @ extra)
    extra = torch.linalg.qr(extra).Q
    extra = extra - U @ (U.T @ extra)  # a second projection against rounding
    return torch.cat([evals, evals.new_zeros(count - k)]), torch.cat([U, torch.linalg.qr(extra).Q], 1)


def _model_from_top(n, mean, trace, evals, U, rank, dtype):
    """The GaussianFit from the scatter's top eigenpairs (evals of the scatter, descending) and
    its exact trace; rank directions (padded with zero-variance directions if fewer)."""
    D = mean.shape[0]
    evals, U = _pad_directions(evals, U, rank)  # fewer rows than the rank: zero-variance directions
    evals, U = evals[:rank] / (n - 1), U[:, :rank]
    residual = max(trace / (n - 1) - evals.sum().item(), 0.0) / (D - rank) if rank < D else 0.0
    return GaussianFit(mean.to(dtype), U.to(dtype), evals.to(dtype), residual)


def _exact_small(rows, mean, trace, rank, dtype):
    """The exact fit from all n rows [n, D] (float64): the n x n Gram matrix of the centred rows."""
    return _model_from_top(rows.shape[0], mean, trace, *_top_directions(rows - mean), rank, dtype)


def fit_one_pass(data, rank: int, *, width: Optional[int] = None):
    """The randomized fit in ONE pass over the data (for one-shot iterators: a generator of
    samples from a network, a stream of shards): an incremental truncated SVD of the rows about
    an anchor (the first chunk's mean). A [width, D] float64 sketch B with B^T B ~ the scatter:
    each batch y is stacked under B and the top `width` right singular directions of [B; y] are
    kept (from the Gram matrix, (width + batch)^2 D per batch); the discarded part only lowers
    the kept eigenvalues. At the end the anchor is moved to the mean (a rank-one downdate within
    span(B, mean shift)), the trace is exact, residual_var = (trace - top r) / (D - r).
    width: ONE_PASS_WIDTH_FACTOR * rank + ONE_PASS_WIDTH_MIN by default. With n <= width rows
    nothing is discarded: the exact fit. Measured (D = 4096, 1500 rows, eigenvalues ~ 1/j over
    400 directions plus isotropic noise, rank 32, width 3 r): the top-r eigenvalues within
    0.8 % of the exact fit's (docs in tests/test_fit_one_pass.py)."""
    passes = data if isinstance(data, Passes) else Passes(data)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"the randomized fit needs rank = an int >= 0, got {rank!r}")
    D, dtype, device = passes.peek()
    if D is None:
        raise ValueError("fitting a Gaussian needs at least 2 samples, got 0")
    if rank > D:
        raise ValueError(f"rank must be in [0, D = {D}], got {rank}")
    if width is None:
        width = ONE_PASS_WIDTH_FACTOR * rank + ONE_PASS_WIDTH_MIN
    width = max(min(width, D), rank)
    sketch = _OnePass(D, width, device)
    for x in passes:
        if x.shape[1] != D:
            raise ValueError(f"data batches disagree on D: {x.shape[1]} vs {D}")
        sketch.add(x)
    return sketch.fit(rank, dtype)


class _OnePass:
    """fit_one_pass's state for one Gaussian: anchor, n, sum and squared norm about the anchor,
    and the [<= width, D] float64 sketch B (B^T B ~ the scatter about the anchor)."""

    def __init__(self, D, width, device):
        f64 = dict(dtype=torch.float64, device=device)
        self.width, self.B = width, torch.zeros(0, D, **f64)
        self.anchor, self.n, self.s, self.sq = None, 0, torch.zeros(D, **f64), torch.zeros((), **f64)
        self.step = max(1, min(CHUNK_ELEMS // max(D, 1), max(2 * width, 256)))  # rows merged at once

    def add(self, x):
        for i in range(0, x.shape[0], self.step):
            y = x[i:i + self.step].to(torch.float64)
            if not torch.isfinite(y).all():
                raise ValueError("data contains NaN or inf")
            if self.anchor is None:
                self.anchor = y.mean(0)
            y = y - self.anchor
            self.n, self.s, self.sq = self.n + y.shape[0], self.s + y.sum(0), self.sq + (y * y).sum()
            self.B = torch.cat([self.B, y])
            if self.B.shape[0] > self.width:
                evals, U = _top_directions(self.B)
                self.B = evals[:self.width].sqrt()[:, None] * U[:, :self.width].T

    def fit(self, rank, dtype):
        n, B = self.n, self.B
        if n < 2:
            raise ValueError(f"fitting a Gaussian needs at least 2 samples, got {n}")
        d = self.s / n  # the mean minus the anchor: scatter about the mean = B^T B - n d d^T (exact for B^T B)
        mean, trace = self.anchor + d, (self.sq - n * (d @ d)).item()
        basis = torch.linalg.qr(torch.cat([B, d[None]]).T).Q  # span(B rows, d)
        Bq, dq = B @ basis, basis.T @ d
        small = Bq.T @ Bq - n * torch.outer(dq, dq)
        evals, V = torch.linalg.eigh(0.5 * (small + small.T))
        evals, V = evals.flip(0).clamp_min(0), V.flip(1)
        return _model_from_top(n, mean, trace, evals, basis @ V, rank, dtype)


def fit_one_pass_per_class(pairs, rank: int, *, width: Optional[int] = None):
    """fit_one_pass of every class in the same single pass over (x [n, D], y [n]) batches (a
    one-shot iterator for fit_per_class(method="randomized")). Memory O(K D width).
    Returns {class: (GaussianFit or None when under 2 rows, rows)}."""
    states, D = {}, None
    for x, y in pairs:
        if D is None:
            D, device = x.shape[1], x.device
            dtype = x.dtype if x.is_floating_point() else torch.float32
            if rank > D:
                raise ValueError(f"rank must be in [0, D = {D}], got {rank}")
            w = max(min(ONE_PASS_WIDTH_FACTOR * rank + ONE_PASS_WIDTH_MIN if width is None else width, D), rank)
        elif x.shape[1] != D:
            raise ValueError(f"data batches disagree on D: {x.shape[1]} vs {D}")
        y = y.to(x.device)
        for k in torch.unique(y).tolist():
            states.setdefault(k, _OnePass(D, w, device)).add(x[y == k])
    if D is None:
        raise ValueError("fit_per_class: the data has no rows")
    return {k: ((st.fit(rank, dtype) if st.n >= 2 else None), st.n) for k, st in sorted(states.items())}
