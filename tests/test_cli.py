import subprocess
import sys


def test_info_lists_every_backend_with_a_reason():
    out = subprocess.run([sys.executable, "-m", "gsa_kernels", "info"], capture_output=True, text=True, check=True).stdout
    for name in ("reference", "cpu", "triton", "cuda"):
        assert f"  {name}" in out
    assert "torch " in out and "gsa_kernels " in out


def test_bench_table_ratios_and_roofline_percentage():
    """The bench table: x-ratios from medians, % of roofline from the best cpu run (the peaks are
    best-of-N as well)."""
    from gsa_kernels import bench

    w = bench.Workload("G1", "demo", flops=2e9, bytes=1e6, op=None, compiled_reference=None,
                       peaks={"flops": 1e12, "bandwidth": 1e11})  # roofline: 2 ms (compute-bound)
    table = bench.format_table([(w, {"cpu": 4e-3, "cpu_best": 2.5e-3, "reference": 8e-3, "compiled": 1.2e-2})],
                               w.peaks)
    row = table.splitlines()[-1].split()
    assert row[:6] == ["G1", "4.0", "2.5", "8.0", "12.0", "2.0"]
    assert row[6:9] == ["2.00", "3.00", "80%"]


def test_bench_command_runs_one_workload():
    out = subprocess.run([sys.executable, "-m", "gsa_kernels", "bench", "--workloads", "G1", "--impls", "cpu",
                          "--repeats", "1"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1].split()[0] == "G1" and "%" in out.splitlines()[-1]
