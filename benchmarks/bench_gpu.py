"""GPU benchmarks (pytest-benchmark) of the workloads shared with the CPU benchmarks.

    G1  gaussian_denoise     B=1024 D=3072 r=64
    G2  gaussian_denoise     B=256  D=3072 r=3072
    T1  gaussian_trajectory  T=18 B=256 D=3072 r=256
    M1  mixture_denoise      B=512  D=3072 K=200 r=32
    E1  mixture_denoise      B=256  N=20000 D=3072 sigma=0.5 (empirical: r = 0, residual_var = 0)

Runs only with a CUDA device (skipped otherwise):
    python -m pytest benchmarks/bench_gpu.py --benchmark-columns=median,iqr,ops
Each case records its H100 roofline estimate (extra_info, see ROOFLINE.md); ratios between
backends are the medians' ratios. `python benchmarks/bench_gpu.py` prints the ROOFLINE.md table.
"""
from __future__ import annotations

import pytest
import torch

# H100 SXM peaks (estimates, not measurements): HBM3 bandwidth, dense bf16 tensor cores, fp32 CUDA cores
HBM_BYTES_PER_S = 3.35e12
BF16_TC_FLOPS = 989e12
FP32_FLOPS = 67e12

WORKLOADS = {
    "G1": dict(op="gaussian_denoise", B=1024, D=3072, r=64),
    "G2": dict(op="gaussian_denoise", B=256, D=3072, r=3072),
    "T1": dict(op="gaussian_trajectory", T=18, B=256, D=3072, r=256),
    "M1": dict(op="mixture_denoise", B=512, D=3072, K=200, r=32),
    "E1": dict(op="mixture_denoise", B=256, D=3072, K=20000, r=0, sigma=0.5),
}


def work(name, x_bytes=4):
    """(bytes, dot_flops, other_flops) that any implementation must move / do (compulsory HBM
    traffic: inputs read once, outputs written once; model tensors in float32)."""
    w = WORKLOADS[name]
    B, D, r = w["B"], w["D"], w["r"]
    if w["op"] == "gaussian_denoise":  # c = y U, out = a y + mu + (c f) U^T
        return B * D * x_bytes * 2 + D * r * 4 + D * 4, 4 * B * D * r, 4 * B * D
    if w["op"] == "gaussian_trajectory":  # c once, T reconstructions
        T = w["T"]
        return B * D * x_bytes * (1 + T) + D * r * 4 + D * 4, 2 * B * D * r * (1 + T), 4 * T * B * D
    K = w["K"]
    model = K * D * 4 + K * D * r * 4
    if r == 0:  # |x - mu|^2 directly (sub + fma per element: 2 fp32 issue slots = 4 flop-equivalents), p @ means
        return B * D * x_bytes * 2 + model, 2 * B * K * D, 4 * B * K * D
    # per (row, component): c (2 D r), the direct residual |y - U c|^2 (2 D r, taken whenever
    # |y|^2 / (residual_var + s^2) > 256, i.e. nearly always at D = 3072), reconstruction (2 D r);
    # |y|^2, the residual and the acc update ~ 10 D
    return B * D * x_bytes * 2 + model, 6 * B * K * D * r, 10 * B * K * D


def roofline_us(name, tensor_cores, x_bytes=4):
    """max(memory time, compute time) in microseconds; dots on bf16 tensor cores or fp32 FMA."""
    nbytes, dot, other = work(name, x_bytes)
    t_mem = nbytes / HBM_BYTES_PER_S
    t_cmp = (dot / BF16_TC_FLOPS if tensor_cores else dot / FP32_FLOPS) + other / FP32_FLOPS
    return 1e6 * max(t_mem, t_cmp), 1e6 * t_mem, 1e6 * t_cmp


