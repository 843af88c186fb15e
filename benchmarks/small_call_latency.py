"""Per-call latency of small ops (B 1, D 784): the Python layer plus one kernel launch, where the
argument checks, the model snapshot and the dispatch are most of the time. Run the same script on
two trees to compare them (issue 26: behaviour and speed unchanged by the redesign):

    PYTHONPATH=$PWD python benchmarks/small_call_latency.py
Prints the minimum over 25 batches of 200 calls, in microseconds."""
import time

import torch

import gsa_kernels as gk


def main():
    torch.manual_seed(0)
    D, r, K = 784, 8, 10
    g = gk.GaussianModel(torch.randn(D), torch.linalg.qr(torch.randn(D, r))[0], torch.rand(r) + 0.5, residual_var=0.1)
    bases = torch.stack([torch.linalg.qr(torch.randn(D, r))[0] for _ in range(K)])
    m = gk.GaussianMixture(torch.randn(K, D), bases, torch.rand(K, r) + 0.5, torch.full((K,), 0.1), torch.zeros(K))
    e = gk.GaussianMixture.from_points(torch.randn(500, D))
    x = torch.randn(1, D)
    cases = {
        "gaussian_denoise B1": lambda: gk.gaussian_denoise(x, 0.5, g, backend="cpu"),
        "gaussian_flow B1": lambda: gk.gaussian_flow(x, 2.0, 0.5, g, backend="cpu"),
        "mixture_denoise B1 K10": lambda: gk.mixture_denoise(x, 0.5, m, backend="cpu"),
        "mixture_score B1 K10": lambda: gk.mixture_score(x, 0.5, m, backend="cpu"),
        "empirical denoise B1 N500": lambda: gk.mixture_denoise(x, 0.5, e, backend="cpu"),
    }
    for name, f in cases.items():
        for _ in range(50):
            f()
        best = float("inf")
        for _ in range(25):
            t0 = time.perf_counter()
            for _ in range(200):
                f()
            best = min(best, (time.perf_counter() - t0) / 200 * 1e6)
        print(f"{name:28s} {best:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
