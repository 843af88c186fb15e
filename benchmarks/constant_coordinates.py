"""MNIST-5k's constant coordinates (121 of 784 blank-border pixels, left out of the cpu kernel's
GEMMs where enough rows share them: csrc/cpu/empirical.cpp), by batch and sigma, paired per round:
the points as they are ("gathered"), the same points with point 0 moved by 1e-3 in those
coordinates so that every coordinate varies ("whole"), and one SDPA call (the peer of issue 29).

    PYTHONPATH=$PWD python benchmarks/constant_coordinates.py [sigmas] [batches]
e.g. `... 1,3,10 64,128,256,512` (the default). x columns: median per-round time ratio, > 1: the
first named is faster."""
import sys
import time

import torch

import gsa_kernels as gk
from gsa_kernels.tools.bench import _mnist_points, sdpa_empirical, sdpa_layout


def paired(points, layout, gathered, whole, B, sigma, rounds):
    """One (B, sigma): median time per implementation and the per-round ratios."""
    N, D = points.shape
    gen = torch.Generator().manual_seed(1)
    x = points[torch.randint(0, N, (B,), generator=gen)] + sigma * torch.randn(B, D, generator=gen)
    sig = torch.full((B, 1), sigma)
    fns = {"gathered": lambda: gathered.denoise(x, sigma), "whole": lambda: whole.denoise(x, sigma),
           "sdpa": lambda: sdpa_empirical(x, points, sig, layout)}
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[rounds // 2] * 1e3 for k, v in ts.items()}
    ratio = {(a, b): sorted(u / v for u, v in zip(ts[a], ts[b]))[rounds // 2]
             for a, b in (("whole", "gathered"), ("sdpa", "gathered"), ("sdpa", "whole"))}
    return med, ratio


def main(sigmas="1,3,10", batches="64,128,256,512", rounds=11):
    points = _mnist_points("cpu", torch.float32)
    D = points.shape[1]
    const = points.amax(0) == points.amin(0)
    moved = points.clone()
    moved[0, const] += 1e-3
    gathered, whole = gk.GaussianMixture.from_points(points), gk.GaussianMixture.from_points(moved)
    layout = sdpa_layout(points)
    print(f"MNIST-5k: {int(const.sum())} of {D} coordinates constant; {torch.get_num_threads()} threads")
    for B in [int(b) for b in batches.split(",")]:
        for sigma in [float(s) for s in sigmas.split(",")]:
            med, r = paired(points, layout, gathered, whole, B, sigma, rounds)
            print(f"B {B} sigma {sigma:g}: " + " ".join(f"{k} {v:.1f} ms" for k, v in med.items())
                  + f" | x gathered vs whole {r['whole', 'gathered']:.3f}, vs sdpa {r['sdpa', 'gathered']:.2f};"
                  f" whole vs sdpa {r['sdpa', 'whole']:.2f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
