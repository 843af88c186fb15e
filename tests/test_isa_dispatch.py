"""Runtime instruction-set dispatch of the CPU kernels' loops (csrc/cpu/isa.h): the portable
build picks the widest variant this CPU supports, GSA_KERNELS_ISA=generic|avx2|avx512 forces one,
and every variant computes the same bits (the build disables FMA contraction and no loop
reassociates). Each setting runs in a fresh process (tests/_dispatch_probe.py) with one thread
and the blas engine, so that the GEMMs are the same in every run."""
import platform

import pytest
import torch

from tests._dispatch import cpu_flags, probe
from tests._helpers import requires_backend

pytestmark = requires_backend("cpu")

X86 = platform.machine().lower() in ("x86_64", "amd64")
NEEDS = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"}}


def supported(isa):
    return X86 and NEEDS[isa] <= cpu_flags()


def test_widest_supported_variant_is_chosen():
    info = probe()["info"]
    expect = "avx512" if supported("avx512") else "avx2" if supported("avx2") else "generic"
    assert info["isa"] == expect
    assert info["isa_supported"] == ["generic"] + [i for i in ("avx2", "avx512") if supported(i)]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_vector_variant_equals_generic(isa):
    run = probe(gemm="blas", isa=isa, threads=1)
    if not supported(isa):  # forcing a variant the CPU lacks is an error, not a crash
        assert run["error"].startswith("RuntimeError") and f"GSA_KERNELS_ISA={isa}" in run["error"]
        return
    assert run["info"]["isa"] == isa
    generic = probe(gemm="blas", isa="generic", threads=1)
    assert generic["info"]["isa"] == "generic"
    # every case with the layouts kept, and the 5 Gaussian ones again without (3 dtypes each)
    assert run["outputs"].keys() == generic["outputs"].keys() and len(generic["outputs"]) == 33 + 15
    for name, out in generic["outputs"].items():
        assert torch.equal(run["outputs"][name], out), f"{name}: {isa} differs from generic"


def test_bad_isa_name_is_a_clear_error():
    error = probe(isa="sse9")["error"]
    assert error.startswith("ValueError") and "GSA_KERNELS_ISA must be auto, generic, avx2 or avx512" in error
