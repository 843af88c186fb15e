"""Data models with analytically tractable noised scores: GaussianModel and GaussianMixture.

GaussianModel:   N(mean, U diag(eigvals) U^T + residual_var (I - U U^T)),  U = basis [D, r].
GaussianMixture: sum_k w_k N(means_k, U_k diag(eigvals_k) U_k^T + residual_var_k (I - U_k U_k^T)).
Both are validated on construction; fitted eigenvalues come sorted in descending order.
The fits are in fitting.py, the file format in _format.py.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Union

import numpy as np
import torch

from . import fitting, ops
from ._core import _format
from ._core._args import GaussianOperand, MixtureOperand, to_args
from ._scaleout.streamed import DEFAULT_BLOCK_BYTES, StreamedMixture

__all__ = ["GaussianModel", "GaussianMixture"]

Data = Union[torch.Tensor, Iterable[torch.Tensor]]


def _check_float(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")


def _check_nonneg(t, name):
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0 (a covariance has no negative eigenvalues), got min {t.min().item():.3g}")


def _check_orthonormal(basis, name):
    """Cheap O(D r) probe of U^T U = I: column norms and one random direction. The tolerance
    covers rounding an orthonormal basis to its dtype (bfloat16 keeps 8 bits)."""
    D, r = basis.shape[-2], basis.shape[-1]
    if r == 0:
        return
    b = basis.detach().reshape(-1, D, r)
    if b.dtype not in (torch.float32, torch.float64):
        b = b.float()  # half types: products in float32 (their rounding is in the tolerance)
    eps = torch.finfo(basis.dtype).eps
    tol = 1e-6 if basis.dtype == torch.float64 else max(1e-3, 4 * eps) * max(1.0, math.sqrt(r) / 8)
    norms = torch.linalg.vector_norm(b, dim=1, dtype=torch.float64).pow(2)
    v = torch.randn(r, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(b.device)
    v = v / v.norm()
    err = ((b.transpose(1, 2) @ (b @ v.to(b.dtype)[:, None]))[..., 0].double() - v).norm(dim=-1).max().item()
    if (norms - 1).abs().max().item() > tol or err > tol * math.sqrt(max(r, 1)):
        raise ValueError(f"{name} must have orthonormal columns (U^T U = I)")


def _check_points(t, name, where):
    """t must be [N, ...]: N >= 1 points of prod(...) features each (a 1-d tensor is ambiguous)."""
    if t.dim() < 2:
        raise ValueError(f"{where}: {name} must be [N, ...] (N points of D features), got shape {tuple(t.shape)}; "
                         f"for N one-dimensional points pass {name}[:, None]")
    if t.shape[0] == 0:
        raise ValueError(f"{where}: {name} has no points (N = 0)")


def _getstate(model):
    """Pickle / deepcopy state: the model's tensors, not its derived layouts (_layouts.py)."""
    return {k: v for k, v in model.__dict__.items() if k != "_layouts"}


