"""pytest-benchmark setup for the CPU benchmarks: machine peaks measured once per session, and a
summary table (ratios and % of roofline, the numbers that survive a noisy shared machine)
printed at the end. Run:  python -m pytest benchmarks/bench_cpu.py -p no:cacheprovider
(pytest collects bench_*.py here through `python_files` below)."""
import pytest

from gsa_kernels.tools import bench

_RESULTS = {}  # workload -> {impl: seconds}
_WORKLOADS = {}


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")


@pytest.fixture(scope="session")
def peaks():
    return bench.machine_peaks()


@pytest.fixture(scope="session")
def workload_cache():
    return _WORKLOADS


def record(workload, impl, seconds):
    _RESULTS.setdefault(workload.name, {})[impl] = seconds
    _WORKLOADS[workload.name] = workload


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    from gsa_kernels.tools.bench import format_table, machine_peaks

    peaks = getattr(pytest_terminal_summary, "peaks", None) or machine_peaks()
    rows = [(_WORKLOADS[n], _RESULTS[n]) for n in _RESULTS]
    terminalreporter.write_sep("=", "gsa_kernels CPU benchmark summary")
    terminalreporter.write_line(format_table(rows, peaks))
    for line in bench.growth_exponents(rows):
        terminalreporter.write_line(line)
