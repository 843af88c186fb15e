"""One test body per kernel-level op, over every backend that can run and the one case list
(cases.py), against the float64 reference with one tolerance function per dtype (harness.py).
Test ids read test_<op>[<backend>-<family>-<case>]; summary.py tabulates a --junitxml report."""
import math

import numpy as np
import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import reference
from gsa_kernels._core._contract import LocalMode, SpectralKind

from . import harness
from .cases import CASES, local_identity_cases


def _params(op):
    cases = CASES[op][0]
    return [pytest.param(b, c, id=f"{b}-{c.id}") for b in harness.backends() for c in cases]


def _inputs(op, case):
    args64 = CASES[op][1](case)
    args = harness.cast(args64, case.dtype)
    return args, harness.as_f64(args)


@pytest.mark.parametrize("backend,case", _params("gaussian_map"))
def test_gaussian_map(backend, case):
    args, args64 = _inputs("gaussian_map", case)
    out = harness.kernel(backend, "gaussian_map")(*args)
    assert out.dtype == case.dtype and out.shape == args[0].shape, f"{out.dtype} {tuple(out.shape)}"
    truth = reference.gaussian_map(*args64)
    harness.check_rows(out, truth, harness.gaussian_scale(args64, SpectralKind(case.kind)), case.dtype, "out")


@pytest.mark.parametrize("backend,case", _params("gaussian_trajectory"))
def test_gaussian_trajectory(backend, case):
    args, args64 = _inputs("gaussian_trajectory", case)
    out = harness.kernel(backend, "gaussian_trajectory")(*args)
    T, B = args[5].shape
    assert out.dtype == case.dtype and out.shape == (T, B, case.D), f"{out.dtype} {tuple(out.shape)}"
    truth = reference.gaussian_trajectory(*args64)
    # step t is the flow from sigmas[0] to sigmas[t]: the scale of that map, all steps as rows
    x, mean, basis, eigvals, residual_var, sigmas = args64
    rows = lambda v: v.expand(T, *v.shape).reshape(T * B, *v.shape[1:])
    one = torch.ones(T * B, dtype=torch.float64)
    map_args = (rows(x), mean, basis, eigvals, residual_var, rows(sigmas[0]), sigmas.reshape(-1), one, one, SpectralKind.FLOW)
    scale = harness.gaussian_scale(map_args, SpectralKind.FLOW)
    harness.check_rows(out.reshape(T * B, -1), truth.reshape(T * B, -1), scale, case.dtype, "steps as rows (t * B + b)")


@pytest.mark.parametrize("backend,case", _params("mixture_posterior"))
def test_mixture_posterior(backend, case):
    args, args64 = _inputs("mixture_posterior", case)
    run = harness.kernel(backend, "mixture_posterior")
    if case.extra.get("split"):  # the scale-out paths' merge of per-part launches
        run = harness.split_kernel(run, case.K, case.extra["split"])
    # the two paths the public ops take: denoised (mixture_denoise / score) and weights
    den, logp1, w_empty = run(*args, True, False)
    den_empty, logp2, weights = run(*args, False, True)
    harness.check_mixture(den, logp1, w_empty, den_empty, logp2, weights, args, args64, case.dtype, case.id,
                          weights_tv=case.extra.get("weights_tv"))


@pytest.mark.parametrize("backend,case", _params("mixture_score"))
def test_mixture_score(backend, case, tmp_path):
    """The public gk.mixture_score (ops.stable_score on top of each backend's kernels) at small
    sigma against the float64 sum_k w_k s_k, with the Gaussian score's tolerance (harness.check_score);
    extra["source"] = "file": the points streamed from a .npy file in blocks of 8."""
    args, _ = _inputs("mixture_score", case)
    x, means, bases, eigvals, residual_var, log_weights, sigma = args
    if case.extra.get("source") == "file":
        np.save(tmp_path / "points.npy", means.cpu().numpy())
        m = gk.GaussianMixture.from_points(str(tmp_path / "points.npy"), block_bytes=2 * 8 * case.D * 4)
        model64 = (means, bases, eigvals, residual_var, log_weights)
    else:
        m = gk.GaussianMixture(means, bases, eigvals, residual_var, log_weights)
        model64 = (m.means, m.bases, m.eigvals, m.residual_var, m.log_weights)  # as the constructor kept them
    out = gk.mixture_score(x, sigma, m, backend=backend)
    _, weights = gk.mixture_denoise(x, sigma, m, return_weights=True, backend=backend)
    harness.check_score(out, weights, harness.as_f64([x, *model64, sigma]), case.dtype, case.id)


def _local_kernel(backend):
    return harness.kernel(backend, "local_posterior")


@pytest.mark.parametrize("backend,case", _params("local_posterior"))
def test_local_posterior(backend, case):
    args, args64 = _inputs("local_posterior", case)
    out = _local_kernel(backend)(*args)
    truth = reference.local_posterior(*args64)
    harness.check_local(out, truth, args64, case.dtype, case.id)


@pytest.mark.parametrize("backend,case", [pytest.param(b, c, id=f"{b}-{c.id}") for b in harness.backends()
                                          for c in local_identity_cases()])
def test_local_identity(backend, case):
    """LS, zeros, P >= 2 max(H, W) - 1: the delta-mixture denoiser of the flattened images (the
    mixture reference, independent of the local one); BBELS P = 1: ELS P = 1 (the reference of
    ELS as the truth, and the backend's own ELS within the same bound)."""
    args, args64 = _inputs("local_posterior", case)
    run = _local_kernel(backend)
    out = run(*args)
    x, images, sigma, P, mode, padding, kind = args64
    if case.extra["identity"] == "delta":
        B, N = x.shape[0], images.shape[0]
        flat = images.reshape(N, -1)
        den, _, _ = reference.mixture_posterior(x.reshape(B, -1), flat, flat.new_zeros((N, flat.shape[1], 0)),
                                                flat.new_zeros((N, 0)), flat.new_zeros(N),
                                                flat.new_full((N,), -math.log(N)), sigma, True, False)
        harness.check_local(out, den.reshape(x.shape), args64, case.dtype, case.id + " vs the delta mixture")
    else:
        els = list(args)
        els[4] = int(LocalMode.ELS)
        els64 = (*args64[:4], int(LocalMode.ELS), *args64[5:])
        truth = reference.local_posterior(*els64)
        harness.check_local(out, truth, els64, case.dtype, case.id + " vs ELS P 1 (reference)")
        harness.check_local(run(*els), truth, els64, case.dtype, case.id + ": ELS P 1 (this backend)")
