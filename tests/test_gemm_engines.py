"""The GEMM engine of each shape class of the CPU kernels (csrc/cpu/gemm.cpp): measured on first
use by default, forced with GSA_KERNELS_GEMM=onednn|blas. Each setting runs in a fresh process
(tests/_dispatch_probe.py, 2 threads: whole-batch GEMMs run threaded, row-block GEMMs inside
at::parallel_for single-threaded); every engine must give the same results within rounding."""
import math

import pytest
import torch

from tests._dispatch import probe
from tests._helpers import rel_err, requires_backend

pytestmark = requires_backend("cpu")

ENGINES = ("onednn", "blas")
# float32: GEMM sums over D = 96 terms in a different order; float64 runs blas either way;
# float16: one half-precision rounding of the output apart at most
AGREE = {"torch.float32": 1e-5, "torch.float64": 1e-13, "torch.float16": 1e-3}
SITES = {"project", "expand", "mixture_forward", "mixture_backward", "distances"}


@pytest.mark.parametrize("engine", ENGINES)
def test_forced_engine_serves_every_float32_class(engine):
    info = probe(gemm=engine)["info"]
    gemms = info["gemm"]
    assert {e["site"] for e in gemms} == SITES
    assert {e["threaded"] for e in gemms if e["site"] == "project"} == {True, False}
    assert {e["w_contiguous"] for e in gemms if e["site"] == "project"} == {True, False}
    for e in gemms:
        assert e["how"] == "forced", e
        # oneDNN has no float64 GEMM and needs w's rows contiguous: those stay with blas
        assert e["engine"] == (engine if e["dtype"] == "float32" and e["w_contiguous"] else "blas"), e
        assert e["calls"] > 0


def test_engines_agree():
    a, b = (probe(gemm=e)["outputs"] for e in ENGINES)
    assert a.keys() == b.keys() and len(a) == 33 + 15
    for name in a:
        err = rel_err(a[name], b[name])
        assert err <= AGREE[name.split("/")[0]], f"{name}: onednn vs blas differ by {err:.3g}"


def test_measured_choice_is_the_fastest():
    info = probe()["info"]
    for e in info["gemm"]:
        if e["dtype"] == "float64" or not e["w_contiguous"]:
            assert e["how"] == "only" and e["engine"] == "blas", e
            continue
        assert e["how"] == "measured", e
        assert set(e["ms"]) == set(ENGINES) and all(math.isfinite(t) and t > 0 for t in e["ms"].values()), e
        assert e["engine"] == min(e["ms"], key=e["ms"].get), e
        assert 0 < e["m"] <= 300, e  # timed on the call's own rows


def test_auto_matches_forced():
    auto = probe()
    chosen = {e["engine"] for e in auto["info"]["gemm"] if e["dtype"] == "float32"}
    for engine in chosen & set(ENGINES):
        forced = probe(gemm=engine)["outputs"]
        for name, out in auto["outputs"].items():
            assert rel_err(out, forced[name]) <= AGREE[name.split("/")[0]], name


def test_bad_engine_name_is_a_clear_error():
    error = probe(gemm="mkl-fast")["error"]
    assert error.startswith("ValueError") and "GSA_KERNELS_GEMM must be auto, onednn or blas" in error


def test_results_meet_the_reference():
    """The engines' agreement is not agreement on garbage: the well-conditioned cases against
    the float64 reference (the conformance suite covers every case with the default engine)."""
    import gsa_kernels as gk
    from tests._dispatch_probe import inputs

    t = inputs(torch.float32)
    ref = dict(backend="reference")
    expect = {
        "denoise": gk.gaussian_denoise(t["x"].double(), t["sigma"].double(), t["g"].to(dtype=torch.float64), **ref),
        "mixture": gk.mixture_denoise(t["x"].double(), t["sigma"].double(), t["m"].to(dtype=torch.float64), **ref),
    }
    expect["direct_denoise"] = expect["denoise"]  # no layout kept: U read as it is
    for engine in ENGINES:
        out = probe(gemm=engine)["outputs"]
        for name, want in expect.items():
            assert rel_err(out[f"torch.float32/{name}"], want) <= 1e-5, (engine, name)
