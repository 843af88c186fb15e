"""The one case list of the conformance suite, shared by every backend.

A case builds the arguments of one kernel-level op (gsa_kernels/_core/_contract.py) in float64 from a
seed; the suite rounds x to the case's dtype and everything else to the compute dtype, and the
truth is the reference in float64 on exactly those rounded values. Families:

  tiles     shapes one below / at / above every tile edge of every backend (below), per-sample
            sigma over 0.002..80, r in {0, 1, D} and in between, K from 1 to several hundred
  dtypes    float16 / bfloat16 / float64 (float32 is every other family's dtype)
  sigma     one sigma for all rows: 1e-6 .. 1e4 (float32 / float64; 16-bit outputs would over- or
            underflow there), the EDM range ends 0.002 and 80 in between
  flow      (gaussian_map) the flow kind: sigma_from = inf rows, scales, sigma_to = 0 and backward
  tie       near ties: nearly equal 1-d subspaces (low-rank) and midpoints of two training points
            (delta mixture); weights within total variation 1e-3 of the truth
  dense     empirical mixtures whose posterior weights spread (few-hot at sigma 5, dense at 10)
            over components in several tiles and splits: the dense back-projection; low-rank
            ones (sigma 3, 30) whose float32 logits need refinement everywhere (cpu: the
            float64-GEMM refinement)
  split     few queries over many points (B 1, 3, 13, K 300, D 1024 / 1046), one-hot to dense:
            the sampler's case (the cpu kernel splits the points over its threads for B <= 16)
  const     empirical / isotropic mixtures whose points share the value of most coordinates (a
            blank border), with rows enough for the cpu kernel to drop those coordinates
  inf       -inf log weights (components that must get weight 0)
  nan       NaN rows in x: NaN outputs in those rows exactly where the truth has them
  grid      more rows / steps than one CUDA grid dimension holds (65535 blocks)
  split     (mixture_posterior) the components cut into extra["split"] parts, merged as the
            file-backed, sharded and distributed paths merge them: ties across parts, 16-bit x
  score     (gk.mixture_score, the public op) sigma 0.002 / 0.01, float32 / bfloat16 x, where
            (D - x) / sigma^2 cancels: one low-rank component (the Gaussian score's bound), a
            query near one training point, a near tie, 40 duplicated points (past the pairs cap),
            points in a file (streamed blocks); test_conformance.test_mixture_score
  labels    (gaussian_map_labeled / gaussian_trajectory_labeled) K Gaussians, row b under
            component labels[b]: every label present, rows sorted by label, labels missing, all
            rows one label; across the labelled row tiles (triton 16 rows interpreted / 64 on GPU,
            cuda 32); test_labels.py
  local_posterior (LocalCase): machines (LS / ELS zeros and circular, BBELS zeros x P 1, 3, 5 and
            2 max(H, W) + 1 x C 1, 3), tiles (non-square H x W with HW one below / at / above
            16, 32, 64, 128 pixels, N across 16 and 32 images, a 1 x 1 image), dtypes, sigma
            (1e-4 .. 1e4, one per case), tie (two patches 1e-3 apart in one pixel, sigma 0.002 /
            0.01), offset (pixels 1000 +- 1: the cancelling forms' case), sparse (MNIST-like
            images: exact ties among all-zero windows), nan; and the
            identities (local_identity_cases: LS zeros large P = the delta mixture, BBELS P 1 =
            ELS P 1), test_conformance.test_local_identity

Tile edges (read from the sources; keep in sync when they change):
  triton interpreter  gaussian BLOCK_B 16, BLOCK_D 32, BLOCK_R 16, c in registers for r <= 16;
                      mixture BLOCK_B 16, BLOCK_D 32 (also the depth of the r = 0 x.mu dots),
                      BLOCK_R 16 (registers r <= 16), BLOCK_K 16, BLOCK_DS 16, merge BLOCK_N 64;
                      split-K over 4 programs
                      (gsa_kernels/triton/{gaussian,mixture,_config}.py)
                      local_posterior: BLOCK_U 32 query pixels per program, LS BLOCK_N 16
                      images per tile (32 on GPU), ELS / BB-ELS BLOCK_V 32 pixels of one image,
                      BLOCK_K 64 window entries C P^2 per step (8 on GPU; P 5 C 3 = 75 and P 15
                      = 225 cross it), C padded to a power of 2 (C 5 -> 8) (triton/local.py)
  cuda                kTile 32 (rows, D, r), 8 rows per pass; projection split over D when
                      ceil(D/32)/4 >= 2 (D >= 257 on the emulation's 4 multiprocessors); mixture
                      8 rows per block, 32-component chunks (r = 0), 32-coefficient chunks of
                      the projection (r > 0), 128-d back-projection tiles, split K >= 256 (r = 0)
                      (csrc/cuda/params.h, csrc/emu/cuda_emu.cpp); local_posterior: 128 query
                      pixels per block (HW 128 / 129 / 143 cross it), channels in groups of 4
                      per pass over the candidates (C 5 crosses it)
  cpu                 row blocks of clamp(1.5 MiB / (D * 4 bytes), 16, 256) rows (257 rows cross
                      one); mixture component blocks of 256 (r = 0) or max(4, 1024 / r) (r > 0),
                      row blocks of ceil(B / threads) (csrc/cpu/common.h, csrc/cpu/mixture.cpp)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from gsa_kernels._core._contract import LocalMode, LocalPadding, SpectralKind
from tests._helpers import orthonormal as _orthonormal

F64 = torch.float64
EDM = (0.002, 80.0)  # the EDM sigma range


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    B: int
    D: int
    r: int
    dtype: torch.dtype = torch.float32
    residual_var: Optional[float] = 0.3  # None (mixtures): random per component in [0, 0.5)
    sigma: Optional[float] = None  # None: per-sample, log-uniform over the EDM range
    kind: SpectralKind = SpectralKind.DENOISE  # gaussian_map
    T: int = 1  # gaussian_trajectory
    K: int = 1  # mixture_posterior; the labelled ops' components
    neg_inf_weights: int = 0  # mixtures: this many components get log weight -inf
    nan_rows: tuple = ()
    seed: int = 0
    interpreter: bool = True  # False: too many programs for the Triton interpreter (tens of ms each)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def id(self):
        return f"{self.family}-{self.name}"


def _gen(case):
    return torch.Generator().manual_seed(1000 + case.seed)


def _log_uniform(n, lo, hi, gen):
    """n values from lo to hi, log-uniform; the first two are the ends (when n >= 2)."""
    v = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(lo), math.log(hi), generator=gen))
    v[: min(n, 2)] = torch.tensor([lo, hi], dtype=F64)[: min(n, 2)]
    return v


def _row_sigma(case, gen):
    if case.sigma is not None:
        return torch.full((case.B,), case.sigma, dtype=F64)
    return _log_uniform(case.B, *EDM, gen)


def _add_nans(x, case):
    for b in case.nan_rows:
        x[b, b % x.shape[1]] = math.nan  # one NaN per row, at different features
    return x


# ----------------------------------------------------------------------------- Gaussian ops


def _gaussian_model(case, gen):
    D, r = case.D, case.r
    basis = _orthonormal(D, r, gen)
    eigvals = 10.0 ** torch.empty(r, dtype=F64).uniform_(-3, 1, generator=gen)  # 1e-3 .. 10
    mean = torch.randn(D, dtype=F64, generator=gen)
    residual_var = 0.0 if r == D else case.residual_var
    return mean, basis, eigvals, residual_var


def _gaussian_sample(mean, basis, eigvals, residual_var, B, gen):
    """x0 ~ N(mean, U diag(eigvals) U^T + residual_var P_perp): the data a sampler denoises."""
    eps = torch.randn(B, mean.shape[0], dtype=F64, generator=gen)
    c = eps @ basis
    return mean + (c * eigvals.sqrt()) @ basis.T + math.sqrt(residual_var) * (eps - c @ basis.T)


def gaussian_map_args(case):
    """(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind), float64."""
    gen = _gen(case)
    mean, basis, eigvals, residual_var = _gaussian_model(case, gen)
    sigma_from = _row_sigma(case, gen)
    x0 = _gaussian_sample(mean, basis, eigvals, residual_var, case.B, gen)
    x, *rows = _map_rows(case, gen, sigma_from, x0)
    return (x, mean, basis, eigvals, residual_var, *rows)


def _map_rows(case, gen, sigma_from, x0):
    """(sigma_from, sigma_to, scale_from, scale_to, kind) and x (with the case's NaNs) from data x0:
    a noised x0 at sigma_from, or for flows a scaled state, rows going to 0, down, and backward,
    row 2 from unit noise."""
    B = case.B
    eps = torch.randn(B, case.D, dtype=F64, generator=gen)
    if case.kind == SpectralKind.FLOW:
        # to 0 (the ODE's end), to a smaller sigma, backward to a larger one; schedule scalings
        sigma_to = sigma_from * torch.tensor([0.0, 0.1, 0.5, 1.5], dtype=F64).repeat(B)[:B]
        scale_from = torch.empty(B, dtype=F64).uniform_(0.5, 1.5, generator=gen)
        scale_to = torch.empty(B, dtype=F64).uniform_(0.5, 1.5, generator=gen)
        x = scale_from[:, None] * (x0 + sigma_from[:, None] * eps)
        if B >= 3 and case.sigma is None:
            sigma_from[2] = math.inf  # row 2 starts from unit noise
            sigma_to[2] = 1.0
            x[2] = eps[2]
    else:
        sigma_to, scale_from, scale_to = sigma_from, sigma_from, sigma_from
        x = x0 + sigma_from[:, None] * eps
    return _add_nans(x, case), sigma_from, sigma_to, scale_from, scale_to, int(case.kind)


def gaussian_trajectory_args(case):
    """(x, mean, basis, eigvals, residual_var, sigmas [T, B]), float64."""
    gen = _gen(case)
    mean, basis, eigvals, residual_var = _gaussian_model(case, gen)
    sigmas = _trajectory_sigmas(case, gen)
    x0 = _gaussian_sample(mean, basis, eigvals, residual_var, case.B, gen)
    x = x0 + sigmas[0][:, None] * torch.randn(case.B, case.D, dtype=F64, generator=gen)
    return _add_nans(x, case), mean, basis, eigvals, residual_var, sigmas


def _trajectory_sigmas(case, gen):
    """sigmas [T, B]: a start per sample, later steps down to 0, some above the start (backward)."""
    B, T = case.B, case.T
    start = _log_uniform(B, 0.01, 80.0, gen) if case.sigma is None else torch.full((B,), case.sigma, dtype=F64)
    later = start * torch.rand(max(T - 1, 0), B, dtype=F64, generator=gen) * 1.3
    if T >= 3:
        later[-1] = 0.0
    return torch.cat([start[None], later])


# ----------------------------------------------------------------------------- labelled Gaussian ops


def _labels(case, gen):
    """labels [B] of the case's pattern (extra["labels"]): "mixed" (random, every label present),
    "sorted" (rows grouped by label, in order), "missing" (labels 1 and 3 only), "one" (every row
    label K - 1)."""
    B, K = case.B, case.K
    pattern = case.extra.get("labels", "mixed")
    if pattern == "one":
        return torch.full((B,), K - 1, dtype=torch.int64)
    if pattern == "sorted":
        return torch.arange(B) * K // B
    if pattern == "missing":
        return torch.tensor([1, 3])[torch.randint(0, 2, (B,), generator=gen)]
    labels = torch.randint(0, K, (B,), generator=gen)
    labels[torch.randperm(B, generator=gen)[:K]] = torch.arange(K)
    return labels


def _labeled_models(case, gen):
    """K Gaussians stacked (means, bases, eigvals, residual_var [K]: distinct per component) and
    the labels; each row's data x0 is a sample of its own component."""
    parts = [_gaussian_model(case, gen) for _ in range(case.K)]
    means, bases, eigvals = (torch.stack([p[i] for p in parts]) for i in range(3))
    residual_var = torch.rand(case.K, dtype=F64, generator=gen) * 0.5 if case.r < case.D else torch.zeros(case.K, dtype=F64)
    labels = _labels(case, gen)
    x0 = torch.stack([_gaussian_sample(means[k], bases[k], eigvals[k], float(residual_var[k]), case.B, gen) for k in range(case.K)])
    return labels, means, bases, eigvals, residual_var, x0[labels, torch.arange(case.B)]


def gaussian_map_labeled_args(case):
    """(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to, scale_from, scale_to, kind)."""
    gen = _gen(case)
    labels, means, bases, eigvals, residual_var, x0 = _labeled_models(case, gen)
    x, *rows = _map_rows(case, gen, _row_sigma(case, gen), x0)
    return (x, labels, means, bases, eigvals, residual_var, *rows)


def gaussian_trajectory_labeled_args(case):
    """(x, labels, means, bases, eigvals, residual_var, sigmas [T, B])."""
    gen = _gen(case)
    labels, means, bases, eigvals, residual_var, x0 = _labeled_models(case, gen)
    sigmas = _trajectory_sigmas(case, gen)
    x = x0 + sigmas[0][:, None] * torch.randn(case.B, case.D, dtype=F64, generator=gen)
    return _add_nans(x, case), labels, means, bases, eigvals, residual_var, sigmas


# ----------------------------------------------------------------------------- mixture posterior


def _mixture_random(case, gen):
    K, D, r = case.K, case.D, case.r
    means = torch.randn(K, D, dtype=F64, generator=gen) + case.extra.get("offset", 0.0)
    if case.extra.get("constant_every"):  # all but every n-th coordinate the same for every point (a blank border)
        fixed = torch.arange(D) % case.extra["constant_every"] != 0
        means[:, fixed] = torch.linspace(-1, 1, int(fixed.sum()), dtype=F64)
    bases = torch.stack([_orthonormal(D, r, gen) for _ in range(K)]) if r else torch.zeros(K, D, 0, dtype=F64)
    eigvals = 10.0 ** torch.empty(K, r, dtype=F64).uniform_(-2, 1, generator=gen)  # 0.01 .. 10
    eigvals = eigvals * case.extra.get("eigvals_scale", 1.0)
    if case.extra.get("offset") and r:  # the leading direction is the offset's (an image's brightness)
        ones = torch.full((D, 1), D ** -0.5, dtype=F64)
        bases[:, :, 0:1] = ones
        for k in range(K):
            q, rr = torch.linalg.qr(bases[k])
            bases[k] = q * torch.sign(torch.diagonal(rr))
    if case.residual_var is None:
        residual_var = torch.rand(K, dtype=F64, generator=gen) * 0.5
    else:
        residual_var = torch.full((K,), 0.0 if r == D else case.residual_var, dtype=F64)
    log_weights = torch.randn(K, dtype=F64, generator=gen)
    if case.neg_inf_weights:
        log_weights[torch.randperm(K, generator=gen)[: case.neg_inf_weights]] = -math.inf
    log_weights = torch.log_softmax(log_weights, 0)
    # x near the data: a component's sample (an allowed one) plus sigma noise
    allowed = torch.nonzero(torch.isfinite(log_weights))[:, 0]
    k = allowed[torch.randint(0, allowed.numel(), (case.B,), generator=gen)]
    eps = torch.randn(case.B, D, dtype=F64, generator=gen)
    c = torch.einsum("bd,bdr->br", eps, bases[k])
    in_span = torch.einsum("br,bdr->bd", c, bases[k])
    x0 = means[k] + torch.einsum("br,bdr->bd", c * eigvals[k].sqrt(), bases[k]) + residual_var[k, None].sqrt() * (eps - in_span)
    return means, bases, eigvals, residual_var, log_weights, x0


def _lowrank_tie(case, gen):
    """Two components, 1-d subspaces 1e-5 apart, eigvals 1e4, residual_var 0, means 0, x = 100 u
    + 2e-3 noise (D = 64): the weights hinge on |P_perp y|^2 / sigma^2 of two nearly equal
    projections (at sigma = 0.01 exact weights ~ [0.6, 0.4])."""
    D = case.D
    u = _orthonormal(D, 2, gen)
    u1, u2 = u[:, 0], u[:, 0] + 1e-5 * u[:, 1]
    bases = torch.stack([u1, u2 / u2.norm()])[:, :, None]
    if case.extra.get("float32_basis"):  # orthonormal to ~1e-8 only: the residual must be summed directly
        bases = bases.float().double()
    means = torch.zeros(2, D, dtype=F64)
    eigvals = torch.full((2, 1), 1e4, dtype=F64)
    x0 = 100.0 * u1.expand(case.B, D) + 2e-3 * torch.randn(case.B, D, dtype=F64, generator=gen)
    return means, bases, eigvals, torch.zeros(2, dtype=F64), torch.log(torch.full((2,), 0.5, dtype=F64)), x0


def _delta_tie(case, gen):
    """The empirical mixture of K image-like points in [-1, 1]^D; queries at midpoints of two
    points + 1e-3 noise per coordinate (D = 3072): two logits of ~|y|^2 / 2 sigma^2 nearly equal.
    Rows 4.. get 1e-6 noise instead: ties that stay ties down to sigma ~ 0.01."""
    K, D = case.K, case.D
    points = torch.rand(K, D, dtype=F64, generator=gen) * 2 - 1
    i = torch.arange(case.B) % K
    j = (i + 1 + torch.arange(case.B) // K) % K
    if case.extra.get("split"):  # partners in different parts of the split (K // 2 apart)
        j = (i + K // 2) % K
    noise = torch.where(torch.arange(case.B) < 4, 1e-3, 1e-6).to(F64)[:, None]
    x0 = (points[i] + points[j]) / 2 + noise * torch.randn(case.B, D, dtype=F64, generator=gen)
    zeros = torch.zeros(K, dtype=F64)
    return points, torch.zeros(K, D, 0, dtype=F64), torch.zeros(K, 0, dtype=F64), zeros, zeros - math.log(K), x0


def mixture_posterior_args(case):
    """(x, means, bases, eigvals, residual_var, log_weights, sigma): the need_* flags are the
    test's; float64."""
    gen = _gen(case)
    build = {"lowrank_tie": _lowrank_tie, "delta_tie": _delta_tie}.get(case.extra.get("build"), _mixture_random)
    means, bases, eigvals, residual_var, log_weights, x0 = build(case, gen)
    sigma = _row_sigma(case, gen)
    if case.extra.get("build"):  # ties: the query is the point (sigma noise would break the tie)
        x = x0.clone()
    else:
        x = x0 + sigma[:, None] * torch.randn(case.B, case.D, dtype=F64, generator=gen)
    return _add_nans(x, case), means, bases, eigvals, residual_var, log_weights, sigma


# ----------------------------------------------------------------------------- the public mixture score


def _score_points(case, gen):
    """K image-like points in [-1, 1]^D; point K // 2 is point 0 moved by sigma / 2 (near_tie) or
    3 sigma (near_point), in the other half of the points (blocks and shards cut there);
    extra["duplicates"] = n: points 1..n are copies of point 0 (a dense posterior at small sigma)."""
    K, D = case.K, case.D
    points = torch.rand(K, D, dtype=F64, generator=gen) * 2 - 1
    u = torch.randn(D, dtype=F64, generator=gen)
    if case.extra["build"] in ("near_tie", "near_point"):  # near_point: a neighbour of weight ~1e-2
        points[K // 2] = points[0] + (0.5 if case.extra["build"] == "near_tie" else 3.0) * case.sigma * u / u.norm()
    n = case.extra.get("duplicates", 0)
    points[1:1 + n] = points[0]
    return points


def mixture_score_args(case):
    """(x, means, bases, eigvals, residual_var, log_weights, sigma), float64, for gk.mixture_score
    at one small sigma, where (D - x) / sigma^2 cancels (extra["build"]):
      one        one low-rank component with residual variance, x its sample + sigma noise (the
                 Gaussian ops' case: test_conformance.test_mixture_score checks it with their scale)
      near_point the empirical mixture, x a point + 1e-4 noise, a neighbour 3 sigma away (weight
                 ~1e-2, so that D is a rounded sum): |D - x| ~ 1e-3
      near_tie   x at the midpoint of point 0 and its near copy K // 2 + 0.1 sigma noise: weights ~0.5
      duplicates x near point 0 and its copies: more components with weight than the pairs cap"""
    gen = _gen(case)
    B, D, build = case.B, case.D, case.extra["build"]
    sigma = torch.full((B,), case.sigma, dtype=F64)
    if build == "one":
        means, bases, eigvals, residual_var, log_weights, x0 = _mixture_random(case, gen)
        # data away from the origin (|x| ~ 30); in-span variances above the residual one, so
        # that the largest term of the Gaussian score's bound is the off-span part, ~|truth|
        means, x0, eigvals = means + 4.0, x0 + 4.0, eigvals + 1.0
        x = x0 + case.sigma * torch.randn(B, D, dtype=F64, generator=gen)
        return x, means, bases, eigvals, residual_var, log_weights, sigma
    points = _score_points(case, gen)
    K = case.K
    if build == "near_tie":
        x = (points[0] + points[K // 2]) / 2 + 0.1 * case.sigma * torch.randn(B, D, dtype=F64, generator=gen)
    else:  # near_point, duplicates: rows near point 0, 1, 2, 0, 1, 2, ...
        i = torch.arange(B) % 3
        i[i > 0] += case.extra.get("duplicates", 0)
        x = points[i] + 1e-4 * torch.randn(B, D, dtype=F64, generator=gen)
    zeros = torch.zeros(K, dtype=F64)
    return x, points, torch.zeros(K, D, 0, dtype=F64), torch.zeros(K, 0, dtype=F64), zeros, zeros - math.log(K), sigma


def mixture_score_cases():
    """One sigma per case (0.002, 0.01), float32 and bfloat16 x; B 6, D 64 (two triton D
    blocks). extra["source"] = "file": the points in a .npy file, streamed in blocks of 8 (the
    tie straddles two blocks)."""
    cases = []
    shapes = {"one": (1, 4, 0.3), "near_point": (20, 0, 0.0), "near_tie": (20, 0, 0.0)}
    for build, (K, r, residual_var) in shapes.items():
        for sigma in (0.002, 0.01):
            for dtype in (torch.float32, torch.bfloat16):
                name = f"{build}_{_shape_name(6, 64, r, K=K)}_{_sigma_name(sigma)}_{_DT[dtype]}"
                cases.append(Case("score", name, 6, 64, r, K=K, dtype=dtype, residual_var=residual_var, sigma=sigma,
                                  extra={"build": build}))
    cases.append(Case("score", f"duplicates_{_shape_name(6, 64, 0, K=44)}_s0.002_f32", 6, 64, 0, K=44, residual_var=0.0,
                      sigma=0.002, extra={"build": "duplicates", "duplicates": 40}))
    for build in ("near_point", "near_tie"):
        cases.append(Case("score", f"{build}_{_shape_name(6, 64, 0, K=20)}_s0.002_f32_file", 6, 64, 0, K=20,
                          residual_var=0.0, sigma=0.002, extra={"build": build, "source": "file"}))
    return cases


# ----------------------------------------------------------------------------- the lists


def _shape_name(B, D, r, **more):
    return "_".join([f"B{B}", f"D{D}", f"r{r}"] + [f"{k}{v}" for k, v in more.items()])


_DT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}
_KINDS = {SpectralKind.DENOISE: "denoise", SpectralKind.SCORE: "score", SpectralKind.FLOW: "flow"}


def _sigma_name(s):
    return f"s{s:g}"


GAUSSIAN_TILE_SHAPES = [  # (B, D, r)
    (1, 1, 0), (1, 61, 0), (15, 31, 1),
    (16, 32, 16), (17, 33, 17),  # triton BLOCK_B / BLOCK_D / BLOCK_R and the register rank
    (33, 65, 31), (31, 64, 33),  # cuda kTile 32 in rows, D and r
    (17, 33, 33), (8, 64, 64),  # full rank
    (3, 257, 2),  # cuda split of the projection over D (2 slices, the last one short)
    (257, 8, 3),  # cpu row block (256 rows at small D)
]


def gaussian_map_cases():
    cases = []
    for B, D, r in GAUSSIAN_TILE_SHAPES:
        for kind in SpectralKind:
            cases.append(Case("tiles", _shape_name(B, D, r) + "_" + _KINDS[kind], B, D, r, kind=kind))
    for B, D, r in [(7, 61, 0), (7, 61, 5), (7, 40, 40)]:
        for sigma in (1e-6, 0.002, 80.0, 1e4):
            for dtype in (torch.float32, torch.float64):
                for kind in (SpectralKind.DENOISE, SpectralKind.SCORE, SpectralKind.FLOW):
                    residual_var = 0.0 if r else 0.3  # 0: the off-span gain is 1/sigma^2 (score)
                    name = _shape_name(B, D, r) + f"_{_KINDS[kind]}_{_sigma_name(sigma)}_{_DT[dtype]}"
                    cases.append(Case("sigma", name, B, D, r, dtype=dtype, residual_var=residual_var, sigma=sigma, kind=kind))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        for B, D, r in [(17, 33, 5), (9, 33, 33), (5, 40, 0)]:
            for kind in SpectralKind:
                cases.append(Case("dtypes", _shape_name(B, D, r) + f"_{_KINDS[kind]}_{_DT[dtype]}", B, D, r,
                                  dtype=dtype, kind=kind))
    for B, D, r, residual_var in [(9, 33, 5, 0.0), (9, 33, 17, 0.2), (5, 33, 33, 0.0)]:
        cases.append(Case("flow", _shape_name(B, D, r, rv=residual_var), B, D, r, residual_var=residual_var, kind=SpectralKind.FLOW,
                          seed=1))
    for kind in SpectralKind:
        cases.append(Case("nan", _shape_name(5, 33, 4) + "_" + _KINDS[kind], 5, 33, 4, kind=kind, nan_rows=(1, 3)))
        cases.append(Case("nan", _shape_name(5, 33, 0) + "_" + _KINDS[kind], 5, 33, 0, kind=kind, nan_rows=(1,)))
    # rows beyond 65535 * 32 (the cuda kernels' row tiles on one grid dimension); D = 1, r = 0: cheap
    cases.append(Case("grid", _shape_name(2_100_000, 1, 0), 2_100_000, 1, 0, sigma=0.5, interpreter=False))
    return cases


def gaussian_trajectory_cases():
    cases = []
    for B, D, r, T in [(1, 61, 0, 3), (17, 33, 15, 5), (15, 61, 17, 4), (5, 32, 32, 3), (33, 65, 33, 2), (3, 257, 2, 3),
                       (4, 20, 3, 1), (257, 8, 3, 2)]:
        cases.append(Case("tiles", _shape_name(B, D, r, T=T), B, D, r, T=T))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        cases.append(Case("dtypes", _shape_name(9, 33, 5, T=4) + "_" + _DT[dtype], 9, 33, 5, T=4, dtype=dtype))
    for sigma in (1e-6, 1e4):
        for dtype in (torch.float32, torch.float64):
            cases.append(Case("sigma", _shape_name(5, 33, 5, T=3) + f"_{_sigma_name(sigma)}_{_DT[dtype]}", 5, 33, 5,
                              T=3, sigma=sigma, dtype=dtype, residual_var=0.0))
    cases.append(Case("nan", _shape_name(5, 33, 4, T=3), 5, 33, 4, T=3, nan_rows=(2,)))
    # steps beyond 65535 (one grid dimension of the cuda kernels)
    cases.append(Case("grid", _shape_name(1, 1, 0, T=65537), 1, 1, 0, T=65537, interpreter=False))
    return cases


def mixture_posterior_cases():
    cases = []
    for B, K, D, r, residual_var in [
        (1, 1, 1, 0, 0.0), (2, 1, 20, 3, None),
        (17, 5, 33, 1, None), (15, 3, 31, 16, None), (16, 4, 32, 17, 0.0),  # triton tiles, register rank
        (9, 3, 33, 33, None),  # full rank
        (9, 17, 65, 0, 0.0),  # delta: triton BLOCK_K 16, merge BLOCK_N 64; cuda 8-row blocks
        (8, 33, 31, 0, None),  # isotropic, unequal residual_var; cuda 32-component chunks
        (3, 257, 16, 0, 0.0),  # cpu component block 256; cuda / triton split-K
        (5, 65, 24, 16, None),  # cpu component block max(4, 1024 / r) = 64
        (2, 300, 8, 2, 0.1),  # several hundred low-rank components, split-K
        (257, 3, 4, 1, None),  # cpu row blocks (ceil(B / threads)), many row blocks everywhere
        (9, 2, 129, 33, None),  # cuda r > 0: two 32-coefficient chunks; a 128-d back-projection tile and a short one
    ]:
        cases.append(Case("tiles", _shape_name(B, D, r, K=K), B, D, r, K=K, residual_var=residual_var))
    # delta, cpu: more row blocks (<= 256 rows) than threads: one block per thread at a time
    cases.append(Case("tiles", _shape_name(520, 130, 0, K=130), 520, 130, 0, K=130, residual_var=0.0, interpreter=False))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        for B, K, D, r, residual_var in [(17, 19, 33, 0, 0.0), (9, 5, 33, 5, None)]:
            cases.append(Case("dtypes", _shape_name(B, D, r, K=K) + "_" + _DT[dtype], B, D, r, K=K, residual_var=residual_var,
                              dtype=dtype))
    for sigma in (1e-6, 0.002, 80.0, 1e4):
        for dtype in (torch.float32, torch.float64):
            for B, K, D, r, residual_var in [(5, 7, 33, 0, 0.0), (5, 4, 33, 3, 0.0)]:
                name = _shape_name(B, D, r, K=K) + f"_{_sigma_name(sigma)}_{_DT[dtype]}"
                cases.append(Case("sigma", name, B, D, r, K=K, residual_var=residual_var, sigma=sigma, dtype=dtype))
    for sigma in (0.002, 0.01, 0.1, 80.0):
        for dtype in (torch.float32, torch.float64):
            cases.append(Case("tie", f"lowrank_D64_{_sigma_name(sigma)}_{_DT[dtype]}", 4, 64, 1, K=2, sigma=sigma,
                              dtype=dtype, extra={"build": "lowrank_tie"}))
    # a float32-born basis is orthonormal only to ~6e-8, so float64 weights of a near tie are defined
    # to ~1e-8, not 1e-9: the bound of this one case for every backend (triton measured 1.4e-9)
    cases.append(Case("tie", "lowrank_D64_s0.01_f64_float32basis", 4, 64, 1, K=2, sigma=0.01, dtype=torch.float64,
                      extra={"build": "lowrank_tie", "float32_basis": True, "weights_tv": 1e-8}))
    for sigma in (0.002, 0.01, 0.03, 0.1, 0.3, 1.0, 80.0):
        cases.append(Case("tie", f"delta_D3072_{_sigma_name(sigma)}", 8, 3072, 0, K=24, sigma=sigma,
                          extra={"build": "delta_tie"}))
    # split: the components cut into parts (blocks of a points file, shards, ranks), each part one
    # kernel launch, the parts' states merged (gsa_kernels/_scaleout/partial.py split_posterior, the code of
    # those paths): near ties whose two points lie in different parts, at the EDM's smallest sigma
    # and D 784 (logits ~1e7: a float32 logp per part is off by ~0.4), and 16-bit x at sigma 0.01
    for sigma in (0.002, 0.01):
        cases.append(Case("split", f"delta_D784_{_sigma_name(sigma)}_parts2", 8, 784, 0, K=8, sigma=sigma,
                          extra={"build": "delta_tie", "split": 2}))
    cases.append(Case("split", "delta_D784_s0.002_parts3_f64", 8, 784, 0, K=9, sigma=0.002, dtype=torch.float64,
                      extra={"build": "delta_tie", "split": 3}))
    for sigma in (0.002, 0.01):
        cases.append(Case("split", f"lowrank_D64_{_sigma_name(sigma)}_parts2", 4, 64, 1, K=2, sigma=sigma,
                          extra={"build": "lowrank_tie", "split": 2}))
    for dtype in (torch.float16, torch.bfloat16):
        cases.append(Case("split", f"{_shape_name(9, 33, 0, K=19)}_s0.01_parts3_{_DT[dtype]}", 9, 33, 0, K=19,
                          residual_var=0.0, sigma=0.01, dtype=dtype, extra={"split": 3}))
        cases.append(Case("split", f"{_shape_name(9, 33, 5, K=5)}_s0.01_parts2_{_DT[dtype]}", 9, 33, 5, K=5, sigma=0.01,
                          dtype=dtype, extra={"split": 2}))
    # D = 140: one 128-d back-projection tile of the cuda kernel and a short one; K = 70: several
    # component tiles (triton 16, cuda 32) and splits
    for sigma, dtype in ((5.0, torch.float32), (10.0, torch.float32), (10.0, torch.float64)):
        cases.append(Case("dense", _shape_name(9, 140, 0, K=70) + f"_{_sigma_name(sigma)}_{_DT[dtype]}", 9, 140, 0, K=70,
                          residual_var=0.0, sigma=sigma, dtype=dtype))
    # between one-hot and dense (~9 % of the weights above the cpu kernel's p_min, ~4 % above each
    # row's own cut): more rows than the cpu split takes, so its row blocks' sparse back-projection
    # over the rows' cuts (tail_cut)
    cases.append(Case("dense", _shape_name(32, 64, 0, K=400) + "_s1.2", 32, 64, 0, K=400, residual_var=0.0, sigma=1.2))
    # constant coordinates (every point the same in 2 of 3: MNIST's blank border), with enough rows
    # that the cpu row blocks run on the varying ones only (empirical_without_constant_coordinates;
    # 22 of 64 vary: padded to 24 or 32), per-row sigma over the EDM range, NaN in a constant (row 1)
    # and a varying coordinate (row 3); residual_var 0.3 (the constant coordinates' posterior moves
    # with x) in float64; bfloat16 x
    cases.append(Case("const", _shape_name(64, 64, 0, K=300) + "_edm", 64, 64, 0, K=300, residual_var=0.0,
                      nan_rows=(1, 3), extra={"constant_every": 3}))
    cases.append(Case("const", _shape_name(64, 64, 0, K=50) + "_s1_iso_f64", 64, 64, 0, K=50, residual_var=0.3, sigma=1.0,
                      dtype=torch.float64, extra={"constant_every": 3}))
    cases.append(Case("const", _shape_name(64, 64, 0, K=50) + "_s0.3_bf16", 64, 64, 0, K=50, residual_var=0.0, sigma=0.3,
                      dtype=torch.bfloat16, extra={"constant_every": 3}))
    # the same points cut into two parts merged as the file, shard and rank paths merge them (each
    # part's log-density takes the constant coordinates' term before the merge)
    cases.append(Case("const", _shape_name(64, 64, 0, K=300) + "_s1_parts2", 64, 64, 0, K=300, residual_var=0.0, sigma=1.0,
                      extra={"constant_every": 3, "split": 2}))
    # few queries over many points (a sampler's step): one-hot to dense, and isotropic components
    # with unequal residual_var; where a kernel splits the points, 300 of D = 1024 span several
    # 512 KiB blocks
    for sigma, residual_var in ((0.3, 0.0), (3.0, 0.0), (30.0, 0.0), (3.0, None)):
        cases.append(Case("split", _shape_name(3, 1024, 0, K=300) + f"_{_sigma_name(sigma)}" + ("_iso" if residual_var is None else ""),
                          3, 1024, 0, K=300, residual_var=residual_var, sigma=sigma, interpreter=False))
    # the cpu split's register tiles at 1 and 13 rows (float dot products beyond 4 rows): D 1046
    # leaves a tail after every vector width (8, 16, 32 lanes), K 301 a short last chunk and
    # points after the last 4-point tile
    for B in (1, 13):
        for sigma, residual_var in ((0.3, 0.0), (3.0, 0.0), (30.0, 0.0), (3.0, None)):
            cases.append(Case("split", _shape_name(B, 1046, 0, K=301) + f"_{_sigma_name(sigma)}" + ("_iso" if residual_var is None else ""),
                              B, 1046, 0, K=301, residual_var=residual_var, sigma=sigma, interpreter=False))
    # B 6: the back-projection's row tiles of 4 and a tail of 2 (13 leaves 1), one-hot (the rows'
    # max moves chunk to chunk: rescales) and spread
    for sigma in (0.3, 3.0):
        cases.append(Case("split", _shape_name(6, 1046, 0, K=301) + f"_{_sigma_name(sigma)}", 6, 1046, 0, K=301,
                          residual_var=0.0, sigma=sigma, interpreter=False))
    # low-rank, dense posterior where the float32 logits need refinement (all K components within
    # reach): the cpu kernel's float64-GEMM refinement and the per-component one (measured costs
    # choose; tests/test_cpu_backend.py forces each)
    for sigma in (3.0, 30.0):
        cases.append(Case("dense", _shape_name(9, 64, 4, K=40) + f"_{_sigma_name(sigma)}", 9, 64, 4, K=40, residual_var=None,
                          sigma=sigma))
    # the same at D 400: the cpu float64 GEMM's depth blocks of 128 (three and a short one)
    cases.append(Case("dense", _shape_name(9, 400, 4, K=40) + "_s30", 9, 400, 4, K=40, residual_var=None, sigma=30.0))
    # low-rank at D 1536, per-sample sigma over the EDM range and sigma 20 (dense): the cpu kernel's
    # exact-distance route (x . mu in float64, the coefficients' float32 error bounded per component,
    # refined by weight below sigma ~12 here, none needed above)
    for sigma in (None, 20.0):
        cases.append(Case("dense", _shape_name(16, 1536, 8, K=24) + f"_{'edm' if sigma is None else _sigma_name(sigma)}",
                          16, 1536, 8, K=24, residual_var=None, sigma=sigma))
    # the same with the data 100 from the origin, along each basis' first direction, and eigvals
    # 10 .. 1e4: the bound on float32 U^T x is ~0.1 logits there, so rows refine by weight (the
    # errors measured here are ~1e3x under that bound: no case forces the refinement's result)
    for sigma in (None, 30.0):
        cases.append(Case("dense", _shape_name(16, 1536, 8, K=24) + f"_offset_{'edm' if sigma is None else _sigma_name(sigma)}",
                          16, 1536, 8, K=24, residual_var=None, sigma=sigma, extra={"offset": 100.0, "eigvals_scale": 1000.0}))
    for B, K, D, r in [(9, 40, 33, 0), (9, 7, 33, 2)]:
        cases.append(Case("inf", _shape_name(B, D, r, K=K), B, D, r, K=K, residual_var=0.0 if r == 0 else 0.1,
                          neg_inf_weights=K // 3))
    for B, K, D, r in [(5, 20, 33, 0), (5, 4, 33, 3)]:
        cases.append(Case("nan", _shape_name(B, D, r, K=K), B, D, r, K=K, residual_var=0.0 if r == 0 else 0.1,
                          nan_rows=(0, 3)))
    return cases


LABELED_SHAPES = [  # (B, D, r, K, labels pattern); D 8..96, K 1..5
    (9, 8, 3, 3, "mixed"),
    (65, 33, 17, 3, "mixed"),  # 65 rows of 3 labels: label tiles of 16 (triton interpreter), 32 (cuda), 64 (triton GPU); register rank 16
    (40, 48, 5, 5, "sorted"),  # contiguous groups (the cpu kernel's views instead of gathers)
    (20, 16, 4, 5, "missing"),  # empty groups
    (33, 24, 24, 4, "mixed"),  # full rank
    (17, 61, 0, 2, "mixed"),  # no basis: mean and residual only
    (12, 20, 3, 4, "one"),  # every row one label
    (5, 12, 2, 1, "mixed"),  # K = 1
]


def gaussian_map_labeled_cases():
    cases = []
    for B, D, r, K, labels in LABELED_SHAPES:
        for kind in SpectralKind:
            cases.append(Case("labels", _shape_name(B, D, r, K=K) + f"_{labels}_{_KINDS[kind]}", B, D, r, K=K, kind=kind,
                              extra={"labels": labels}))
    for dtype in (torch.float64, torch.float16):
        for kind in SpectralKind:
            cases.append(Case("labels", _shape_name(17, 33, 5, K=3) + f"_mixed_{_KINDS[kind]}_{_DT[dtype]}", 17, 33, 5, K=3,
                              kind=kind, dtype=dtype, extra={"labels": "mixed"}))
    for sigma in (0.002, 80.0):
        cases.append(Case("labels", _shape_name(9, 8, 3, K=3) + f"_mixed_score_{_sigma_name(sigma)}", 9, 8, 3, K=3,
                          kind=SpectralKind.SCORE, sigma=sigma, extra={"labels": "mixed"}))
    cases.append(Case("labels", _shape_name(9, 33, 4, K=3) + "_nan", 9, 33, 4, K=3, nan_rows=(1, 4), extra={"labels": "mixed"}))
    return cases


def gaussian_trajectory_labeled_cases():
    cases = []
    for B, D, r, K, labels in [LABELED_SHAPES[i] for i in (0, 1, 2, 3, 6)]:
        cases.append(Case("labels", _shape_name(B, D, r, K=K, T=3) + f"_{labels}", B, D, r, K=K, T=3, extra={"labels": labels}))
    cases.append(Case("labels", _shape_name(9, 8, 3, K=3, T=4) + "_mixed_f64", 9, 8, 3, K=3, T=4, dtype=torch.float64,
                      extra={"labels": "mixed"}))
    return cases


# ----------------------------------------------------------------------------- local score machines


@dataclass(frozen=True)
class LocalCase:
    """A local_posterior case: B queries [C, H, W] against N training images, patch size P."""

    family: str
    name: str
    B: int
    N: int
    C: int
    H: int
    W: int
    P: int
    mode: LocalMode
    padding: LocalPadding = LocalPadding.ZEROS
    kind: SpectralKind = SpectralKind.DENOISE
    dtype: torch.dtype = torch.float32
    sigma: Optional[float] = None  # None: per-sample, log-uniform over the EDM range
    nan_rows: tuple = ()
    seed: int = 0
    interpreter: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def id(self):
        return f"{self.family}-{self.name}"


LOCAL_MACHINES = [(LocalMode.LS, LocalPadding.ZEROS), (LocalMode.LS, LocalPadding.CIRCULAR),
                  (LocalMode.ELS, LocalPadding.ZEROS), (LocalMode.ELS, LocalPadding.CIRCULAR),
                  (LocalMode.BBELS, LocalPadding.ZEROS)]
_MODES = {LocalMode.LS: "ls", LocalMode.ELS: "els", LocalMode.BBELS: "bbels"}
_PADS = {LocalPadding.ZEROS: "zeros", LocalPadding.CIRCULAR: "circ"}


def _local_name(B, N, C, H, W, P, mode, padding, kind, **more):
    parts = [_MODES[mode], _PADS[padding], _KINDS[kind], f"B{B}", f"N{N}", f"C{C}", f"{H}x{W}", f"P{P}"]
    return "_".join(parts + [f"{k}{v}" for k, v in more.items()])


def _local_images(case, gen):
    """Training images [N, C, H, W]: uniform in [-1, 1], or (extra["sparse"]) MNIST-like: mostly 0
    with a few bright pixels, so that many patches tie exactly (all-zero windows)."""
    shape = (case.N, case.C, case.H, case.W)
    if case.extra.get("sparse"):
        return (torch.rand(shape, dtype=F64, generator=gen) - 0.7).clamp_min(0) * 3.0
    return torch.rand(shape, dtype=F64, generator=gen) * 2 - 1


def local_posterior_args(case):
    """(x, images, sigma, patch_size, mode, padding, kind), float64. x: training images circularly
    shifted by a random offset per row (so that ELS matches patches at other pixels) plus sigma
    noise. Near ties (extra["tie"]): image 1 is image 0 with one pixel moved by 1e-3 and x is
    image 0 (rows 0, 2, ...) or the midpoint of the two in that pixel (rows 1, 3, ...). Image 0 is
    0 in that pixel, so the output there is 1e-3 times the weight of image 1: a weight error shows
    above the rounding term of the bound. extra["offset"]: images and x (not the padding) moved by it
    after all that."""
    gen = _gen(case)
    images = _local_images(case, gen)
    sigma = _row_sigma(case, gen)
    B = case.B
    if case.extra.get("tie") == "far":
        # the two tied images are the darkest (-1 but the tie pixel) and x is image 0 - 3 but ~0 at
        # the tie pixel: every logit ~ -9 C P^2 / (2 sigma^2) ~ -2e6, the two best ones ~1 apart
        q = (case.H // 2, case.W // 3)
        images[0] = -1.0
        images[0, :, q[0], q[1]] = 0.0
        images[1] = images[0]
        images[1, 0, q[0], q[1]] += 1e-3
        x = (images[0] - 3.0).expand(B, -1, -1, -1).clone()
        x[:, :, q[0], q[1]] = 0.0  # near the two values there (0 and 1e-3): the weights show in the output
        x[:, 0, q[0], q[1]] = 0.125  # squared distances ~2e3, 2.5e-4 apart: ~1 float32 ulp of them
    elif case.extra.get("tie"):
        q = (case.H // 2, case.W // 3)
        images[0, :, q[0], q[1]] = 0.0  # values 0 and 1e-3 there: the weights are the output
        images[1] = images[0]
        images[1, 0, q[0], q[1]] += 1e-3
        x = images[0].expand(B, -1, -1, -1).clone()
        x[1::2, 0, q[0], q[1]] += 0.5e-3
    else:
        pick = torch.randint(0, case.N, (B,), generator=gen)
        x = torch.stack([torch.roll(images[int(k)], (int(torch.randint(0, case.H, (1,), generator=gen)),
                                                    int(torch.randint(0, case.W, (1,), generator=gen))), (1, 2))
                         for k in pick]) if B else images[:0].clone()
        x = x + sigma[:, None, None, None] * torch.randn(x.shape, dtype=F64, generator=gen)
    if case.extra.get("offset"):  # images and x around a large offset (padding stays 0)
        images = images + case.extra["offset"]
        x = x + case.extra["offset"]
    for b in case.nan_rows:
        x[b, b % case.C, b % case.H, (2 * b) % case.W] = math.nan
    return x, images, sigma, case.P, int(case.mode), int(case.padding), int(case.kind)


# (B, N, C, H, W): non-square, pixels HW one below / at / above 16, 32, 64 and 128 (pixel tiles),
# N across 16 and 32 (image blocks); BBELS classes of several sizes
LOCAL_SHAPES = [(2, 3, 1, 5, 7), (3, 5, 3, 4, 9), (1, 17, 1, 8, 4), (2, 4, 3, 3, 11), (1, 33, 1, 8, 9), (2, 2, 1, 11, 13),
                (1, 1, 1, 1, 1), (3, 2, 3, 6, 5)]
# the GPU kernels' tiles: C 5 across the CUDA kernel's 4-channel accumulator groups (and the
# Triton channel padding 8); HW at and above the CUDA kernel's 128-pixel blocks
LOCAL_KERNEL_TILE_SHAPES = [(2, 3, 5, 4, 5), (1, 2, 1, 8, 16), (1, 2, 1, 3, 43)]


def local_posterior_cases():
    cases = []
    kinds = (SpectralKind.DENOISE, SpectralKind.SCORE)
    # modes x paddings x P in {1, 3, 5, large} x C in {1, 3}, per-sample sigma over the EDM range
    i = 0
    for mode, padding in LOCAL_MACHINES:
        for C in (1, 3):
            for P in (1, 3, 5, "large"):
                B, N, H, W = (2, 3, 5, 7) if C == 1 else (2, 4, 4, 6)
                P = 2 * max(H, W) + 1 if P == "large" else P
                kind = kinds[i % 2]
                i += 1
                cases.append(LocalCase("machines", _local_name(B, N, C, H, W, P, mode, padding, kind), B, N, C, H, W, P,
                                       mode, padding, kind, seed=i))
    # shapes across tile edges, both kinds
    for j, (B, N, C, H, W) in enumerate(LOCAL_SHAPES + LOCAL_KERNEL_TILE_SHAPES):
        for mode, padding in LOCAL_MACHINES:
            kind = kinds[j % 2]
            P = 3 if j % 3 else 5
            cases.append(LocalCase("tiles", _local_name(B, N, C, H, W, P, mode, padding, kind), B, N, C, H, W, P, mode,
                                   padding, kind, seed=j))
    for mode, padding in LOCAL_MACHINES:
        # 16-bit and 64-bit x; f16 scores only at sigmas whose scores fit float16 (< 65504)
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            for kind in kinds:
                sigma = 0.5 if dtype == torch.float16 else None
                cases.append(LocalCase("dtypes", _local_name(3, 4, 3, 5, 6, 3, mode, padding, kind) + "_" + _DT[dtype], 3, 4,
                                       3, 5, 6, 3, mode, padding, kind, dtype=dtype, sigma=sigma))
        # one sigma for all rows at the ends of the EDM range and beyond
        for sigma in (1e-4, 0.002, 80.0, 1e4):
            for d, dtype in enumerate((torch.float32, torch.float64)):
                for kind in kinds[d:] + kinds[:d]:  # both kinds at every sigma, half of them per dtype
                    if kind != kinds[d] and sigma in (80.0, 1e4):
                        continue
                    name = _local_name(2, 5, 1, 6, 7, 3, mode, padding, kind) + f"_{_sigma_name(sigma)}_{_DT[dtype]}"
                    cases.append(LocalCase("sigma", name, 2, 5, 1, 6, 7, 3, mode, padding, kind, dtype=dtype, sigma=sigma))
        # near ties: two patches 1e-3 apart in one pixel, sigma 0.002 (logits 0.125 apart)
        for sigma, dtype, C in ((0.002, torch.float32, 1), (0.002, torch.float32, 3), (0.002, torch.float64, 1),
                                (0.01, torch.float32, 1)):
            name = _local_name(4, 3, C, 6, 7, 3, mode, padding, SpectralKind.DENOISE) + f"_{_sigma_name(sigma)}_{_DT[dtype]}"
            cases.append(LocalCase("tie", name, 4, 3, C, 6, 7, 3, mode, padding, dtype=dtype, sigma=sigma,
                                   extra={"tie": True}))
        # a near tie far from x: logits ~ -1e5 apart from the data, the exact recomputation's case
        name = _local_name(2, 4, 3, 9, 10, 9, mode, padding, SpectralKind.DENOISE) + "_far_s0.011"
        cases.append(LocalCase("tie", name, 2, 4, 3, 9, 10, 9, mode, padding, sigma=0.011, extra={"tie": "far"}))
        # a large offset (pixels 1000 +- 1, ulp 6e-5 in float32): |a|^2 ~ 1e6 per pixel >> |a - b|^2, so
        # the expanded |a|^2 - 2 a.b + |b|^2 loses the logits (noisy x, sigma 1) and an output formed
        # as (sum w value) / (sum w) - x cancels (the score of a near tie at sigma 0.002)
        for sigma, tie, kind in ((1.0, False, SpectralKind.SCORE), (0.002, True, SpectralKind.SCORE)):
            name = _local_name(3, 4, 1, 6, 7, 3, mode, padding, kind) + f"_off1000_{_sigma_name(sigma)}"
            cases.append(LocalCase("offset", name, 3, 4, 1, 6, 7, 3, mode, padding, kind, sigma=sigma,
                                   extra={"offset": 1000.0, "tie": tie}))
        # MNIST-like images: exact ties among all-zero patches; dense posteriors at sigma 5
        for sigma in (0.05, 5.0):
            for kind in kinds:
                name = _local_name(2, 6, 1, 9, 8, 5, mode, padding, kind) + f"_{_sigma_name(sigma)}"
                cases.append(LocalCase("sparse", name, 2, 6, 1, 9, 8, 5, mode, padding, kind, sigma=sigma,
                                       extra={"sparse": True}))
        for kind in kinds:
            cases.append(LocalCase("nan", _local_name(4, 3, 3, 5, 6, 3, mode, padding, kind), 4, 3, 3, 5, 6, 3, mode, padding,
                                   kind, nan_rows=(1, 2)))
    return cases


# The two identities (test_conformance.test_local_identity), per backend: (B, N, C, H, W, sigma)
LOCAL_IDENTITY_SHAPES = [(3, 5, 1, 5, 7, None), (2, 4, 3, 4, 6, None), (2, 6, 1, 6, 5, 0.002)]


def local_identity_cases():
    """("delta", ...): LS, zeros padding, P = 2 max(H, W) - 1 and larger is the delta-mixture
    denoiser of the flattened images; ("bbels_p1", ...): BBELS P = 1 is ELS P = 1."""
    cases = []
    for B, N, C, H, W, sigma in LOCAL_IDENTITY_SHAPES:
        for P in (2 * max(H, W) - 1, 2 * max(H, W) + 3):
            cases.append(LocalCase("identity", "delta_" + _local_name(B, N, C, H, W, P, LocalMode.LS, LocalPadding.ZEROS,
                                                                         SpectralKind.DENOISE), B, N, C, H, W, P, LocalMode.LS,
                                   sigma=sigma, extra={"identity": "delta"}))
        for kind in (SpectralKind.DENOISE, SpectralKind.SCORE):
            cases.append(LocalCase("identity", "bbels_p1_" + _local_name(B, N, C, H, W, 1, LocalMode.BBELS, LocalPadding.ZEROS,
                                                                            kind), B, N, C, H, W, 1, LocalMode.BBELS, kind=kind,
                                   sigma=sigma, extra={"identity": "bbels_p1"}))
    return cases


CASES = {
    "gaussian_map": (gaussian_map_cases(), gaussian_map_args),
    "gaussian_trajectory": (gaussian_trajectory_cases(), gaussian_trajectory_args),
    "mixture_posterior": (mixture_posterior_cases(), mixture_posterior_args),
    "mixture_score": (mixture_score_cases(), mixture_score_args),  # the public op (test_mixture_score)
    "gaussian_map_labeled": (gaussian_map_labeled_cases(), gaussian_map_labeled_args),
    "gaussian_trajectory_labeled": (gaussian_trajectory_labeled_cases(), gaussian_trajectory_labeled_args),
    "local_posterior": (local_posterior_cases(), local_posterior_args),
}
