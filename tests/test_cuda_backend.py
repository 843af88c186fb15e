"""The CUDA kernels (csrc/cuda) against the float64 reference, run on CPU tensors through the
host SIMT emulation (csrc/include/gsa/simt_emu.h, ops gsa_kernels::cuda_emu_*), plus checks
that the emulation itself catches broken kernels and that the built extension carries sm_80 and
sm_90 device code.

Inputs are float32-representable (or exact float16 / bfloat16 values) and the reference runs in
float64 on those same values, so the error measured is the kernels' own. Errors are relative to
the largest reference value of the output (outputs span orders of magnitude across sigma).
Shapes straddle the kernels' tiles: 32 x 32 output tiles (B, D, r = 31 / 33), 8-row and
32-component chunks of the mixture kernels (B = 9, K = 31 / 33 / 65), and sizes at which the
kernels split work over blocks (the emulation pretends a GPU of 4 multiprocessors): the
projection splits D (D = 300: 2 slices, D = 520: 4, the last one partial) and the mixtures split
the components (K = 300: 2 slices, K = 520: 4; low-rank K = 2..5 over 2..4 slices, one empty),
whose partial softmax states the merge kernel combines.
"""
import math
import os
import shutil
import subprocess

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import _extension, reference

KIND_DENOISE, KIND_SCORE, KIND_FLOW = 0, 1, 2
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

requires_emulation = pytest.mark.skipif(
    not _extension.has_kernel("cuda_emu_gaussian_map", "CPU"),
    reason=f"extension without the emulated CUDA kernels ({_extension.error or 'cuda_emu ops not registered'})",
)

# Relative error bounds per input dtype (outputs are stored in x's dtype):
#   float64: double accumulation, error ~ D * 1e-16, except that the low-rank mixture logits
#            form |P_perp y|^2 as |y|^2 - |c|^2 (the reference sums it directly), which loses
#            ~ eps |y|^2 / (lam_perp + sigma^2) in a logit: ~5e-10 at sigma = 0.1;
#   float32: float accumulation over D <= 520 terms, plus cancellation: the score map at
#            sigma = 0.002 (terms of size |y| / sigma^2 cancel to the result) and the mixture
#            denoiser at sigma = 80 (an average of ~40 means of size 1 that is ~0.2): 2e-5 seen;
#   float16: the output rounding alone is 2^-11 = 4.9e-4 of an element;
#   bfloat16: output rounding 2^-8 = 3.9e-3.
TOL = {torch.float64: 2e-9, torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _emulate(monkeypatch):
    monkeypatch.setenv("GSA_KERNELS_CUDA_EMULATE", "1")  # the backend reads it at call time


def _cd(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _representable(t, dtype):
    """t rounded to dtype (the kernel's input), returned as float64 (the reference's input)."""
    return t.to(dtype).double()


def _close(out, ref, dtype, what):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    scale = ref.abs().max().item() or 1.0
    err = (out.double() - ref).abs().max().item() / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g}"


def _gaussian(D, r, residual_var, seed=0):
    """Float64 model tensors that are exactly float32-representable."""
    g = torch.Generator().manual_seed(seed)
    mean = _representable(torch.randn(D, generator=g, dtype=torch.float64), torch.float32)
    if r == D:
        # a signed permutation: exactly orthonormal. (A rounded QR basis is orthonormal to ~1e-7
        # only; with r == D the kernels use the exact full-rank form while the reference sees
        # residual directions of size 1e-7 |y|, amplified by 1 / sigma^2 in scores.)
        basis = torch.eye(D, dtype=torch.float64)[torch.randperm(D, generator=g)] * (torch.randint(0, 2, (D,), generator=g) * 2 - 1)
    else:
        basis = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))[0]
    basis = _representable(basis, torch.float32).contiguous()  # QR returns column-major
    eigvals = _representable(torch.rand(r, generator=g, dtype=torch.float64) * 4 + 0.05, torch.float32)
    return mean, basis, eigvals, float(residual_var)


def _sigmas(B, lo=0.002, hi=80.0):
    """Per-sample sigma covering [lo, hi] (both ends when B > 1), float32-representable."""
    s = torch.logspace(math.log10(lo), math.log10(hi), B, dtype=torch.float64) if B > 1 else torch.tensor([lo], dtype=torch.float64)
    return _representable(s, torch.float32)