def roofline_table():
    lines = ["| workload | bytes (MB) | dot GFLOP | other GFLOP | memory us | fp32-FMA dots us | bf16-TC dots us |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in WORKLOADS:
        nbytes, dot, other = work(name)
        fp32, t_mem, t_fp32 = roofline_us(name, False)
        tc, _, t_tc = roofline_us(name, True)
        lines.append(f"| {name} | {nbytes / 1e6:.1f} | {dot / 1e9:.2f} | {other / 1e9:.2f} | {t_mem:.1f} | "
                     f"{t_fp32:.1f} -> **{fp32:.1f}** | {t_tc:.1f} -> **{tc:.1f}** |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- benchmarks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU benchmarks need a CUDA device (H100 estimates: benchmarks/ROOFLINE.md)")

_CACHE = {}


def _setup(name, dtype):
    """(x, fn_of_backend) for a workload, built once per (workload, dtype) on the GPU."""
    import gsa_kernels as gk

    if (name, dtype) in _CACHE:
        return _CACHE[(name, dtype)]
    w = WORKLOADS[name]
    B, D, r = w["B"], w["D"], w["r"]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    if w["op"].startswith("gaussian"):
        basis = torch.linalg.qr(torch.randn(D, r, device=dev, generator=gen))[0]
        eig = torch.linspace(4.0, 0.01, r, device=dev)
        g = gk.GaussianModel(torch.randn(D, device=dev, generator=gen) * 0.1, basis, eig, 0.01)
        x = (torch.randn(B, D, device=dev, generator=gen) * 2).to(dtype)
        if w["op"] == "gaussian_denoise":
            sigma = torch.rand(B, device=dev, generator=gen) * 5 + 0.01

            def fn(backend):
                return gk.gaussian_denoise(x, sigma, g, backend=backend)
        else:
            sigmas = gk.schedules.karras(w["T"] - 1).to(dev)  # T points, 80 -> 0

            def fn(backend):
                return gk.gaussian_trajectory(x, sigmas, g, backend=backend)
    else:
        K = w["K"]
        if r == 0:
            m = gk.GaussianMixture.from_points(torch.randn(K, D, device=dev, generator=gen))
            x = (m.means[torch.randint(0, K, (B,), device=dev, generator=gen)] + 0.5 * torch.randn(B, D, device=dev, generator=gen)).to(dtype)
        else:
            bases = torch.linalg.qr(torch.randn(K, D, r, device=dev, generator=gen))[0]
            eig = torch.rand(K, r, device=dev, generator=gen) * 4 + 0.01
            lw = torch.log_softmax(torch.randn(K, device=dev, generator=gen), 0)
            m = gk.GaussianMixture(torch.randn(K, D, device=dev, generator=gen), bases, eig, torch.full((K,), 0.05, device=dev), lw)
            x = (torch.randn(B, D, device=dev, generator=gen) * 2).to(dtype)
        sigma = torch.full((B,), float(w.get("sigma", 1.0)), device=dev)

        def fn(backend):
            return gk.mixture_denoise(x, sigma, m, backend=backend)
    _CACHE[(name, dtype)] = fn
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_gpu(benchmark, name, backend, dtype):
    import gsa_kernels as gk

    if backend not in gk.available_backends():
        pytest.skip(f"backend {backend!r} not available here")
    fn = _setup(name, dtype)
    out = fn(backend)  # warm-up: compile + autotune
    ref = fn("reference")
    scale = ref.float().abs().max().item()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= (1e-3 if dtype == torch.float32 else 3e-2) * max(1.0, scale), f"{name} {backend}: error {err}"
    torch.cuda.synchronize()
    x_bytes = torch.finfo(dtype).bits // 8
    benchmark.extra_info["roofline_us_fp32_dots"] = roofline_us(name, False, x_bytes)[0]
    benchmark.extra_info["roofline_us_tensor_cores"] = roofline_us(name, True, x_bytes)[0]

    def run():
        fn(backend)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=2)


if __name__ == "__main__":
    print(roofline_table())