class GaussianModel(GaussianOperand):
    """A Gaussian N(mean, U diag(eigvals) U^T + residual_var (I - U U^T)) over D = mean.numel()
    features. mean [D], basis [D, r] with orthonormal columns, eigvals [r] >= 0,
    residual_var >= 0 (0: the data lies in span(U))."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, eigvals: torch.Tensor, residual_var: float = 0.0):
        for t, n in ((mean, "mean"), (basis, "basis"), (eigvals, "eigvals")):
            _check_float(t, n)
        if mean.dim() != 1:
            raise ValueError(f"mean must be [D], got shape {tuple(mean.shape)}")
        D = mean.shape[0]
        if basis.dim() != 2 or basis.shape[0] != D:
            raise ValueError(f"basis must be [D, r] with D = {D}, got shape {tuple(basis.shape)}")
        if eigvals.dim() != 1 or eigvals.shape[0] != basis.shape[1]:
            raise ValueError(f"eigvals must be [r] with r = {basis.shape[1]}, got shape {tuple(eigvals.shape)}")
        if not (basis.device == mean.device == eigvals.device):
            raise ValueError("mean, basis and eigvals must be on one device")
        if isinstance(residual_var, torch.Tensor) and residual_var.requires_grad:
            raise TypeError("residual_var of a GaussianModel is a float and has no gradient; to learn it, use a "
                            "one-component GaussianMixture (its residual_var is a differentiable [K] tensor)")
        residual_var = float(residual_var)
        if not math.isfinite(residual_var) or residual_var < 0:
            raise ValueError(f"residual_var must be finite and >= 0, got {residual_var}")
        _check_nonneg(eigvals, "eigvals")
        _check_orthonormal(basis, "basis")
        dtype = mean.dtype
        self.mean = mean.contiguous()
        self.basis = basis.to(dtype).contiguous()
        self.eigvals = eigvals.to(dtype).contiguous()
        self.residual_var = residual_var

    __getstate__ = _getstate

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def device(self):
        return self.mean.device

    @property
    def dtype(self):
        return self.mean.dtype

    def __repr__(self):
        return f"GaussianModel(D={self.dim}, r={self.rank}, residual_var={self.residual_var:.4g}, dtype={self.dtype}, device={self.device})"

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, data: Data, rank: Optional[int] = None, energy: Optional[float] = None, method: str = "auto") -> "GaussianModel":
        """Fit mean and covariance to data [N, ...] (or an iterable of such batches, streamed and
        accumulated in float64, or a callable returning a fresh one). Keeps the top `rank`
        principal directions, or the fewest whose eigenvalues hold an `energy` fraction of the
        variance (default: all directions with nonzero variance); the rest is modelled as
        isotropic residual_var = their mean eigenvalue. The model has the dtype of the data
        (float32 for integer data). method: "exact" (a D x D matrix), "randomized" (needs rank;
        several passes, no D x D matrix) or "auto" (exact while D x D float64 fits 1 GiB);
        see gsa_kernels/fitting.py."""
        return cls(*fitting.fit_gaussian(data, rank, energy, method))

    # ------------------------------------------------------------------ conversion / io
    def to(self, *args, **kwargs) -> "GaussianModel":
        """A copy on another device / in another dtype: .to(dtype), .to(device), .to(tensor),
        .to(device, dtype), .to(device=..., dtype=...)."""
        device, dtype = to_args(args, kwargs, "GaussianModel")
        t = lambda v: v.to(device=device, dtype=dtype)
        return GaussianModel.__new_unchecked(t(self.mean), t(self.basis), t(self.eigvals), self.residual_var)

    @classmethod
    def __new_unchecked(cls, mean, basis, eigvals, residual_var):
        g = cls.__new__(cls)
        g.mean, g.basis, g.eigvals, g.residual_var = mean.contiguous(), basis.contiguous(), eigvals.contiguous(), float(residual_var)
        return g

    def state_dict(self):
        return {"mean": self.mean, "basis": self.basis, "eigvals": self.eigvals,
                "residual_var": torch.tensor(self.residual_var, dtype=torch.float64)}

    def save(self, path):
        """Save as safetensors (portable, no pickle)."""
        _format.save(path, self.state_dict(), "GaussianModel")

    @classmethod
    def load(cls, path, device="cpu") -> "GaussianModel":
        d = _format.load(path, device, "GaussianModel", ("mean", "basis", "eigvals", "residual_var"))
        return cls(d["mean"], d["basis"], d["eigvals"], float(d["residual_var"]))

    # ------------------------------------------------------------------ ops
    def denoise(self, x, sigma, backend="auto"):
        return ops.gaussian_denoise(x, sigma, self, backend=backend)

    def score(self, x, sigma, backend="auto"):
        return ops.gaussian_score(x, sigma, self, backend=backend)

    def flow(self, x, sigma_from, sigma_to, scale_from=1.0, scale_to=1.0, backend="auto"):
        return ops.gaussian_flow(x, sigma_from, sigma_to, self, scale_from, scale_to, backend=backend)

    def trajectory(self, x, sigmas, backend="auto"):
        return ops.gaussian_trajectory(x, sigmas, self, backend=backend)

    def __call__(self, x, sigma):
        """Denoiser interface f(x, sigma) -> x0 for samplers."""
        return self.denoise(x, sigma)

    def sample(self, n: int, generator: Optional[torch.Generator] = None):
        """n samples x0 ~ N(mean, Sigma), [n, D]."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=self.device)
        c = eps @ self.basis
        return self.mean + (c * self.eigvals.sqrt()) @ self.basis.T + math.sqrt(self.residual_var) * (eps - c @ self.basis.T)


