"""The labels family: the labelled Gaussian ops (class-conditional models, row b under component
labels[b]) on every backend, with the suite's one tolerance function (harness.tol):

- mixed / sorted / missing / one-label rows against the float64 labelled reference;
- all rows one label against the same backend's single-Gaussian op on that component;
- bad labels (out of range, another device, wrong dtype or shape, not a mixture) -> a clear error
  naming labels, through the public ops on each backend; and at the kernel level an error, never
  an output;
- the labelled reference against the single-Gaussian reference row by row (independent check).
"""
import math

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import reference
from gsa_kernels._core._contract import SpectralKind

from . import harness
from .cases import CASES, Case, _shape_name

MAP, TRAJECTORY = "gaussian_map_labeled", "gaussian_trajectory_labeled"


def _params(op, select=lambda c: True):
    return [pytest.param(b, c, id=f"{b}-{c.id}") for b in harness.backends() for c in CASES[op][0] if select(c)]


def _inputs(op, case):
    args64 = CASES[op][1](case)
    args = harness.cast(args64, case.dtype)
    return args, harness.as_f64(args)


@pytest.mark.parametrize("backend,case", _params(MAP))
def test_gaussian_map_labeled(backend, case):
    args, args64 = _inputs(MAP, case)
    out = harness.kernel(backend, MAP)(*args)
    assert out.dtype == case.dtype and out.shape == args[0].shape, f"{out.dtype} {tuple(out.shape)}"
    truth = reference.gaussian_map_labeled(*args64)
    harness.check_rows(out, truth, harness.labeled_scale(args64, SpectralKind(case.kind)), case.dtype, "out")


@pytest.mark.parametrize("backend,case", _params(TRAJECTORY))
def test_gaussian_trajectory_labeled(backend, case):
    args, args64 = _inputs(TRAJECTORY, case)
    out = harness.kernel(backend, TRAJECTORY)(*args)
    T, B = args[6].shape
    assert out.dtype == case.dtype and out.shape == (T, B, case.D), f"{out.dtype} {tuple(out.shape)}"
    truth = reference.gaussian_trajectory_labeled(*args64)
    scale = harness.labeled_scale(harness.steps_as_rows(args64), SpectralKind.FLOW)
    harness.check_rows(out.reshape(T * B, -1), truth.reshape(T * B, -1), scale, case.dtype, "steps as rows (t * B + b)")


def _one_label(case):
    return case.extra["labels"] == "one" or case.K == 1


@pytest.mark.parametrize("backend,case", _params(MAP, _one_label) + _params(TRAJECTORY, _one_label))
def test_one_label_is_the_single_gaussian_op(backend, case):
    """All rows one label k: the labelled op of a backend equals its single-Gaussian op on
    component k (within the suite's tolerance of the single op's truth)."""
    trajectory = case.T > 1
    op = TRAJECTORY if trajectory else MAP
    args, args64 = _inputs(op, case)
    x, labels, means, bases, eigvals, residual_var, *rest = args
    k = int(labels[0])
    assert (labels == k).all()
    out = harness.kernel(backend, op)(*args)
    single = harness.kernel(backend, "gaussian_trajectory" if trajectory else "gaussian_map")(
        x, means[k], bases[k], eigvals[k], float(residual_var[k]), *rest)
    if trajectory:
        scale = harness.labeled_scale(harness.steps_as_rows(args64), SpectralKind.FLOW)
        out, single = out.reshape(-1, case.D), single.reshape(-1, case.D)
    else:
        scale = harness.labeled_scale(args64, SpectralKind(case.kind))
    harness.check_rows(out, single.double(), scale, case.dtype, "labelled vs single-Gaussian op")


ERROR_CASES = [Case("labels", _shape_name(6, 8, 2, K=3) + "_errors", 6, 8, 2, K=3, extra={"labels": "mixed"})]