def _run_map(x, model, sa, sb, ka, kb, kind):
    cd = _cd(x.dtype)
    mean, basis, eigvals, rv = model
    return torch.ops.gsa_kernels.cuda_emu_gaussian_map(
        x, mean.to(cd), basis.to(cd), eigvals.to(cd), rv, sa.to(cd), sb.to(cd), ka.to(cd), kb.to(cd), kind
    )


def _ref_map(x, model, sa, sb, ka, kb, kind):
    mean, basis, eigvals, rv = model
    x = x.double()
    if kind == KIND_DENOISE:
        return reference.gaussian_denoise(x, sa, mean, basis, eigvals, rv)
    if kind == KIND_SCORE:
        return reference.gaussian_score(x, sa, mean, basis, eigvals, rv)
    return reference.gaussian_flow(x, sa, sb, mean, basis, eigvals, rv, ka, kb)


def _map_case(B, D, r, rv, kind, from_noise, dtype, scalar_sigma=None, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    model = _gaussian(D, r, rv, seed)
    x = (torch.randn(B, D, generator=g, dtype=torch.float64) * 3).to(dtype)
    sa = torch.full((B,), scalar_sigma, dtype=torch.float64) if scalar_sigma else _sigmas(B)
    sb = _representable(sa.flip(0) * 0.5, torch.float32)  # includes 0.001 .. 40, crossing sa
    ka = _representable(torch.rand(B, generator=g, dtype=torch.float64) + 0.5, torch.float32)
    kb = _representable(torch.rand(B, generator=g, dtype=torch.float64) + 0.5, torch.float32)
    if from_noise:
        sa = torch.full((B,), math.inf, dtype=torch.float64)
    out = _run_map(x, model, sa, sb, ka, kb, kind)
    ref = _ref_map(x, model, sa, sb, ka, kb, kind)
    assert out.dtype == dtype
    return out, ref


# (B, D, r, residual_var): odd D, tile edges (31 / 33 rows, dims, ranks), r = 0 / 1 / D, split D
MAP_SHAPES = [
    (1, 61, 0, 0.3),
    (7, 61, 1, 0.0),
    (33, 61, 61, 0.0),
    (31, 33, 33, 0.2),
    (33, 31, 7, 0.5),
    (5, 300, 33, 0.1),
    (3, 520, 31, 0.0),
]
MAP_KINDS = [(KIND_DENOISE, False), (KIND_SCORE, False), (KIND_FLOW, False), (KIND_FLOW, True)]
KIND_IDS = ["denoise", "score", "flow", "flow_from_noise"]


@requires_emulation
@pytest.mark.parametrize("kind,from_noise", MAP_KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("B,D,r,rv", MAP_SHAPES, ids=[f"B{b}-D{d}-r{r}" for b, d, r, _ in MAP_SHAPES])
def test_gaussian_map_per_sample_sigma(B, D, r, rv, kind, from_noise):
    out, ref = _map_case(B, D, r, rv, kind, from_noise, torch.float32)
    _close(out, ref, torch.float32, "gaussian_map")


@requires_emulation
@pytest.mark.parametrize("sigma", [0.002, 80.0])
@pytest.mark.parametrize("kind,from_noise", MAP_KINDS, ids=KIND_IDS)
def test_gaussian_map_scalar_sigma(kind, from_noise, sigma):
    out, ref = _map_case(9, 61, 5, 0.0, kind, from_noise, torch.float32, scalar_sigma=sigma)
    _close(out, ref, torch.float32, "gaussian_map")


@requires_emulation
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind,from_noise", MAP_KINDS, ids=KIND_IDS)
def test_gaussian_map_dtypes(kind, from_noise, dtype):
    out, ref = _map_case(33, 61, 5, 0.2, kind, from_noise, dtype)
    _close(out, ref, dtype, f"gaussian_map {dtype}")


@requires_emulation
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("from_noise", [False, True], ids=["finite_start", "from_noise"])
@pytest.mark.parametrize("B,D,r", [(3, 61, 4), (33, 40, 40)])
def test_trajectory(B, D, r, from_noise, dtype):
    model = _gaussian(D, r, 0.1)
    x = torch.randn(B, D, dtype=torch.float64).to(dtype)
    start = torch.full((1, B), math.inf, dtype=torch.float64) if from_noise else _sigmas(B, 1.0, 80.0)[None]
    rest = torch.stack([_sigmas(B) * f for f in (0.5, 0.05)] + [torch.zeros(B, dtype=torch.float64)])
    sigmas = torch.cat([start, _representable(rest, torch.float32)])
    cd = _cd(dtype)
    mean, basis, eigvals, rv = model
    out = torch.ops.gsa_kernels.cuda_emu_gaussian_trajectory(x, mean.to(cd), basis.to(cd), eigvals.to(cd), rv, sigmas.to(cd))
    ref = reference.gaussian_trajectory(x.double(), sigmas, mean, basis, eigvals, rv)
    assert out.shape == (4, B, D)
    first = 1 if from_noise else 0  # "x carried from unit noise to sigma = inf" is undefined
    _close(out[first:], ref[first:], dtype, "gaussian_trajectory")


@requires_emulation
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_loads_and_stores_are_exact(dtype):
    """The software float16 / bfloat16 conversions (the emulatable twins of the CUDA intrinsics)
    against torch's: every finite 16-bit value loads and stores back unchanged (a flow from unit
    noise with r = 0, mean 0, residual_var 0 and sigma_to 1 is the identity), and float32 values
    of every exponent, ties included, round to nearest even like torch (a denoiser with r = 0
    and residual_var 0 returns the mean, stored in x's dtype)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = bits[torch.isfinite(bits.float()) & (bits.view(torch.int16) != -(2**15))]  # -0 + 0 = +0
    D = 64
    values = torch.cat([values, values[: (-values.numel()) % D]]).reshape(-1, D)
    B = values.shape[0]
    zero_model = (torch.zeros(D), torch.zeros(D, 0), torch.zeros(0), 0.0)
    inf, one = torch.full((B,), math.inf), torch.ones(B)
    out = _run_map(values, zero_model, inf, one, one, one, KIND_FLOW)
    assert torch.equal(out.view(torch.int16), values.view(torch.int16))

    g = torch.Generator().manual_seed(0)
    mean32 = torch.randint(-(2**31), 2**31 - 1, (D * 256,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    mean32 = mean32[torch.isfinite(mean32)][: D * 200]
    ties = (values.float().flatten()[:D * 8].double() + values.float().flatten()[1:D * 8 + 1].double()) / 2  # midpoints
    mean32 = torch.cat([mean32, ties.float()[: D * 8]])[: D * 200]
    x = torch.zeros(2, D, dtype=dtype)
    for row in mean32.reshape(-1, D):
        model = (row, torch.zeros(D, 0), torch.zeros(0), 0.0)
        out = _run_map(x, model, torch.ones(2), torch.ones(2), torch.ones(2), torch.ones(2), KIND_DENOISE)
        expected = row.to(dtype).expand(2, D)
        same = (out.view(torch.int16) == expected.view(torch.int16)) | (torch.isnan(out.float()) & torch.isnan(expected.float()))
        assert same.all(), (row[~same[0]], out[0][~same[0]], expected[0][~same[0]])


# ----------------------------------------------------------------------------------- mixtures


def _mixture(K, D, r, residual, seed=0):
    """Float32-representable float64 mixture; residual: "zero" (the empirical delta mixture when
    r = 0) or "positive"."""
    g = torch.Generator().manual_seed(seed)
    means = _representable(torch.randn(K, D, generator=g, dtype=torch.float64), torch.float32)
    if r:
        bases = torch.linalg.qr(torch.randn(K, D, r, generator=g, dtype=torch.float64))[0]
    else:
        bases = torch.zeros(K, D, 0, dtype=torch.float64)
    bases = _representable(bases, torch.float32).contiguous()
    eigvals = _representable(torch.rand(K, r, generator=g, dtype=torch.float64) * 3 + 0.01, torch.float32)
    rv = torch.zeros(K, dtype=torch.float64) if residual == "zero" else torch.rand(K, generator=g, dtype=torch.float64) * 0.5 + 0.01
    logw = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    return [_representable(t, torch.float32) for t in (means, bases, eigvals, rv, logw)]


def _run_mixture(x, mix, sigma, need_denoised=True, need_weights=True):
    cd = _cd(x.dtype)
    return torch.ops.gsa_kernels.cuda_emu_mixture_posterior(x, *[t.to(cd) for t in mix], sigma.to(cd), need_denoised, need_weights)


def _check_mixture(x, mix, sigma, dtype):
    den, logp, w = _run_mixture(x, mix, sigma)
    rden, rlogp, rw = reference.mixture_posterior(x.double(), sigma, *mix)
    assert den.dtype == dtype and logp.dtype == _cd(dtype) and w.dtype == _cd(dtype)
    _close(den, rden, dtype, "denoised")
    _close(w, rw, _cd(dtype), "weights")  # computed and stored in the compute dtype
    # logp is ~ -D log(sigma) large; its error relative to its own size
    _close(logp, rlogp, _cd(dtype), "logp")
    # the outputs not asked for are empty and the others unchanged
    den2, logp2, w2 = _run_mixture(x, mix, sigma, need_denoised=False, need_weights=False)
    assert den2.numel() == 0 and w2.numel() == 0
    torch.testing.assert_close(logp2, logp, rtol=0, atol=0)


# (B, K, D): 8-row blocks (B = 1, 9), 32-component chunks (K = 31, 33, 65), odd D, split K
DELTA_SHAPES = [(1, 31, 61), (9, 33, 61), (8, 65, 33), (3, 1, 31), (3, 300, 61), (1, 520, 33)]


@requires_emulation
@pytest.mark.parametrize("residual", ["zero", "positive"])
@pytest.mark.parametrize("B,K,D", DELTA_SHAPES, ids=[f"B{b}-K{k}-D{d}" for b, k, d in DELTA_SHAPES])
def test_mixture_rank0_per_sample_sigma(B, K, D, residual):
    mix = _mixture(K, D, 0, residual)
    x = torch.randn(B, D, dtype=torch.float64).float()
    _check_mixture(x, mix, _sigmas(B, 0.05, 80.0), torch.float32)


@requires_emulation
@pytest.mark.parametrize("sigma", [0.002, 80.0])
def test_mixture_rank0_scalar_sigma_extremes(sigma):
    # x near the training points so that several carry weight even at sigma = 0.002
    mix = _mixture(40, 61, 0, "zero")
    x = (mix[0][:6] + 0.002 * torch.randn(6, 61, dtype=torch.float64)).float()
    _check_mixture(x, mix, torch.full((6,), sigma, dtype=torch.float64), torch.float32)


@requires_emulation
def test_mixture_rank0_small_sigma_is_accurate():
    """Far from the origin, near-tied points: |x - mu|^2 expanded in float32 would move the
    logits by O(1) at sigma = 0.01 (DESIGN.md section 1); summed from differences it does not."""
    D, K = 61, 40
    g = torch.Generator().manual_seed(3)
    center = torch.randn(D, generator=g, dtype=torch.float64) * 30
    means = _representable(center + 0.01 * torch.randn(K, D, generator=g, dtype=torch.float64), torch.float32)
    x = _representable(center + 0.01 * torch.randn(4, D, generator=g, dtype=torch.float64), torch.float32)
    mix = [means, torch.zeros(K, D, 0, dtype=torch.float64), torch.zeros(K, 0, dtype=torch.float64),
           torch.zeros(K, dtype=torch.float64), torch.full((K,), -math.log(K), dtype=torch.float64)]
    sigma = torch.full((4,), 0.01, dtype=torch.float64)
    _, _, w = _run_mixture(x.float(), mix, sigma)
    _, _, rw = reference.mixture_posterior(x, sigma, *mix)
    assert rw.max() < 0.9  # several components matter
    tv = 0.5 * (w.double() - rw).abs().sum(1).max().item()
    assert tv < 1e-3, f"total variation {tv:.3g} from the float64 weights"


# (B, K, D, r): r = 1, a 32-column edge (33), r = D (full rank), an empty component slice
LOWRANK_SHAPES = [(2, 3, 61, 1), (3, 2, 61, 33), (2, 3, 33, 33), (1, 2, 40, 40), (2, 5, 33, 2)]


@requires_emulation
@pytest.mark.parametrize("residual", ["zero", "positive"])
@pytest.mark.parametrize("B,K,D,r", LOWRANK_SHAPES, ids=[f"B{b}-K{k}-D{d}-r{r}" for b, k, d, r in LOWRANK_SHAPES])
def test_mixture_lowrank(B, K, D, r, residual):
    mix = _mixture(K, D, r, residual)
    x = torch.randn(B, D, dtype=torch.float64).float()
    _check_mixture(x, mix, _sigmas(B, 0.05, 80.0), torch.float32)


@requires_emulation
@pytest.mark.parametrize("sigma", [0.002, 80.0])
def test_mixture_lowrank_scalar_sigma_extremes(sigma):
    mix = _mixture(3, 61, 5, "positive")
    x = (mix[0][[0, 1, 2, 0]] + 0.01 * torch.randn(4, 61, dtype=torch.float64)).float()
    _check_mixture(x, mix, torch.full((4,), sigma, dtype=torch.float64), torch.float32)


@requires_emulation
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("r", [0, 3])
def test_mixture_dtypes(r, dtype):
    mix = _mixture(33, 61, r, "positive")
    x = torch.randn(9, 61, dtype=torch.float64).to(dtype)
    _check_mixture(x, mix, _sigmas(9, 0.1, 80.0), dtype)


# ----------------------------------------------------------------------------------- dispatch


@requires_emulation
def test_public_api_dispatches_to_the_emulation():
    D = 61
    mean, basis, eigvals, rv = (t.float() if isinstance(t, torch.Tensor) else t for t in _gaussian(D, 4, 0.1))
    g = gk.GaussianModel(mean, basis, eigvals, rv)
    x = torch.randn(2, 1, D)  # [B, *shape]
    torch.testing.assert_close(gk.gaussian_denoise(x, 0.5, g, backend="cuda"), gk.gaussian_denoise(x, 0.5, g, backend="reference"))
    traj = gk.gaussian_trajectory(x, torch.tensor([10.0, 1.0, 0.0]), g, backend="cuda")
    torch.testing.assert_close(traj, gk.gaussian_trajectory(x, torch.tensor([10.0, 1.0, 0.0]), g, backend="reference"))
    m = gk.GaussianMixture.from_points(torch.randn(50, D))
    torch.testing.assert_close(gk.mixture_score(x, 0.3, m, backend="cuda"), gk.mixture_score(x, 0.3, m, backend="reference"), rtol=1e-4, atol=1e-4)


@requires_emulation
def test_emulation_needs_the_environment_variable(monkeypatch):
    monkeypatch.setenv("GSA_KERNELS_CUDA_EMULATE", "0")
    g = gk.GaussianModel(torch.zeros(4), torch.eye(4)[:, :2], torch.ones(2))
    with pytest.raises((RuntimeError, ValueError)):
        gk.gaussian_denoise(torch.zeros(1, 4), 1.0, g, backend="cuda")


@requires_emulation
def test_bad_arguments_raise_clear_errors():
    mean, basis, eigvals, rv = (t.float() if isinstance(t, torch.Tensor) else t for t in _gaussian(8, 2, 0.0))
    x, s = torch.randn(3, 8), torch.ones(3)
    op = torch.ops.gsa_kernels.cuda_emu_gaussian_map
    with pytest.raises(TypeError, match="mean must be"):
        op(x, mean.double(), basis, eigvals, rv, s, s, s, s, 0)
    with pytest.raises(ValueError, match="basis must be"):
        op(x, mean, basis[:5], eigvals, rv, s, s, s, s, 0)
    with pytest.raises(ValueError, match="sigma_to must be"):
        op(x, mean, basis, eigvals, rv, s, s[:2], s, s, 0)
    with pytest.raises(ValueError, match="kind must be"):
        op(x, mean, basis, eigvals, rv, s, s, s, s, 3)
    with pytest.raises(TypeError, match="x must be"):
        op(x.int(), mean, basis, eigvals, rv, s, s, s, s, 0)
    big_r = 12288  # float32 coefficients of 48 KiB: over the low-rank kernel's shared-memory budget
    with pytest.raises(ValueError, match="too large"):
        torch.ops.gsa_kernels.cuda_emu_mixture_posterior(
            torch.randn(1, 8), torch.zeros(2, 8), torch.zeros(2, 8, big_r), torch.zeros(2, big_r), torch.zeros(2),
            torch.zeros(2), torch.ones(1), True, False)


@requires_emulation
def test_opcheck_emulated_ops():
    mean, basis, eigvals, rv = (t.float() if isinstance(t, torch.Tensor) else t for t in _gaussian(33, 3, 0.1))
    x, s = torch.randn(4, 33), torch.rand(4) + 0.1
    torch.library.opcheck(torch.ops.gsa_kernels.cuda_emu_gaussian_map.default, (x, mean, basis, eigvals, rv, s, s, s, s, 2))
    sig = torch.stack([s + 1, s])  # finite: a start at inf makes out[0] NaN, which never compares equal
    torch.library.opcheck(torch.ops.gsa_kernels.cuda_emu_gaussian_trajectory.default, (x, mean, basis, eigvals, rv, sig))
    for r in (0, 2):
        mix = [t.float() for t in _mixture(5, 33, r, "positive")]
        for need in ((True, True), (False, False)):
            torch.library.opcheck(torch.ops.gsa_kernels.cuda_emu_mixture_posterior.default, (x, *mix, s, *need))


# ----------------------------------------------------------------------------------- emulation


def test_emulation_self_test(tmp_path):
    """Kernels that need __syncthreads() and warp shuffles give the right answer under the
    emulation, their broken twins give wrong answers, and hangs become errors."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the emulation self-test")
    exe = tmp_path / "selftest"
    build = subprocess.run(
        [cxx, "-std=c++20", "-O1", "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc", "cuda"),
         os.path.join(HERE, "cuda_emu_selftest.cpp"), "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    results = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    assert results == {
        "reverse_with_barrier": "correct",
        "reverse_without_barrier": "wrong",
        "tile_reuse_with_barrier": "correct",
        "tile_reuse_without_trailing_barrier": "wrong",
        "warp_and_block_sum": "correct",
        "warp_sum_wrong_offsets": "wrong",
        "divergent_barrier": "error: deadlock",
        "barriers_at_different_lines": "error: different __syncthreads",
    }, run.stdout


# ----------------------------------------------------------------------------------- nvcc output


def _fatbin_archs(data):
    """The sm_XY of every ELF (cubin) entry of the CUDA fat binaries embedded in a shared object.
    Fat binary container: magic 0xBA55ED50, u16 version, u16 header size, u64 payload size; then
    entries: u16 kind (1 PTX, 2 ELF), u16, u32 header size, u64 size, ..., u32 arch at byte 28."""
    archs, pos = set(), data.find(b"\x50\xed\x55\xba")
    while pos >= 0:
        header = int.from_bytes(data[pos + 6:pos + 8], "little")
        size = int.from_bytes(data[pos + 8:pos + 16], "little")
        entry, end = pos + header, pos + header + size
        while 0 < entry < end and entry + 32 <= len(data):
            kind = int.from_bytes(data[entry:entry + 2], "little")
            ehead = int.from_bytes(data[entry + 4:entry + 8], "little")
            esize = int.from_bytes(data[entry + 8:entry + 16], "little")
            if kind == 2:
                archs.add(int.from_bytes(data[entry + 28:entry + 32], "little"))
            if ehead == 0:
                break
            entry += ehead + esize
        pos = data.find(b"\x50\xed\x55\xba", max(end, pos + 1))
    return archs


def test_extension_has_sm80_and_sm90_code():
    if not _extension.loaded:
        pytest.skip(f"compiled extension not loaded: {_extension.error}")
    if not _extension.has_kernel("gaussian_map", "CUDA"):
        pytest.skip("extension built without CUDA (no CUDA-enabled torch or nvcc at build time, or GSA_KERNELS_CUDA=0)")
    so = gk._C.__file__
    with open(so, "rb") as f:
        data = f.read()
    for kernel in (b"gaussian_project_kernel", b"gaussian_apply_kernel", b"mixture_delta_kernel", b"mixture_lowrank_kernel",
                   b"mixture_merge_kernel"):
        assert kernel in data, f"{kernel!r} not registered in {so}"
    assert {80, 90} <= _fatbin_archs(data), f"cubins found for sm_{sorted(_fatbin_archs(data))} in {so}"
    cuobjdump = _find_cuobjdump()
    if cuobjdump:  # cross-check with NVIDIA's tool where it is installed: one cubin per .cu and arch
        listing = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
        for unit in ("gaussian_launch", "mixture_launch"):
            for arch in ("sm_80", "sm_90"):
                assert f"{unit}.{arch}.cubin" in listing, listing


def _find_cuobjdump():
    """cuobjdump from PATH, the CUDA toolkit, or the nvidia-cuda-cuobjdump wheel; None if absent."""
    import importlib.util

    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidates += [os.path.join(base, sub, "bin", "cuobjdump") for sub in ("cu13", "cu12", "cuda_cuobjdump")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)