class GaussianMixture(MixtureOperand):
    """K low-rank Gaussian components: means [K, D], bases [K, D, r] (orthonormal columns),
    eigvals [K, r] >= 0, residual_var [K] >= 0, log_weights [K] (normalised on construction;
    None = uniform). r = 0 with residual_var = 0 is the empirical "delta" mixture of points."""

    def __init__(self, means, bases, eigvals, residual_var=0.0, log_weights=None, *, _validate=True):
        for t, n in ((means, "means"), (bases, "bases"), (eigvals, "eigvals")):
            _check_float(t, n)
        if means.dim() != 2 or means.shape[0] == 0:
            raise ValueError(f"means must be [K, D] with K >= 1, got shape {tuple(means.shape)}")
        K, D = means.shape
        dtype, device = means.dtype, means.device
        if bases.dim() != 3 or bases.shape[:2] != (K, D):
            raise ValueError(f"bases must be [K, D, r] = [{K}, {D}, r], got shape {tuple(bases.shape)}")
        r = bases.shape[2]
        if eigvals.shape != (K, r):
            raise ValueError(f"eigvals must be [K, r] = [{K}, {r}], got shape {tuple(eigvals.shape)}")
        residual_var = torch.as_tensor(residual_var, dtype=dtype, device=device)
        if residual_var.dim() == 0:
            residual_var = residual_var.expand(K)
        if residual_var.shape != (K,):
            raise ValueError(f"residual_var must be a float or [K] = [{K}], got shape {tuple(residual_var.shape)}")
        if log_weights is None:
            log_weights = torch.zeros(K, dtype=dtype, device=device)
        log_weights = torch.as_tensor(log_weights, dtype=dtype, device=device)
        if log_weights.shape != (K,):
            raise ValueError(f"log_weights must be [K] = [{K}], got shape {tuple(log_weights.shape)}")
        for t in (bases, eigvals, residual_var, log_weights):
            if t.device != device:
                raise ValueError("all mixture tensors must be on one device")
        _check_float(residual_var, "residual_var")
        if torch.isnan(log_weights).any() or torch.isposinf(log_weights).any() or torch.isneginf(log_weights).all():
            raise ValueError("log_weights must be finite or -inf, with at least one finite")
        _check_nonneg(eigvals, "eigvals")
        _check_nonneg(residual_var, "residual_var")
        if _validate:
            _check_orthonormal(bases, "bases")
        self.means = means.contiguous()
        self.bases = bases.to(dtype).contiguous()
        self.eigvals = eigvals.to(dtype).contiguous()
        self.residual_var = residual_var.contiguous()
        self.log_weights = torch.log_softmax(log_weights.double(), 0).to(dtype).contiguous()

    __getstate__ = _getstate

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def rank(self) -> int:
        return self.bases.shape[2]

    @property
    def device(self):
        return self.means.device

    @property
    def dtype(self):
        return self.means.dtype

    def __repr__(self):
        return f"GaussianMixture(K={self.num_components}, D={self.dim}, r={self.rank}, dtype={self.dtype}, device={self.device})"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_points(cls, points, log_weights=None, *, block_bytes: Optional[int] = None,
                    key: Optional[str] = None) -> "GaussianMixture":
        """The empirical ("delta") mixture of a training set: one zero-variance component per
        point [N, ...]. Its noised score is the exact score of the training distribution.

        points: a tensor, a numpy array (shared, not copied, where torch can), or -- for training
        sets larger than memory -- a numpy.memmap or the path of a .npy / .safetensors file
        (`key`: which tensor of a .safetensors file). Those stay in the file and the ops stream
        them in blocks (gsa_kernels/_scaleout/streamed.py): the result is a StreamedMixture, with
        `block_bytes` (default 256 MiB) of anonymous memory for the points whatever N is."""
        if isinstance(points, (np.memmap, str, os.PathLike)):
            return StreamedMixture(points, log_weights, DEFAULT_BLOCK_BYTES if block_bytes is None else block_bytes, key)
        if isinstance(points, np.ndarray):
            points = torch.from_numpy(points)
        _check_float(points, "points")
        _check_points(points, "points", "from_points")
        pts = points.reshape(points.shape[0], math.prod(points.shape[1:]))
        N, D = pts.shape
        return cls(pts, pts.new_zeros(N, D, 0), pts.new_zeros(N, 0), 0.0, log_weights)

    @classmethod
    def fit(cls, data: torch.Tensor, n_components: int, rank: int, iters: int = 100, seed: int = 0) -> "GaussianMixture":
        """k-means (k-means++ seeding, fixed seed) then per-cluster PCA, as in Wang & Vastola:
        each cluster keeps its top `rank` directions; the rest is isotropic residual_var (the
        mean of its remaining eigenvalues). Weights are the cluster fractions."""
        _check_float(data, "data")
        _check_points(data, "data", "GaussianMixture.fit")
        return cls(*fitting.fit_mixture(data, n_components, rank, iters, seed))

    @classmethod
    def fit_per_class(cls, data, labels=None, rank: Optional[int] = None, energy: Optional[float] = None, *,
                      num_classes: Optional[int] = None, method: str = "auto") -> "GaussianMixture":
        """One Gaussian per class, for class-conditional teleportation (gk.sampling.teleport(...,
        labels=y)): component k is the exact GaussianModel.fit(rows of class k, rank, energy),
        log_weights the log class frequencies.

        data [N, ...] with labels [N] (integer classes 0..K-1); or, streamed in one pass, an
        iterable of (x [n, ...], y [n]) batches -- a list of pairs, a DataLoader over a labelled
        dataset, a generator, or a callable returning one -- with labels=None. Per-class moments
        are accumulated in float64 (K matrices D x D: at most fitting.EXACT_FIT_BUDGET_BYTES in
        all, else a ValueError). K = num_classes, or the largest label + 1; component k is class
        k. Every class 0..K-1 needs at least 2 rows: an absent or single-row class has no
        covariance to fit, so that is a ValueError naming the classes (relabel to 0..K'-1 to
        leave a class out). The components share one rank r (bases [K, D, r]): with energy or
        rank=None each class chooses its own (as GaussianModel.fit), r is the largest, and a
        class that chose fewer gets further directions of its residual space at eigenvalue
        residual_var, which leaves its covariance unchanged. The model has the data's dtype
        (float32 for integer data).

        method: "exact" (one pass, K float64 D x D matrices within fitting.EXACT_FIT_BUDGET_BYTES),
        "randomized" (needs rank; every class sketched at once, power_iters + 1 = 3 passes over
        re-iterable data, memory O(K D rank), no D x D; fitting.fit_randomized_per_class) or
        "auto": exact until the classes met need more than the budget, then, given rank and
        re-iterable data, the randomized fit from the start (the first pass is not reused)."""
        return cls(*fitting.fit_per_class(data, labels, rank, energy, num_classes, method))

    def shard(self, index: int, count: int) -> "GaussianMixture":
        """The index-th of `count` near-equal contiguous slices of the components (the first
        K % count slices hold one more), copied, with log_weights unchanged (not renormalised),
        so that gk.merge_partials of the gk.mixture_partial of every shard equals the whole
        mixture. A shard may be empty (count > K); only gk.mixture_partial accepts it."""
        for v, n in ((index, "index"), (count, "count")):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"shard: {n} must be an int, got {type(v).__name__}")
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard: need count >= 1 and 0 <= index < count, got index={index}, count={count}")
        K = self.num_components
        lo = index * (K // count) + min(index, K % count)
        hi = lo + K // count + (index < K % count)
        # built like .to(): the constructor would renormalise the weights and refuse K = 0
        m = GaussianMixture.__new__(GaussianMixture)
        m.means, m.bases, m.eigvals = (t[lo:hi].clone() for t in (self.means, self.bases, self.eigvals))
        m.residual_var, m.log_weights = self.residual_var[lo:hi].clone(), self.log_weights[lo:hi].clone()
        return m

    # ------------------------------------------------------------------ conversion / io
    def to(self, *args, **kwargs) -> "GaussianMixture":
        """A copy on another device / in another dtype (the torch idioms, as GaussianModel.to)."""
        device, dtype = to_args(args, kwargs, "GaussianMixture")
        t = lambda v: v.to(device=device, dtype=dtype)
        m = GaussianMixture.__new__(GaussianMixture)
        m.means, m.bases, m.eigvals = t(self.means), t(self.bases), t(self.eigvals)
        m.residual_var, m.log_weights = t(self.residual_var), t(self.log_weights)
        return m

    def state_dict(self):
        return {"means": self.means, "bases": self.bases, "eigvals": self.eigvals,
                "residual_var": self.residual_var, "log_weights": self.log_weights}

    def save(self, path):
        # log weights stored as they are: a shard's (m.shard(i, n)) sum to less than 1, and
        # load() must not renormalise them
        _format.save(path, self.state_dict(), "GaussianMixture", log_weights="as_saved")

    @classmethod
    def load(cls, path, device="cpu") -> "GaussianMixture":
        meta = _format.metadata(path)
        if meta.get("gsa_kernels") == "StreamedMixture":  # refers to its points file
            return StreamedMixture.from_saved(_format.load(path, device, "StreamedMixture", ("log_weights",)), meta).to(device)
        d = _format.load(path, device, "GaussianMixture", ("means", "bases", "eigvals", "residual_var", "log_weights"))
        m = cls(d["means"], d["bases"], d["eigvals"], d["residual_var"], d["log_weights"])
        if meta.get("log_weights") == "as_saved":  # a shard keeps its share of the whole mixture's weight
            lw = d["log_weights"].to(m.dtype)
            if torch.logsumexp(lw.double(), 0).item() > 1e-4:
                raise ValueError(f"{path}: log_weights sum to more than 1 (logsumexp "
                                 f"{torch.logsumexp(lw.double(), 0).item():.3g} > 0): not a mixture or a shard of one")
            m.log_weights = lw.contiguous()
        return m

    # ------------------------------------------------------------------ ops
    def denoise(self, x, sigma, return_weights=False, backend="auto"):
        return ops.mixture_denoise(x, sigma, self, return_weights=return_weights, backend=backend)

    def score(self, x, sigma, backend="auto"):
        return ops.mixture_score(x, sigma, self, backend=backend)

    def logp(self, x, sigma, backend="auto"):
        return ops.mixture_logp(x, sigma, self, backend=backend)

    def __call__(self, x, sigma, labels=None):
        """Denoiser interface f(x, sigma) -> x0 for samplers. With labels [B] int64 (one
        component per class, e.g. fit_per_class): row b gets component labels[b]'s Gaussian
        denoiser (gk.gaussian_denoise(x, sigma, self, labels=labels)), the class-conditional one."""
        if labels is not None:
            return ops.gaussian_denoise(x, sigma, self, labels=labels)
        return self.denoise(x, sigma)

    def sample(self, n: int, generator: Optional[torch.Generator] = None):
        """n samples x0 from the mixture, [n, D]."""
        k = torch.multinomial(self.log_weights.double().exp(), n, replacement=True, generator=generator).to(self.device)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.dtype).to(self.device)
        U = self.bases[k]  # [n, D, r]
        c = torch.einsum("nd,ndr->nr", eps, U)
        in_span = torch.einsum("nr,ndr->nd", c, U)
        return (self.means[k] + torch.einsum("nr,ndr->nd", c * self.eigvals[k].sqrt(), U)
                + self.residual_var[k, None].sqrt() * (eps - in_span))
