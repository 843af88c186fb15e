"""GPU benchmarks (pytest-benchmark): the triton and cuda backends against eager PyTorch and
torch.compile on the same device, with the device's roofline measured in the same run.

    G1  gaussian_denoise     B=1024 D=3072 r=64
    G2  gaussian_denoise     B=256  D=3072 r=3072
    T1  gaussian_trajectory  T=18 B=256 D=3072 r=256
    M1  mixture_denoise      B=512  D=3072 K=200 r=32
    E1  empirical mixture    B=256  N=20000 D=3072, sigma in 0.01 (one-hot), 0.5, 3 and 30 (dense)
    L-ls, L-els, L-bbels     local score machines (local_denoise, zeros padding), 28 x 28 C=1,
                             B=8 N=1000 P=5 sigma=1: triton and cuda against the conv2d
                             formulation (benchmarks/local_conv2d.py) on the same device

    python -m pytest benchmarks/bench_gpu.py --benchmark-json out.json     (needs a CUDA device)

Every case is timed with torch.cuda events after warm-up (compilation and autotuning happen in
the warm-up); the medians land in each benchmark's extra_info together with the bytes and FLOPs
the case must move and do, so scripts/gpu_check.py can turn them into GB/s, TFLOP/s, ratios and
% of roofline. "eager" is the reference backend (gsa_kernels/reference.py; for the empirical
mixture the paper authors' cdist + softmax + matmul), "compiled" is torch.compile of the same.
"sdpa" (empirical mixture only) is the attention peer: ONE scaled_dot_product_attention call with
q = x / sigma^2, k = v = the points, the per-key bias -|mu|^2 / (2 sigma^2) as attn_mask and scale 1,
with the memory-efficient (CUTLASS) backend forced on CUDA (it takes any head dimension; flash and
cuDNN stop at 256), in the case's dtype (float32, bfloat16), D padded to a multiple of 8 and N to
a multiple of 16 (padded keys get bias -inf) as that backend wants; its worst-row error against
float64 truth lands in extra_info (sdpa_error).

The local score machines (test_gpu_local; scripts/gpu_check.py runs them as their own part):
training images are MNIST-like synthetic digits (a few bright strokes on -1, from a seed: no
dataset needed), queries are other such images plus sigma noise. Before timing, each of ours is
checked against the conv2d formulation's answer (max |difference| < 1e-3, as benchmarks/
bench_local.py on CPU; float32 expanded form vs our exact sums), and the difference lands in
extra_info (max_abs_diff_vs_conv2d).

Without a GPU the file is skipped, unless GSA_BENCH_DEVICE=cpu (used by
`scripts/gpu_check.sh --dry-run`): then the same cases run on CPU tensors at reduced sizes with one
timed repetition -- Triton through the interpreter (TRITON_INTERPRET=1), CUDA through the host
SIMT emulation (GSA_KERNELS_CUDA_EMULATE=1) -- only so the pipeline cannot rot between GPU days.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

DEVICE = os.environ.get("GSA_BENCH_DEVICE", "cuda")
REDUCED = DEVICE != "cuda" or os.environ.get("GSA_BENCH_REDUCED", "0") == "1"
ROUNDS = 1 if REDUCED else int(os.environ.get("GSA_BENCH_ROUNDS", "20"))
COMPILE_BACKEND = os.environ.get("GSA_BENCH_COMPILE_BACKEND", "aot_eager" if DEVICE != "cuda" else "inductor")

FULL = {
    "G1": dict(op="gaussian_denoise", B=1024, D=3072, r=64),
    "G2": dict(op="gaussian_denoise", B=256, D=3072, r=3072),
    "T1": dict(op="gaussian_trajectory", T=18, B=256, D=3072, r=256),
    "M1": dict(op="mixture_denoise", B=512, D=3072, K=200, r=32),
    "E1": dict(op="mixture_denoise", B=256, D=3072, K=20000, r=0),
}
SMALL = {  # the dry run: every code path, tiny shapes (interpreter / emulation speed)
    "G1": dict(op="gaussian_denoise", B=24, D=80, r=8),
    "G2": dict(op="gaussian_denoise", B=8, D=48, r=48),
    "T1": dict(op="gaussian_trajectory", T=4, B=8, D=64, r=8),
    "M1": dict(op="mixture_denoise", B=8, D=64, K=5, r=4),
    "E1": dict(op="mixture_denoise", B=8, D=64, K=300, r=0),
}
WORKLOADS = SMALL if REDUCED else FULL
EMPIRICAL_SIGMAS = (0.01, 3.0) if REDUCED else (0.01, 0.5, 3.0, 30.0)  # one-hot ... dense posterior
CASES = [(n, None) for n in ("G1", "G2", "T1", "M1")] + [("E1", s) for s in EMPIRICAL_SIGMAS]
IMPLS = ("triton", "cuda", "eager", "compiled", "sdpa")

# the local score machines: (B, N, C, H, W, P, sigma); the dry run's shapes are the interpreter's
LOCAL_SHAPE = (2, 3, 1, 6, 7, 3, 1.0) if REDUCED else (8, 1000, 1, 28, 28, 5, 1.0)
LOCAL_MODES = ("ls", "els", "bbels")
LOCAL_IMPLS = ("triton", "cuda", "conv2d")
LOCAL_ROUNDS = 1 if REDUCED else int(os.environ.get("GSA_BENCH_LOCAL_ROUNDS", "5"))  # conv2d ELS: ~0.1-1 s a call


def work(name, x_bytes=4, sigma=None):
    """(bytes, dot_flops, other_flops) any implementation must move / do: inputs read once,
    outputs written once, model tensors in float32. The empirical mixture counts the distance
    GEMM always and the dense back-projection only where the posterior is dense (sigma >= 3)."""
    w = WORKLOADS[name]
    B, D, r = w["B"], w["D"], w["r"]
    if w["op"] == "gaussian_denoise":
        return B * D * x_bytes * 2 + D * r * 4 + D * 4, 4 * B * D * r, 4 * B * D
    if w["op"] == "gaussian_trajectory":
        T = w["T"]
        return B * D * x_bytes * (1 + T) + D * r * 4 + D * 4, 2 * B * D * r * (1 + T), 4 * T * B * D
    K = w["K"]
    model = K * D * 4 + K * D * r * 4
    if r == 0:  # distances (GEMM-shaped), and the back-projection p @ means where the posterior is dense
        dense = sigma is not None and sigma >= 3.0
        return B * D * x_bytes * 2 + model, 2 * B * K * D * (2 if dense else 1), 4 * B * K
    # per (row, component): c (2 D r), reconstruction (2 D r); |y|^2, the residual and the acc update ~ 10 D
    return B * D * x_bytes * 2 + model, 4 * B * K * D * r + 4 * B * K * D, 10 * B * K * D


# ----------------------------------------------------------------------------- set-up


def _device_ok():
    if DEVICE == "cuda":
        return torch.cuda.is_available()
    return True


pytestmark = pytest.mark.skipif(not _device_ok(), reason="GPU benchmarks need a CUDA device (or GSA_BENCH_DEVICE=cpu)")

_CACHE = {}


def _authors_empirical(x, sigma, points):
    """The paper authors' empirical-mixture denoiser: cdist + softmax + matmul (eager)."""
    d2 = torch.cdist(x, points) ** 2
    w = torch.softmax(-d2 / (2 * sigma[:, None] ** 2), dim=1)
    return w @ points


