"""The CUDA backend's internals, on CPU tensors through the host SIMT emulation
(csrc/include/gsa/simt_emu.h, ops gsa_kernels::cuda_emu_*): the software float16 / bfloat16
conversions, dispatch to the emulation, clear errors, opcheck, the emulator's self-test (it
catches broken kernels), and the sm_80 / sm_90 device code of the built extension. The kernels'
results against the reference, case by case, are the conformance suite's (tests/conformance).
"""
import math
import os
import shutil
import subprocess

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels._core import _extension
from gsa_kernels._core._contract import SpectralKind, compute_dtype

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

requires_emulation = pytest.mark.skipif(
    not _extension.has_kernel("cuda_emu_gaussian_map", "CPU"),
    reason=f"extension without the emulated CUDA kernels ({_extension.error or 'cuda_emu ops not registered'})",
)


@pytest.fixture(autouse=True)
def _emulate(monkeypatch):
    monkeypatch.setenv("GSA_KERNELS_CUDA_EMULATE", "1")  # the backend reads it at call time


def _gaussian(D, r, residual_var, seed=0):
    """float32 model tensors: mean, an orthonormal basis, eigvals, and residual_var."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(D, generator=g, dtype=torch.float64).float()
    basis = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))[0].float().contiguous()
    eigvals = (torch.rand(r, generator=g, dtype=torch.float64) * 4 + 0.05).float()
    return mean, basis, eigvals, float(residual_var)


def _mixture(K, D, r, seed=0):
    """float32 mixture tensors: means, bases, eigvals, residual_var, log_weights."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    bases = torch.linalg.qr(torch.randn(K, D, r, generator=g, dtype=torch.float64))[0] if r else torch.zeros(K, D, 0, dtype=torch.float64)
    eigvals = torch.rand(K, r, generator=g, dtype=torch.float64) * 3 + 0.01
    residual_var = torch.rand(K, generator=g, dtype=torch.float64) * 0.5 + 0.01
    log_weights = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    return [t.float().contiguous() for t in (means, bases, eigvals, residual_var, log_weights)]


