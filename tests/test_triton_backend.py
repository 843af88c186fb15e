"""The Triton backend's internals (gsa_kernels/triton): the split-K merge of partial softmax
states, the dot-precision opt-in, registration (torch.compile, opcheck, fake CUDA tracing) and
compilation for sm_80 / sm_90. The kernels' results against the reference, case by case, are the
conformance suite's (tests/conformance).

Triton decides between compiled and interpreted kernels when a kernel is decorated, so
TRITON_INTERPRET=1 must be set before gsa_kernels.triton's kernel modules are imported -- and
setting it inside a shared pytest process would also make the triton backend accept CPU tensors
in every other test module. So, unless TRITON_INTERPRET=1 is already set, this module runs
itself in a fresh subprocess with TRITON_INTERPRET=1 (test_interpreter_suite) and the kernel
tests below only run inside that subprocess (or when CI sets the variable globally).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import reference
from tests._helpers import HAS_TRITON, INTERPRET, orthonormal, rerun_under_interpreter

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
in_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess started by test_interpreter_suite")
REPO = Path(__file__).resolve().parents[1]


def test_interpreter_suite():
    """Run this module's kernel tests in a subprocess with TRITON_INTERPRET=1."""
    print(rerun_under_interpreter(__file__))


# ----------------------------------------------------------------------------- data


def gaussian_model(D, r, residual_var, seed=0):
    """A float32 model (float32-representable values: the float64 reference sees the same)."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(D, dtype=torch.float64, generator=gen)
    eigvals = torch.rand(r, dtype=torch.float64, generator=gen) * 4 + 0.01
    return gk.GaussianModel(mean.float(), orthonormal(D, r, gen).float(), eigvals.float(), residual_var)


def mixture_model(K, D, r, residual_var=None, seed=0):
    """residual_var None: random per component; a float: that value for all (0 with r = 0 is
    the empirical delta mixture)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, dtype=torch.float64, generator=gen)
    bases = torch.stack([orthonormal(D, r, gen) for _ in range(K)]) if r else torch.zeros(K, D, 0, dtype=torch.float64)
    eigvals = torch.rand(K, r, dtype=torch.float64, generator=gen) * 4 + 0.01
    if residual_var is None:
        residual_var = torch.rand(K, dtype=torch.float64, generator=gen) * 0.5
    else:
        residual_var = torch.full((K,), float(residual_var), dtype=torch.float64)
    log_weights = torch.log_softmax(torch.randn(K, dtype=torch.float64, generator=gen), 0)
    return gk.GaussianMixture(means.float(), bases.float(), eigvals.float(), residual_var.float(), log_weights.float())


def as64(model):
    return model.to("cpu", torch.float64)


def per_sample_sigma(B, low=0.05, high=3.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(B, dtype=torch.float64, generator=gen)).float()


# Tolerances, relative to the largest reference entry (max-norm): float32 kernels accumulate
# D products in float32 (error ~ sqrt(D) eps32 ~ 1e-6 at these D); float16's 2^-11 bounds the
# tf32x3 opt-in (three TF32 products: ~float32 accuracy, checked loosely).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def assert_close_maxnorm(out, ref, dtype, what=""):
    ref = ref.double()
    scale = max(1.0, ref.abs().max().item())
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"


# ----------------------------------------------------------------------------- precision

@in_interpreter
def test_tf32_precision_opt_in(monkeypatch):
    """GSA_KERNELS_TRITON_PRECISION selects the dot precision; unknown values are an error."""
    g = gaussian_model(33, 17, 0.1)
    x = torch.randn(5, 33)
    monkeypatch.setenv("GSA_KERNELS_TRITON_PRECISION", "tf32x3")
    out = gk.gaussian_denoise(x, 0.5, g, backend="triton")
    ref = gk.gaussian_denoise(x.double(), 0.5, as64(g), backend="reference")
    assert_close_maxnorm(out, ref, torch.float16, "tf32x3")
    monkeypatch.setenv("GSA_KERNELS_TRITON_PRECISION", "fp8")
    with pytest.raises(ValueError, match="GSA_KERNELS_TRITON_PRECISION"):
        gk.gaussian_denoise(x, 0.5, g, backend="triton")


# ----------------------------------------------------------------------------- split-K