def _sdpa_empirical(points, sigma, dtype):
    """sdpa(x) -> the empirical denoiser as one scaled_dot_product_attention call in dtype (the
    memory-efficient backend forced on CUDA); keys, values and bias prepared once (model layout)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    N, D = points.shape
    Dp, Np = -(-D // 8) * 8, -(-N // 16) * 16
    s2 = float(sigma[0]) ** 2  # one sigma per case
    kv = torch.zeros(Np, Dp, device=points.device, dtype=dtype)
    kv[:N, :D] = points.to(dtype)
    bias = torch.full((Np,), float("-inf"), device=points.device)
    bias[:N] = -(points.double() ** 2).sum(1).float() / (2 * s2)
    bias = bias.to(dtype)
    backends = [SDPBackend.EFFICIENT_ATTENTION] if points.device.type == "cuda" else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]

    def run(x):
        B = x.shape[0]
        q = torch.zeros(1, 1, B, Dp, device=x.device, dtype=dtype)
        q[0, 0, :, :D] = (x.float() / s2).to(dtype)
        with sdpa_kernel(backends):
            out = torch.nn.functional.scaled_dot_product_attention(
                q, kv[None, None], kv[None, None], attn_mask=bias[None, None, None, :].expand(1, 1, B, Np), scale=1.0)
        return out[0, 0, :, :D]

    return run


def _setup(name, sigma_e, dtype):
    """{impl: zero-argument callable} for a case, built once per (case, dtype)."""
    import gsa_kernels as gk
    from gsa_kernels import reference

    key = (name, sigma_e, dtype)
    if key in _CACHE:
        return _CACHE[key]
    w = WORKLOADS[name]
    B, D, r = w["B"], w["D"], w["r"]
    dev = torch.device(DEVICE)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dev)
    compile_ = lambda f: torch.compile(f, backend=COMPILE_BACKEND, dynamic=False)
    if w["op"].startswith("gaussian"):
        basis = torch.linalg.qr(torch.randn(D, r, generator=gen))[0].to(dev)
        eig = torch.logspace(1, -3, r, device=dev)
        g = gk.GaussianModel(rnd(D) * 0.1, basis, eig, 1e-3 if r < D else 0.0)
        x = (rnd(B, D) * 2).to(dtype)
        args = (g.mean, g.basis, g.eigvals, g.residual_var)
        if w["op"] == "gaussian_denoise":
            sigma = torch.exp(torch.empty(B).uniform_(-6.2, 4.4, generator=gen)).to(dev)  # 0.002 .. 80
            fn = lambda backend: gk.gaussian_denoise(x, sigma, g, backend=backend)
            kind = int(gk.ops.SpectralKind.DENOISE)
            eager = lambda: reference.gaussian_map(x, *args, sigma, sigma, sigma, sigma, kind)
            comp = compile_(reference.gaussian_map)
            compiled = lambda: comp(x, *args, sigma, sigma, sigma, sigma, kind)
        else:
            sigmas = gk.schedules.karras(w["T"] - 1).to(dev)  # T points, 80 -> 0
            sig2 = sigmas[:, None].expand(-1, B).contiguous()
            fn = lambda backend: gk.gaussian_trajectory(x, sigmas, g, backend=backend)
            eager = lambda: reference.gaussian_trajectory(x, *args, sig2)
            comp = compile_(reference.gaussian_trajectory)
            compiled = lambda: comp(x, *args, sig2)
    else:
        K = w["K"]
        if r == 0:
            points = (torch.rand(K, D, generator=gen) * 2 - 1).to(dev)
            m = gk.GaussianMixture.from_points(points)
            idx = torch.randint(0, K, (B,), generator=gen).to(dev)
            x = (points[idx] + sigma_e * rnd(B, D)).to(dtype)
            sigma = torch.full((B,), float(sigma_e), device=dev)
            eager = lambda: _authors_empirical(x.float(), sigma, points)
            comp = compile_(_authors_empirical)
            compiled = lambda: comp(x.float(), sigma, points)
            sdpa_run = _sdpa_empirical(points, sigma, dtype)
            sdpa = lambda: sdpa_run(x)
            sdpa_truth = lambda: _authors_empirical(x.double(), sigma.double(), points.double())
        else:
            bases = torch.linalg.qr(torch.randn(K, D, r, generator=gen))[0].to(dev)
            eig = (torch.rand(K, r, generator=gen) * 4 + 0.01).to(dev)
            lw = torch.log_softmax(torch.randn(K, generator=gen), 0).to(dev)
            m = gk.GaussianMixture(rnd(K, D), bases, eig, torch.full((K,), 0.05, device=dev), lw)
            x = (rnd(B, D) * 2).to(dtype)
            sigma = torch.exp(torch.empty(B).uniform_(-6.2, 4.4, generator=gen)).to(dev)
            margs = (m.means, m.bases, m.eigvals, m.residual_var, m.log_weights)
            eager = lambda: reference.mixture_posterior(x, *margs, sigma, True, False)
            comp = compile_(reference.mixture_posterior)
            compiled = lambda: comp(x, *margs, sigma, True, False)
        fn = lambda backend: gk.mixture_denoise(x, sigma, m, backend=backend)
    impls = {"triton": lambda: fn("triton"), "cuda": lambda: fn("cuda"), "eager": eager, "compiled": compiled,
             "_check": lambda: (fn, lambda: fn("reference"))}
    if w["op"] == "mixture_denoise" and r == 0:
        impls.update(sdpa=sdpa, _sdpa_truth=sdpa_truth)
    _CACHE[key] = impls
    return impls


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, rounds, warmup=2):
    """Median and min milliseconds of `rounds` calls after `warmup` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(rounds):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), min(times)