def _run_map(x, model, sigma_from, sigma_to, scale_from, scale_to, kind):
    cd = compute_dtype(x.dtype)
    mean, basis, eigvals, residual_var = model
    return torch.ops.gsa_kernels.cuda_emu_gaussian_map(
        x, mean.to(cd), basis.to(cd), eigvals.to(cd), residual_var, sigma_from.to(cd), sigma_to.to(cd),
        scale_from.to(cd), scale_to.to(cd), int(kind))


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
    out = _run_map(values, zero_model, inf, one, one, one, SpectralKind.FLOW)
    assert torch.equal(out.view(torch.int16), values.view(torch.int16))

    g = torch.Generator().manual_seed(0)
    mean32 = torch.randint(-(2**31), 2**31 - 1, (D * 256,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    mean32 = mean32[torch.isfinite(mean32)][: D * 200]
    ties = (values.float().flatten()[:D * 8].double() + values.float().flatten()[1:D * 8 + 1].double()) / 2  # midpoints
    mean32 = torch.cat([mean32, ties.float()[: D * 8]])[: D * 200]
    x = torch.zeros(2, D, dtype=dtype)
    for row in mean32.reshape(-1, D):
        model = (row, torch.zeros(D, 0), torch.zeros(0), 0.0)
        out = _run_map(x, model, torch.ones(2), torch.ones(2), torch.ones(2), torch.ones(2), SpectralKind.DENOISE)
        expected = row.to(dtype).expand(2, D)
        same = (out.view(torch.int16) == expected.view(torch.int16)) | (torch.isnan(out.float()) & torch.isnan(expected.float()))
        assert same.all(), (row[~same[0]], out[0][~same[0]], expected[0][~same[0]])



# ----------------------------------------------------------------------------------- dispatch


@requires_emulation
def test_public_api_dispatches_to_the_emulation():
    D = 61
    g = gk.GaussianModel(*_gaussian(D, 4, 0.1))
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
    mean, basis, eigvals, residual_var = _gaussian(8, 2, 0.0)
    x, s = torch.randn(3, 8), torch.ones(3)
    op = torch.ops.gsa_kernels.cuda_emu_gaussian_map
    with pytest.raises(TypeError, match="mean must be"):
        op(x, mean.double(), basis, eigvals, residual_var, s, s, s, s, 0)
    with pytest.raises(ValueError, match="basis must be"):
        op(x, mean, basis[:5], eigvals, residual_var, s, s, s, s, 0)
    with pytest.raises(ValueError, match="sigma_to must be"):
        op(x, mean, basis, eigvals, residual_var, s, s[:2], s, s, 0)
    with pytest.raises(ValueError, match="kind must be"):
        op(x, mean, basis, eigvals, residual_var, s, s, s, s, 3)
    with pytest.raises(TypeError, match="x must be"):
        op(x.int(), mean, basis, eigvals, residual_var, s, s, s, s, 0)
    big_r = 12288  # float32 coefficients of 48 KiB: over the low-rank kernel's shared-memory budget
    with pytest.raises(ValueError, match="too large"):
        torch.ops.gsa_kernels.cuda_emu_mixture_posterior(
            torch.randn(1, 8), torch.zeros(2, 8), torch.zeros(2, 8, big_r), torch.zeros(2, big_r), torch.zeros(2),
            torch.zeros(2), torch.ones(1), True, False)


@requires_emulation
def test_local_bad_arguments_raise_clear_errors():
    op = torch.ops.gsa_kernels.cuda_emu_local_posterior
    x, images, s = torch.rand(2, 1, 4, 5), torch.rand(3, 1, 4, 5), torch.ones(2)
    for bad, match in (((x, images, s, 4, 0, 0, 0), "patch_size"), ((x, images, s, 3, 3, 0, 0), "mode"),
                       ((x, images, s, 3, 2, 1, 0), "bbels"), ((x, images, s, 3, 0, 2, 0), "padding"),
                       ((x, images, s, 3, 0, 0, 2), "kind"), ((x, images[:, :, :3], s, 3, 0, 0, 0), "images"),
                       ((x, images, s[:1], 3, 0, 0, 0), "sigma"), ((x[0], images, s, 3, 0, 0, 0), "x must be")):
        with pytest.raises(ValueError, match=match):
            op(*bad)
    with pytest.raises(TypeError, match="images must be"):
        op(x, images.double(), s, 3, 0, 0, 0)
    # zeros padding: a window past 2 max(H, W) - 1 only adds zeros (runs as that size); circular
    # padding wraps it for real, so its work is bounded by a clear error
    for mode in (0, 1, 2):
        assert torch.equal(op(x, images, s, 2**40 + 1, mode, 0, 0), op(x, images, s, 9, mode, 0, 0))
    with pytest.raises(ValueError, match="patch_size .* too large"):
        op(x, images, s, 2**16 + 1, 1, 1, 0)


@requires_emulation
def test_opcheck_emulated_ops():
    mean, basis, eigvals, residual_var = _gaussian(33, 3, 0.1)
    x, s = torch.randn(4, 33), torch.rand(4) + 0.1
    torch.library.opcheck(torch.ops.gsa_kernels.cuda_emu_gaussian_map.default, (x, mean, basis, eigvals, residual_var, s, s, s, s, 2))
    sig = torch.stack([s + 1, s])  # finite: a start at inf makes out[0] NaN, which never compares equal
    torch.library.opcheck(torch.ops.gsa_kernels.cuda_emu_gaussian_trajectory.default, (x, mean, basis, eigvals, residual_var, sig))
    for r in (0, 2):
        mix = _mixture(5, 33, r)
        for need in ((True, True), (False, False)):
            torch.library.opcheck(torch.ops.gsa_kernels.cuda_emu_mixture_posterior.default, (x, *mix, s, *need))
    images = torch.rand(3, 2, 4, 5)
    for mode, padding in ((0, 1), (1, 0), (2, 0)):
        torch.library.opcheck(torch.ops.gsa_kernels.cuda_emu_local_posterior.default,
                              (torch.rand(2, 2, 4, 5), images, torch.full((2,), 0.5), 3, mode, padding, mode % 2))


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


def _find_nvcc():
    """nvcc from the CUDA toolkit or PATH; None if absent."""
    candidates = [os.path.join(home, "bin", "nvcc") for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if home]
    candidates.append(shutil.which("nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _tf32_mma_per_kernel(source, arch, tmp_path):
    """{mangled kernel name: number of 3xTF32 mma.sync} in the PTX of csrc/cuda/<source> for arch
    (nvcc only, no CUDA-enabled build needed); skips without nvcc."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) to compile the kernels")
    ptx = tmp_path / (source + ".ptx")
    build = subprocess.run(
        [nvcc, "-ptx", f"-arch={arch}", "-O3", "-std=c++20", "-DGSA_KERNELS_WITH_CUDA", "--expt-relaxed-constexpr",
         "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc", "cuda"),
         os.path.join(ROOT, "csrc", "cuda", source), "-o", str(ptx)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    mma = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"
    return {entry.split("(", 1)[0].strip(): entry.count(mma) for entry in ptx.read_text().split(".entry ")[1:]}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_spectral_map_kernels_run_on_tensor_cores(arch, tmp_path):
    """Every float-compute instantiation of the project / apply kernels (float16, bfloat16,
    float32 x) holds the 3xTF32 mma.sync of tensor_core.cuh, 3 per 8-wide k step of a 32-wide
    tile; the float64 ones none (exact scalar FMA work)."""
    counts = _tf32_mma_per_kernel("gaussian_launch.cu", arch, tmp_path)
    for kernel in ("gaussian_project_kernel", "gaussian_apply_kernel"):
        for inputs in ("INS_3f16Ef", "INS_4bf16Ef", "Iff", "Idd"):
            name = next((n for n in counts if kernel + inputs + "EE" in n), None)
            assert name is not None, (kernel, inputs, sorted(counts))
            assert counts[name] == (0 if inputs == "Idd" else 3 * 4), (name, counts[name])


def test_mixture_kernels_run_on_tensor_cores(tmp_path):
    """Every float32 / float16 / bfloat16 instantiation of the r = 0 and r > 0 mixture kernels
    holds the 3xTF32 mma.sync tiles of tensor_core.cuh (the emulation runs their scalar twin, so
    only this sees a fallback to scalar code), the float64 ones none (exact FMA products)."""
    mma = _tf32_mma_per_kernel("mixture_launch.cu", "sm_80", tmp_path)
    for kernel in ("mixture_delta_kernel", "mixture_lowrank_kernel"):
        for tag, split in (("INS_3f16EfE", True), ("INS_4bf16EfE", True), ("IffE", True), ("IddE", False)):
            name = next((n for n in mma if kernel in n and tag in n), None)
            assert name is not None, f"{kernel} ({tag}) not in the PTX: {sorted(mma)}"
            assert (mma[name] > 0) == split, f"{name}: {mma[name]} tf32 mma.sync"