@pytest.mark.parametrize("backend,case", [pytest.param(b, c, id=f"{b}-{c.id}") for b in harness.backends() for c in ERROR_CASES])
def test_bad_labels_are_clear_errors(backend, case):
    args, _ = _inputs(MAP, case)
    x, labels, means, bases, eigvals, residual_var, sigma = args[:7]
    m = gk.GaussianMixture(means, bases, eigvals, residual_var)
    K = m.num_components
    ops = [lambda y, model=m: gk.gaussian_denoise(x, sigma, model, backend=backend, labels=y),
           lambda y, model=m: gk.gaussian_flow(x, sigma, 0.0, model, backend=backend, labels=y),
           lambda y, model=m: gk.gaussian_trajectory(x, [1.0, 0.5], model, backend=backend, labels=y)]
    bad_values = [labels.clone().fill_(K), torch.where(labels == labels[0], -1, labels)]
    for run in ops:
        for bad in bad_values:
            with pytest.raises(ValueError, match=r"labels must lie in \[0, K\) = \[0, 3\)"):
                run(bad)
        other = "meta" if x.device.type == "cpu" else "cpu"
        with pytest.raises(ValueError, match="labels is on"):
            run(labels.to(other))
        with pytest.raises(TypeError, match="labels must be an int64"):
            run(labels.int())
        with pytest.raises(ValueError, match=r"labels must be \[B\]"):
            run(labels[:-1])
        with pytest.raises(TypeError, match="labels=... selects a component"):
            run(labels, gk.GaussianModel(means[0], bases[0], eigvals[0], 0.1))
    with pytest.raises(TypeError, match="pass labels=y"):  # a mixture without labels: as before, an error
        gk.gaussian_denoise(x, sigma, m, backend=backend)
    # the kernels themselves (no public validation) never return an output for labels out of
    # range (on a GPU a device-side assert would end the process: CPU tensors only)
    if x.device.type == "cpu":
        for bad in bad_values:
            with pytest.raises((ValueError, IndexError, RuntimeError)):
                harness.kernel(backend, MAP)(x, bad, *args[2:])


@pytest.mark.parametrize("shape_case", CASES[MAP][0][:12], ids=lambda c: c.id)  # not `case`: no backend here
def test_labeled_reference_is_the_single_gaussian_reference_per_row(shape_case):
    """Independent of the gathered form: each row through reference.gaussian_map on its own."""
    args64 = harness.as_f64(harness.cast(CASES[MAP][1](shape_case), torch.float64))
    x, labels, means, bases, eigvals, residual_var, *rows, kind = args64
    out = reference.gaussian_map_labeled(*args64)
    for b in range(x.shape[0]):
        k = int(labels[b])
        one = reference.gaussian_map(x[b:b + 1], means[k], bases[k], eigvals[k], float(residual_var[k]),
                                     *[v[b:b + 1] for v in rows], kind)
        torch.testing.assert_close(out[b:b + 1], one, rtol=1e-12, atol=1e-12 * (1 + one.abs().max().item()))
    assert not math.isnan(out.sum().item())


@pytest.mark.parametrize("prefix", ["", "cuda_emu_"])
def test_opcheck_labeled_ops(prefix):
    """Schemas, fakes (torch.compile) and autograd registration of the compiled labelled ops."""
    from gsa_kernels._core import _extension

    if not _extension.loaded:
        pytest.skip(f"compiled extension not loaded: {_extension.error}")
    case = CASES[MAP][0][0]
    args = harness.as_f64(harness.cast(CASES[MAP][1](case), torch.float64))
    ops = torch.ops.gsa_kernels
    x, labels, means, bases, eigvals, residual_var, s = args[:7]
    torch.library.opcheck(getattr(ops, prefix + MAP).default, (x, labels, means, bases, eigvals, residual_var, s, s * 0.5,
                                                                 s, s, int(SpectralKind.FLOW)))
    sigmas = torch.stack([s, s * 0.3, s * 0])
    torch.library.opcheck(getattr(ops, prefix + TRAJECTORY).default, (x, labels, means, bases, eigvals, residual_var, sigmas))