def _mixture_ref(x, sigma, m):
    s = sigma.double() if isinstance(sigma, torch.Tensor) else torch.full((x.shape[0],), float(sigma), dtype=torch.float64)
    m64 = as64(m)
    return reference.mixture_posterior(x.double().reshape(x.shape[0], -1), m64.means, m64.bases, m64.eigvals,
                                       m64.residual_var, m64.log_weights, s, True, True)


def _near_data(m, B, sigma, seed=0):
    """x = a component's point (mean plus an in-span draw) + sigma noise."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(0, m.num_components, (B,), generator=gen)
    x0 = m.means[k].double()
    if m.bases.shape[2]:
        z = torch.randn(B, m.bases.shape[2], 1, dtype=torch.float64, generator=gen)
        x0 = x0 + (m.bases[k].double() @ (z * m.eigvals[k].double().sqrt()[:, :, None]))[..., 0]
    return (x0 + sigma * torch.randn(B, m.dim, dtype=torch.float64, generator=gen)).float()


def tv(w, ref):
    return 0.5 * (w.double() - ref).abs().sum(1).max().item()


@in_interpreter
@pytest.mark.parametrize("r", [0, 3, 17])
def test_mixture_split_k_merge(r):
    """Partial (max, sum, weighted-sum) states over component splits merge exactly."""
    from gsa_kernels.triton import mixture as tm

    m = mixture_model(37, 33, r, 0.0 if r == 0 else None)
    x = _near_data(m, 5, 0.3)
    sigma = per_sample_sigma(5, 0.1, 1.0)
    args = (x, m.means, m.bases, m.eigvals, m.residual_var, m.log_weights, sigma, True, True)
    rden, rlogp, rw = _mixture_ref(x, sigma, m)
    for splits in (1, 2, 5, 37):
        den, logp, w = tm.mixture_posterior(*args, splits=splits)
        assert_close_maxnorm(den, rden, torch.float32, f"splits={splits}")
        assert tv(w, rw) <= 1e-5
        assert (logp.double() - rlogp).abs().max().item() <= 2e-6 * rlogp.abs().max().item()


# ----------------------------------------------------------------------------- registration


@in_interpreter
def test_torch_compile_fullgraph():
    g = gaussian_model(40, 5, 0.1)
    m = mixture_model(7, 40, 3)
    e = mixture_model(20, 40, 0, 0.0)
    s = torch.full((4,), 0.6)  # per-sample tensor sigma (and float sigmas below)

    def f(x):
        traj = gk.gaussian_trajectory(x, torch.tensor([3.0, 1.0]), g, backend="triton")
        return (gk.gaussian_denoise(x, s, g, backend="triton") + traj[1] + gk.mixture_denoise(x, s, m, backend="triton")
                + gk.mixture_denoise(x, 0.3, e, backend="triton") + gk.mixture_logp(x, s, m, backend="triton")[:, None]
                + gk.gaussian_flow(x, 2.0, 0.5, g, backend="triton"))

    x = torch.randn(4, 40)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


@in_interpreter
def test_opcheck():
    from torch.library import opcheck

    from gsa_kernels.triton._library import ops

    g = gaussian_model(20, 3, 0.2)
    m = mixture_model(4, 20, 2)
    x = torch.randn(5, 20)
    s = torch.full((5,), 0.5)
    opcheck(ops.gaussian_map, (x, g.mean, g.basis, g.eigvals, 0.2, s, s, s, s, 0))
    opcheck(ops.gaussian_trajectory, (x, g.mean, g.basis, g.eigvals, 0.2, torch.rand(3, 5) + 0.1))
    for need in ((True, True), (False, False)):
        opcheck(ops.mixture_posterior, (x, m.means, m.bases, m.eigvals, m.residual_var, m.log_weights, s, *need))
    images = torch.rand(3, 2, 4, 5)
    for mode, padding in ((0, 1), (1, 0), (2, 0)):
        opcheck(ops.local_posterior, (torch.rand(2, 2, 4, 5), images, torch.full((2,), 0.5), 3, mode, padding, mode % 2))


@in_interpreter
def test_local_patch_size_beyond_the_image():
    """Zeros padding: a window past 2 max(H, W) - 1 only adds zeros (runs as that size); circular
    padding wraps it for real, so its work is bounded by a clear error."""
    from gsa_kernels.triton._library import ops

    x, images, s = torch.rand(2, 1, 4, 5), torch.rand(3, 1, 4, 5), torch.ones(2)
    for mode in (0, 2):
        assert torch.equal(ops.local_posterior(x, images, s, 2**40 + 1, mode, 0, 1),
                           ops.local_posterior(x, images, s, 9, mode, 0, 1))
    with pytest.raises(ValueError, match="patch_size .* too large"):
        ops.local_posterior(x, images, s, 2**16 + 1, 1, 1, 0)


def test_triton_op_traces_with_fake_cuda_tensors():
    """The GPU registration (triton_op + wrap_triton; here, without TRITON_INTERPRET) runs its
    launchers under FakeTensorMode on CUDA-device fake tensors, as torch.compile does: no GPU needed."""
    if INTERPRET:
        pytest.skip("checks the compiled-kernel registration: needs TRITON_INTERPRET unset")
    if not torch.backends.cuda.is_built():
        pytest.skip("cannot run here: this torch is a CPU-only build (no CUDA device type, even fake)")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from gsa_kernels.triton._library import ops

    B, D, r, K = 7, 64, 8, 5

    def f(x, mean, basis, eig, s, sigmas, means, bases, meig, residual_var, log_weights):
        return (ops.gaussian_map(x, mean, basis, eig, 0.1, s, s, s, s, 2),
                ops.gaussian_trajectory(x, mean, basis, eig, 0.1, sigmas),
                ops.mixture_posterior(x, means, bases, meig, residual_var, log_weights, s, True, True),
                ops.mixture_posterior(x, means, bases[:, :, :0], meig[:, :0], residual_var, log_weights, s, True, False))

    with FakeTensorMode():
        def e(*shape, dtype=torch.float32):
            return torch.empty(shape, device="cuda", dtype=dtype)

        args = (e(B, D, dtype=torch.bfloat16), e(D), e(D, r), e(r), e(B), e(3, B), e(K, D), e(K, D, r), e(K, r), e(K), e(K))
        gm = make_fx(f, tracing_mode="fake")(*args)
    outs = [n for n in gm.graph.nodes if n.op == "call_function" and "gsa_kernels_triton" in str(n.target)]
    assert len(outs) == 4


def _gpu_compile(kernel, types, constexprs, arch):
    """Compile a kernel's first autotune config for an NVIDIA arch without a GPU (Triton's
    bundled ptxas). Returns the compiled kernel (its metadata has the shared memory size)."""
    import triton
    from triton.backends.compiler import GPUTarget

    cfg = kernel.configs[0] if hasattr(kernel, "configs") else None
    jit = kernel.fn if cfg is not None else kernel
    consts = dict(constexprs, **(cfg.kwargs if cfg is not None else {}))
    signature = {name: "constexpr" if name in consts else types[name] for name in jit.arg_names}
    src = triton.compiler.ASTSource(fn=jit, signature=signature, constexprs=consts)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if cfg is not None else {"num_warps": 8}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_ampere_and_hopper(arch):
    """The compiled (non-interpreted) kernels lower to sm_80 / sm_90 cubins: catches what the
    interpreter cannot (types, layouts, tl.dot shapes, shared memory per block)."""
    if INTERPRET:
        pytest.skip("compiles the GPU kernels: needs TRITON_INTERPRET unset")
    pytest.importorskip("triton.backends.nvidia")
    from gsa_kernels.triton import gaussian, mixture

    smem_limit = {80: 163 * 1024, 90: 227 * 1024}[arch]
    f32, f64 = "*fp32", "*fp64"
    # split3: the default 3xTF32 tensor-core dots (gsa_kernels/triton/_dot.py); ieee: the opt-out
    for x_t, c_t, precision in ((f32, f32, "split3"), (f32, f32, "ieee"), ("*bf16", f32, "tf32x3"), (f64, f64, "ieee")):
        types = dict(x_ptr=x_t, mean_ptr=c_t, basis_ptr=c_t, eigvals_ptr=c_t, residual_var_hi="fp32",
                     residual_var_lo="fp32", residual_vars_ptr=c_t, row_of_ptr="*i64", tile_comp_ptr="*i64",
                     sigma_from_ptr=c_t, scale_from_ptr=c_t, sigma_to_ptr=c_t, scale_to_ptr=c_t,
                     out_ptr=x_t, scratch_ptr=c_t, B="i32", D="i32", R="i32", T="i32", ROWS="i32")
        for registers in (True, False):  # map with r in registers; trajectory through the scratch
            for labeled in (False, True):  # one Gaussian; per-tile components (class labels)
                k = _gpu_compile(gaussian._spectral_map_kernel, types, dict(
                    KIND=2, HAS_SCALES=registers, HAS_BASIS=True, FULL_RANK=False, C_IN_REGISTERS=registers,
                    CF_IN_REGISTERS=registers, R_PAD=64 if registers else 16, PRECISION=precision,
                    LABELED=labeled, LABEL_TILE=64), arch)
                assert k.metadata.shared <= smem_limit
    types = dict(x_ptr=f32, means_ptr=f32, bases_ptr=f32, eigvals_ptr=f32, residual_var_ptr=f32, logw_ptr=f32,
                 sigma_ptr=f32, logits_ptr=f64, state_ptr=f64, acc_ptr=f32, scratch_ptr=f32, B="i32", D="i32", R="i32",
                 K="i32", K_PER_SPLIT="i32", S="i32")
    for precision in ("split3", "ieee"):  # split3: the default 3xTF32 dots; ieee: the opt-out
        common = dict(NEED_DENOISED=True, NEED_WEIGHTS=True, PRECISION=precision, LOG_2PI=mixture.LOG_2PI, BLOCK_B=mixture.BLOCK_B)
        for registers in (True, False):
            k = _gpu_compile(mixture._mixture_lowrank_kernel, types, dict(
                common, C_IN_REGISTERS=registers, R_PAD=32, FULL_RANK=False,
                EXACT_RESIDUAL_RATIO=mixture.EXACT_RESIDUAL_RATIO[torch.float32]), arch)
            assert k.metadata.shared <= smem_limit
        k = _gpu_compile(mixture._mixture_isotropic_kernel, types, dict(
            common, EXPAND=True, LOGIT_TOL=mixture.LOGIT_TOL[torch.float32], CUTOFF=mixture.CUTOFF,
            DOT_SPLIT_ERR=mixture.DOT_SPLIT_ERR[precision], DOT_ROUNDINGS_PER_D=mixture.DOT_ROUNDINGS_PER_D[precision]), arch)
        assert k.metadata.shared <= smem_limit
    types.update(weights_ptr=f32, denoised_ptr=f32, logp_ptr=f32)
    _gpu_compile(mixture._mixture_merge_kernel, types, dict(NEED_DENOISED=True, NEED_WEIGHTS=True, BLOCK_B=mixture.BLOCK_B, BLOCK_N=128), arch)


@pytest.mark.parametrize("arch", [80, 90])
def test_local_kernel_compiles_for_ampere_and_hopper(arch):
    """The local score machines' kernel (gsa_kernels/triton/local.py) lowers to sm_80 / sm_90 for
    every mode, padding and kind, and 16 / 32 / 64-bit x."""
    if INTERPRET:
        pytest.skip("compiles the GPU kernels: needs TRITON_INTERPRET unset")
    pytest.importorskip("triton.backends.nvidia")
    from gsa_kernels.triton import local

    # one compile per mode (each a few seconds): 16 / 32 / 64-bit x, both paddings, both kinds
    for x_t, c_t, mode, circular, score in (("*bf16", "*fp32", 0, True, False), ("*fp32", "*fp32", 1, False, True),
                                            ("*fp64", "*fp64", 2, False, False)):
        types = dict(x_ptr=x_t, img_ptr=c_t, sigma_ptr=c_t, out_ptr=x_t, N="i32", C="i32", H="i32", W="i32", P="i32",
                     U_TILES="i32")
        k = _gpu_compile(local._local_posterior_kernel, types, dict(
            MODE=mode, CIRCULAR=circular, SCORE=score, BLOCK_U=local.BLOCK_U,
            BLOCK_V=local.BLOCK_N if mode == 0 else local.BLOCK_V, BLOCK_K=local.BLOCK_K, C_PAD=4,
            BLOCK_SCAN=local.BLOCK_SCAN, OUT_F64=x_t == "*fp64"), arch)
        assert k.metadata.shared <= {80: 163 * 1024, 90: 227 * 1024}[arch]