# ----------------------------------------------------------------------------- benchmarks


DTYPES = [torch.float32] if REDUCED else [torch.float32, torch.bfloat16]  # the dry run times float32 only


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[n if s is None else f"{n}-s{s:g}" for n, s in CASES])
def test_gpu(benchmark, case, impl, dtype):
    import gsa_kernels as gk

    name, sigma_e = case
    if impl in ("triton", "cuda") and impl not in gk.available_backends():
        pytest.skip(f"backend {impl!r} not available here")
    impls = _setup(name, sigma_e, dtype)
    if impl not in impls:
        pytest.skip(f"{impl} is a peer of the empirical mixture only")
    run = impls[impl]
    extra = {}
    if impl == "sdpa":  # its error beside its time (worst row, relative, against float64)
        out, truth = run().double(), impls["_sdpa_truth"]()
        extra["sdpa_error"] = ((out - truth).norm(dim=1) / truth.norm(dim=1)).max().item()
    if impl in ("triton", "cuda"):  # a wrong answer is not a benchmark
        fn, ref = impls["_check"]()
        out, expect = fn(impl), ref()
        scale = expect.float().abs().max().item()
        err = (out.float() - expect.float()).abs().max().item()
        assert err <= (1e-3 if dtype == torch.float32 else 3e-2) * max(1.0, scale), f"{name} {impl}: error {err}"
    median_ms, best_ms = time_ms(run, ROUNDS, warmup=0 if REDUCED and impl in ("triton", "cuda") else 3)
    nbytes, dot, other = work(name, torch.finfo(dtype).bits // 8, sigma_e)
    benchmark.extra_info.update(workload=name, sigma=sigma_e, impl=impl, dtype=str(dtype).removeprefix("torch."),
                                device=DEVICE, reduced=REDUCED, median_ms=median_ms, best_ms=best_ms,
                                bytes=nbytes, dot_flops=dot, other_flops=other, **extra)
    benchmark.pedantic(lambda: (run(), _sync()), rounds=1, iterations=1, warmup_rounds=0)


def _digits(n, H, W, gen):
    """n synthetic MNIST-like images [n, 1, H, W] in [-1, 1]: background -1, a few bright strokes."""
    img = torch.full((n, 1, H, W), -1.0)
    for k in range(n):
        for _ in range(3):  # three strokes of random direction and length
            i, j = (int(torch.randint(0, s, (1,), generator=gen)) for s in (H, W))
            di, dj = (int(torch.randint(-1, 2, (1,), generator=gen)) for _ in range(2))
            for _ in range(int(torch.randint(2, max(3, H // 2), (1,), generator=gen))):
                img[k, 0, i % H, j % W] = 1.0
                i, j = i + di, j + dj
    return img


def _setup_local(mode):
    """{impl: zero-argument callable} for a local machine, built once per mode; the machine's
    images and queries on the device."""
    import gsa_kernels as gk

    key = ("local", mode)
    if key in _CACHE:
        return _CACHE[key]
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.local_conv2d from any cwd
    from benchmarks.local_conv2d import conv2d_local_denoise

    B, N, C, H, W, P, sigma = LOCAL_SHAPE
    gen = torch.Generator().manual_seed(0)
    train = _digits(N, H, W, gen).to(DEVICE)
    x = (_digits(B, H, W, gen) + sigma * torch.randn(B, C, H, W, generator=gen)).to(DEVICE).contiguous()
    m = gk.LocalScoreMachine(train, mode=mode)
    ours = lambda backend: gk.local_denoise(x, sigma, m, P, backend=backend)
    impls = {"triton": lambda: ours("triton"), "cuda": lambda: ours("cuda"),
             "conv2d": lambda: conv2d_local_denoise(x, train, sigma, P, mode)}
    _CACHE[key] = impls
    return impls


@pytest.mark.parametrize("impl", LOCAL_IMPLS)
@pytest.mark.parametrize("mode", LOCAL_MODES)
def test_gpu_local(benchmark, mode, impl):
    """local_denoise on the triton and cuda backends against the conv2d formulation, same device."""
    import gsa_kernels as gk

    if impl != "conv2d" and impl not in gk.available_backends():
        pytest.skip(f"backend {impl!r} not available here")
    impls = _setup_local(mode)
    run = impls[impl]
    extra = {}
    if impl != "conv2d":  # a wrong answer is not a benchmark
        key = ("local_conv2d_out", mode)
        if key not in _CACHE:
            _CACHE[key] = impls["conv2d"]().float()
        diff = (run().float() - _CACHE[key]).abs().max().item()
        extra["max_abs_diff_vs_conv2d"] = diff
        assert diff < 1e-3, f"local {mode} {impl}: differs from the conv2d formulation by {diff}"
    median_ms, best_ms = time_ms(run, LOCAL_ROUNDS, warmup=0 if REDUCED else 2)
    B, N, C, H, W, P, sigma = LOCAL_SHAPE
    benchmark.extra_info.update(workload=f"L-{mode}", sigma=sigma, impl=impl, dtype="float32", device=DEVICE,
                                reduced=REDUCED, median_ms=median_ms, best_ms=best_ms, B=B, N=N, C=C, H=H, W=W, P=P,
                                **extra)
    benchmark.pedantic(lambda: (run(), _sync()), rounds=1, iterations=1, warmup_rounds=0)


def measure_peaks(device=DEVICE):
    """The device's ceilings, measured now: copy bandwidth (read + write bytes/s) and matmul
    FLOP/s in float32 on CUDA cores (TF32 off), TF32 and bfloat16 on tensor cores."""
    out = {}
    n_copy = (256 if device == "cuda" else 16) * 2**20
    src = torch.empty(n_copy, device=device).normal_()
    dst = torch.empty_like(src)
    ms, best = time_ms(lambda: dst.copy_(src), 10 if device == "cuda" else 3)
    out["copy_bytes_per_s"] = 2 * src.numel() * 4 / (best * 1e-3)
    n = 8192 if device == "cuda" else 512
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for label, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
            if device != "cuda" and label != "fp32":
                continue
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            ms, best = time_ms(lambda a=a, b=b: a @ b, 5 if device == "cuda" else 2)
            out[f"matmul_{label}_flops"] = 2 * n**3 / (best * 1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(name=p.name, sm_count=p.multi_processor_count, memory_gib=p.total_memory / 2**30,
                   capability=f"{p.major}.{p.minor}")
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(measure_peaks(), indent=1))
