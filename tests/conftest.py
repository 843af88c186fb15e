import pytest
import torch


def pytest_report_header(config):
    from gsa_kernels._core import _backends

    return ["gsa_kernels backends: " + ", ".join(f"{n}={'yes' if ok else 'no'}" for n, (ok, _) in _backends.status().items())]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- the slow tier
# `pytest -m "not slow"` is the fast tier (tests/README.md). What is slow is listed here, in one
# place: whole modules, single tests (node ids, parameters included or not), and the conformance
# items of the backends that run through the Triton interpreter or the CUDA emulation.
SLOW_MODULES = {
    "test_triton_backend.py",  # the interpreter suite and the sm_80 / sm_90 compiles
    "test_cuda_backend.py",  # the emulation, nvcc-built self-tests, PTX checks
    "test_kernel_regressions.py",  # large shapes on every backend, interpreter child
    "test_sanitizers.py", "test_gpu_check.py",  # compiles, the GPU check's dry run
    "test_demo.py",  # trains and samples the MNIST networks
    "test_fuzz.py",  # hypothesis
    "test_isa_dispatch.py", "test_gemm_engines.py",  # a probe process per setting
}
SLOW_TESTS = {
    "test_autograd.py::test_triton_interpreter", "test_autograd.py::test_gradient_ascent_recovers_mixture",
    "test_distributed.py::test_sharded_mixture_matches_single_process",  # 3-rank process groups
    "test_distributed.py::test_readme_torchrun_example_runs",
    "test_distributed.py::test_sharded_mixture_counts_bytes",  # a 3-rank group
    "test_model_state.py::test_memory_returns_after_dropping_models",  # 5 min of wall time on a loaded host
    "test_cli.py::test_bench_command_runs_one_workload",  # a bench subprocess
    "test_concurrency.py::test_ops_under_spawn",  # spawned workers import torch
    "test_empirical_streaming.py::test_anonymous_memory_stays_under_the_block_budget",  # RSS sampling
    "test_diffusers_pipeline.py::test_pipeline_switch",  # tiny real pipelines, 3 runs each
    "test_diffusers_pipeline.py::test_prepare_latents_pipeline_with_guidance",
    "test_fit_one_pass.py::test_one_pass_fit_of_a_generator_at_d4096",
    "test_fit_cli.py::test_fitted_stats_switch_a_pipeline_and_refuse_another_shape",
    "test_packaging.py::test_setup_py_reports_the_bound_version",  # a python process importing cpp_extension
    "test_scaleout_hardening.py::test_distributed_tie_across_ranks_and_16bit_scores",  # 2-rank process group
    "test_scaleout_hardening.py::test_distributed_refuses_grad_instead_of_detaching",
    "test_scaleout_hardening.py::test_distributed_score_is_stable_at_small_sigma",  # the same 2-rank group
    "test_scaleout_hardening.py::test_concurrent_model_swaps_never_crash_or_corrupt",  # a subprocess, 800 calls
}
SLOW_CONFORMANCE_BACKENDS = {"triton", "cuda"}


def _is_slow(item):
    path = item.path.name
    if path in SLOW_MODULES:
        return True
    base = f"{path}::{item.originalname}" if hasattr(item, "originalname") else f"{path}::{item.name}"
    if base in SLOW_TESTS or f"{path}::{item.name}" in SLOW_TESTS:
        return True
    spec = getattr(item, "callspec", None)
    return ("conformance" in item.path.parts and spec is not None
            and spec.params.get("backend") in SLOW_CONFORMANCE_BACKENDS)


@pytest.hookimpl(tryfirst=True)  # before -m selects: the conformance conftest starts its child after both
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
