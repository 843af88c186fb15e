"""Runs every CPU-kernel path once on fixed inputs and saves the outputs, for the dispatch tests
(tests/test_gemm_engines.py, tests/test_isa_dispatch.py), which run it in fresh processes: the
engine and ISA choices are made once per process, from GSA_KERNELS_GEMM / GSA_KERNELS_ISA.

    python -m tests._dispatch_probe OUT.pt THREADS

saves {"outputs": {case: tensor}, "info": gsa_kernels::_cpu_dispatch_info() as a dict}, or
{"error": "TypeName: message"} when an op raises."""
import json
import math
import os
import sys

import torch

import gsa_kernels as gk
from tests._helpers import random_gaussian, random_mixture

B, D = 300, 96  # B > 256: the row-block kernels run more than one block, in parallel


def inputs(dtype):
    """The models and inputs of every case, in the compute dtype of x (float16 x: float32)."""
    gen = torch.Generator().manual_seed(1)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    x = (3 * torch.randn(B, D, generator=gen)).to(dtype)
    sigma = torch.exp(torch.empty(B).uniform_(math.log(0.01), math.log(50.0), generator=gen)).to(cd)
    sigmas = torch.stack([sigma * f for f in (1.0, 0.5, 0.1)]).contiguous()
    g = random_gaussian(D, 12, dtype=cd)
    full = random_gaussian(D, D, residual_var=0.0, dtype=cd, seed=1)
    m = random_mixture(5, D, 4, dtype=cd)
    points = torch.randn(40, D, generator=gen, dtype=torch.float64).to(cd)
    empirical = gk.GaussianMixture.from_points(points)
    near = (points[torch.arange(B) % 40] + 0.05 * torch.randn(B, D, generator=gen)).to(dtype)
    # more points than one chunk of the cpu kernel's few-query split (512 at D 96 in float32)
    many = gk.GaussianMixture.from_points(torch.randn(1100, D, generator=gen, dtype=torch.float64).to(cd))
    return dict(x=x, sigma=sigma, sigmas=sigmas, g=g, full=full, m=m, empirical=empirical, near=near, many=many)


GAUSSIAN_CASES = ("denoise", "denoise_full", "score", "flow", "trajectory")


def run_cases(dtype):
    """{case name: output} of the cpu backend."""
    t = inputs(dtype)
    x, s, g = t["x"], t["sigma"], t["g"]
    cpu = dict(backend="cpu")
    out = {
        "denoise": gk.gaussian_denoise(x, s, g, **cpu),
        "denoise_full": gk.gaussian_denoise(x, s, t["full"], **cpu),
        "score": gk.gaussian_score(x, s, g, **cpu),
        "flow": gk.gaussian_flow(x, s, 0.5 * s, g, **cpu),
        "trajectory": gk.gaussian_trajectory(x, t["sigmas"], g, **cpu),
    }
    out["mixture"], out["mixture_weights"] = gk.mixture_denoise(x, s, t["m"], return_weights=True, **cpu)
    out["empirical_dense"] = gk.mixture_denoise(x, 30.0, t["empirical"], **cpu)  # weights spread out
    out["empirical_sparse"] = gk.mixture_denoise(t["near"], 0.05, t["empirical"], **cpu)  # one-hot
    # few queries: the split over the points (double dot products up to 4 rows, float beyond)
    out["empirical_few3"] = gk.mixture_denoise(x[:3], 3.0, t["many"], **cpu)
    out["empirical_few13"] = gk.mixture_denoise(x[:13], 3.0, t["many"], **cpu)
    return {name: v.detach() for name, v in out.items()}


def main(path, threads):
    torch.set_num_threads(threads)
    try:
        # every layout kept: each GEMM class meets every engine that takes its operands; then the
        # Gaussian cases again with none kept (the project GEMM reads U as it is: blas only)
        dtypes = (torch.float32, torch.float64, torch.float16)
        os.environ["GSA_KERNELS_LAYOUTS"] = "always"
        outputs = {f"{dtype}/{k}": v for dtype in dtypes for k, v in run_cases(dtype).items()}
        os.environ["GSA_KERNELS_LAYOUTS"] = "never"
        outputs.update({f"{dtype}/direct_{k}": v for dtype in dtypes for k, v in run_cases(dtype).items()
                        if k in GAUSSIAN_CASES})
        result = {"outputs": outputs, "info": json.loads(torch.ops.gsa_kernels._cpu_dispatch_info())}
    except Exception as e:  # the test checks the message
        result = {"error": f"{type(e).__name__}: {e}"}
    torch.save(result, path)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
