import argparse
import os
import subprocess
import sys

import pytest

from gsa_kernels.tools.demo import cli


def _run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, **kw)


def test_info_lists_every_backend_with_a_reason():
    out = _run("-m", "gsa_kernels", "info", check=True).stdout
    for name in ("reference", "cpu", "triton", "cuda"):
        assert f"  {name}" in out
    assert "torch " in out and "gsa_kernels " in out


def _imported_modules(stderr):
    """Module names from `python -X importtime` output."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("command", [[], ["info"], ["demo"], ["explain"], ["train-demo-model"], ["bench"]])
def test_help_does_not_import_torch(command):
    """--help answers before torch is imported (torch alone takes seconds to import)."""
    res = _run("-X", "importtime", "-m", "gsa_kernels", *command, "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: python -m gsa_kernels" in res.stdout
    modules = _imported_modules(res.stderr)
    assert "argparse" in modules  # importtime output was parsed
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}


def test_unknown_command_is_a_usage_error_naming_the_commands():
    res = _run("-m", "gsa_kernels", "bogus")
    assert res.returncode == 2 and "invalid choice: 'bogus'" in res.stderr and "train-demo-model" in res.stderr


def test_bench_unknown_workload_is_a_usage_error():
    from gsa_kernels.tools import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--workloads", "G1,G9", "--impls", "cpu"])
    assert e.value.code == 2


@pytest.mark.parametrize("parser", [cli.demo_parser, cli.explain_parser, cli.train_parser, cli.bench_parser])
def test_every_option_has_help_and_shows_its_default(parser):
    p = parser()
    assert isinstance(p.formatter_class, type) and issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in p._actions:
        assert action.help, f"{action.option_strings} has no help text"
    assert "(None: 500;" in cli.demo_parser().format_help()  # None: filled after parsing, aware of --quick


def test_demo_run_specs():
    assert cli.run_spec("heun:18:0.2,0.4") == ("heun", 18, [0.2, 0.4])
    for bad in ("heun:18", "euler:8:0.2", "heun:1:0.5", "heun:8:1.0", "heun:8:", "heun:x:0.2"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.run_spec(bad)


def test_no_cuda_runtime_warning_is_not_shown():
    """torch.utils.cpp_extension (torch.compile imports it) warns "No CUDA runtime is found" on
    machines with nvcc but no GPU; the command line hides that one message."""
    code = ("from gsa_kernels import __main__ as m; m.main(['info']); import torch.utils.cpp_extension")
    res = _run("-c", code, env={**os.environ, "CUDA_HOME": os.environ.get("CUDA_HOME", sys.prefix)})
    assert res.returncode == 0, res.stderr
    assert "No CUDA runtime is found" not in res.stderr


def test_bench_table_ratios_and_roofline_percentage():
    """The bench table: x-ratios from medians, % of roofline from the best cpu run (the peaks are
    best-of-N as well); a kernel faster than its roofline gets an explanation line."""
    from gsa_kernels.tools import bench

    w = bench.Workload("G1", "demo", flops=2e9, bytes=1e6, op=None, compiled_reference=None,
                       peaks={"flops": 1e12, "bandwidth": 1e11})  # roofline: 2 ms (compute-bound)
    table = bench.format_table([(w, {"cpu": 4e-3, "cpu_best": 2.5e-3, "reference": 8e-3, "compiled": 1.2e-2})],
                               w.peaks)
    row = table.splitlines()[-1].split()
    assert row[:6] == ["G1", "4.0", "2.5", "8.0", "12.0", "2.0"]
    assert row[6:9] == ["2.00", "3.00", "80%"]
    assert "above 100 %" not in table
    fast = bench.format_table([(w, {"cpu": 1.8e-3, "cpu_best": 1.6e-3})], w.peaks)
    assert "125%" in fast and "above 100 % (G1): faster than the roofline model" in fast.splitlines()[-1]


def test_bench_interleaves_impls_and_pairs_their_ratios():
    """Every impl is warmed once, then timed once per round in a rotated order (drift meets them
    all alike); a slow impl is timed once after the rounds (cold: no warm-up). The x columns are
    the median of the per-round ratios, not the ratio of the medians."""
    from gsa_kernels.tools import bench

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("cpu", "reference", "compiled", "slow")}
    times = bench.interleaved_times(fns, 3, once={"slow"}, cold={"slow"})
    assert calls == ["cpu", "reference", "compiled",  # warm-up
                     "cpu", "reference", "compiled", "reference", "compiled", "cpu", "compiled", "cpu", "reference",
                     "slow"]
    assert [len(times[k]) for k in fns] == [3, 3, 3, 1]
    paired = {"cpu": [1.0, 2.0, 4.0], "reference": [2.0, 2.0, 12.0], "slow": [6.0]}
    assert bench.paired_ratio(paired, "reference") == 2.0  # ratios 2, 1, 3 (medians: 2 / 2 = 1)
    assert bench.paired_ratio(paired, "slow") == 3.0  # timed once: against cpu's median
    assert bench.paired_ratio(paired, "compiled") is None
    w = bench.Workload("G1", "demo", flops=2e9, bytes=1e6, op=None, compiled_reference=None,
                       peaks={"flops": 1e12, "bandwidth": 1e11})
    row = bench.format_table([(w, {"cpu": 2e-3, "reference": 2e-3, "x_reference": 2.0})], w.peaks).splitlines()[-1]
    assert row.split()[6] == "2.00"


def test_bench_command_runs_one_workload():
    out = _run("-m", "gsa_kernels", "bench", "--workloads", "G1", "--impls", "cpu", "--repeats", "1", check=True).stdout
    row = [line for line in out.splitlines() if line.startswith("G1 ")][-1]  # the table's row
    assert row.split()[8].endswith("%")
