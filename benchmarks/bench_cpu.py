"""CPU benchmarks, one pytest-benchmark group per workload (G1, G2, T1, M1, E1, the E2
empirical sweep over sigma x N x D, MNIST-5k by sigma (MN), M1 by sigma decade (M1S) and the
few-query workloads (F); shapes and
FLOP / byte counts in gsa_kernels/tools/bench.py). Each group times, in the same run: our cpu
backend, the eager reference, torch.compile of the reference, the workload's peers (bench.py:
"sdpa" for the empirical mixtures, "skilled" batched eager and "skilled_compiled" for the
low-rank ones, "stream" -- one read of the points -- for the few-query ones; each peer's
worst-row error against float64 truth in extra_info), and a "roofline" entry: the
time max(FLOPs / GEMM peak, bytes / stream bandwidth) with both peaks measured here (measured
next to each workload, recorded in extra_info; its benchmark body sleeps for that time so the
group table shows it in line).

    OMP_NUM_THREADS unset (all cores):
    python -m pytest benchmarks/bench_cpu.py --benchmark-columns=median,rounds --benchmark-sort=name

The slow eager references of M1 / E1 (tens of seconds) and of the N = 100k E2 points run one
round. Only the sweep: `-k E2`; one D: `-k d784`. The summary printed at
the end gives the ratios (x vs reference, x vs torch.compile, % of roofline)."""
import time

import pytest

import gsa_kernels as gk
from gsa_kernels.tools import bench

from .conftest import record

pytestmark = pytest.mark.skipif("cpu" not in gk.available_backends(), reason="cpu backend not built")

_BUILT = {}


def _workload(name):
    if name not in _BUILT:
        w = bench.build(name)
        w.peaks = bench.machine_peaks(repeats=3)  # measured next to the workload: the load drifts
        _BUILT[name] = w
    return _BUILT[name]


PEERS = ("sdpa", "skilled", "skilled_compiled", "stream")
ALL_WORKLOADS = (bench.WORKLOADS + bench.EMPIRICAL_WORKLOADS + bench.MNIST_WORKLOADS + bench.M1_DECADE_WORKLOADS
                 + bench.FEW_QUERY_WORKLOADS)
_TRUTH = {}


@pytest.mark.parametrize("impl", ["cpu", "reference", "compiled", "roofline", *PEERS])
@pytest.mark.parametrize("name", ALL_WORKLOADS)
def test_workload(benchmark, name, impl, peaks):
    import benchmarks.conftest as conf

    conf.pytest_terminal_summary.peaks = peaks
    w = _workload(name)
    if impl in PEERS and impl not in (w.peers or {}):
        pytest.skip(f"{impl} is no peer of {name}")
    benchmark.group = f"{name}: {w.description}"
    roof = w.roofline_seconds(w.peaks)
    benchmark.extra_info.update(
        flops=w.flops, bytes=w.bytes, roofline_s=roof, peak_flops=w.peaks["flops"], bandwidth=w.peaks["bandwidth"]
    )
    if impl == "roofline":
        benchmark.pedantic(time.sleep, args=(roof,), rounds=1, iterations=1)
        return
    fn = w.runner(impl)
    if impl != "stream" and impl != "roofline" and w.truth is not None and impl in ("cpu", *PEERS):
        if name not in _TRUTH:
            _TRUTH[name] = w.truth()
        benchmark.extra_info["worst_row_error"] = bench.worst_row_error(fn(), _TRUTH[name])
    if impl in ("reference", "compiled") and w.slow_reference:
        warmup = 1 if impl == "compiled" else 0  # compile once; the eager reference is cold anyway
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=warmup)
    else:
        benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    record(w, impl, benchmark.stats.stats.median)
    if impl == "cpu":
        record(w, "cpu_best", benchmark.stats.stats.min)  # compared with the (best-of-N) roofline


# ----------------------------------------------------------------------------- gradients
# The gradient w.r.t. x of G1, T1, M1, E1 (gsa_kernels/_core/_autograd.py), next to the cpu forward in
# the same run: "forward" runs the op on an x that requires grad (graph recorded), "backward"
# runs backward() from a fixed output gradient through a graph built outside the timed call.
# Read the backward / forward ratio (the target: <= 2.5) from one group.

GRAD_WORKLOADS = ("G1", "T1", "M1", "E1")


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("name", GRAD_WORKLOADS)
def test_gradient(benchmark, name, direction):
    import torch

    w = _workload(name)
    benchmark.group = f"grad {name}: {w.description}"
    x = w.x.detach().requires_grad_()
    grad = torch.randn_like(w.op("cpu"))

    if direction == "forward":
        benchmark.pedantic(lambda: w.op("cpu", x=x), rounds=5, iterations=1, warmup_rounds=1)
        return

    def graph():  # untimed: the forward that the timed backward runs through
        return (w.op("cpu", x=x),), {}

    benchmark.pedantic(lambda out: out.backward(grad), setup=graph, rounds=5, iterations=1, warmup_rounds=1)
