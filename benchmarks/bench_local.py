"""Local score machines (issue 27) on MNIST: our fused CPU kernel (gk.local_denoise) against the
conv2d formulation of public implementations (benchmarks/local_conv2d.py), one pytest-benchmark
group per workload of gsa_kernels.tools.bench.LOCAL_WORKLOADS (LS / ELS / BB-ELS, 28 x 28, B 4 and 8,
P 3 / 5 / 7, sigma 0.3 to 3, N = 1000), and ours alone at N = 4000 (LOCAL_N4K). The conv2d
baseline takes up to ~a minute per ELS call on 2 cores: one round. Before timing, both answers
are compared (float32 expanded form vs our exact sums: agreement to ~1e-4 at these sigmas).

    python -m pytest benchmarks/bench_local.py -p no:cacheprovider --benchmark-columns=median,rounds
(the paired, interleaved table: python -m gsa_kernels bench --workloads L)"""
import pytest

import gsa_kernels as gk
from gsa_kernels.tools import bench

pytestmark = pytest.mark.skipif("cpu" not in gk.available_backends(), reason="cpu backend not built")

_BUILT = {}


def _impls(name):
    if name not in _BUILT:
        _BUILT[name] = bench.build_local(name)
    return _BUILT[name]


@pytest.mark.parametrize("impl", ["cpu", "conv2d"])
@pytest.mark.parametrize("name", bench.LOCAL_WORKLOADS + bench.LOCAL_N4K)
def test_local_workload(benchmark, name, impl):
    desc, impls = _impls(name)
    if impl not in impls:
        pytest.skip("the conv2d baseline runs at N = 1000 only" if name in bench.LOCAL_N4K else "baseline not importable")
    benchmark.group = f"{name}: {desc}"
    if impl == "conv2d":
        diff = (impls["cpu"]() - impls["conv2d"]()).abs().max().item()
        benchmark.extra_info["max_abs_diff_vs_cpu"] = diff
        assert diff < 1e-3, f"conv2d and the fused kernel disagree by {diff}"
        benchmark.pedantic(impls[impl], rounds=1, iterations=1)
    else:
        benchmark.pedantic(impls[impl], rounds=3, iterations=1, warmup_rounds=1)
