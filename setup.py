"""Build the optional compiled extension gsa_kernels._C.

C++ CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) and the host-side SIMT emulation of the CUDA
kernels (csrc/emu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu) are added when the
installed torch is CUDA-enabled and nvcc is found; GSA_KERNELS_CUDA=0|1 forces that off/on.
Install with `pip install --no-build-isolation .` so the build uses the torch you have.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc` (/usr/local/bin here) and then cannot link
    -lcudart; resolve the real toolkit instead (the one that has lib64/libcudart.so)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for c in candidates:
        if os.path.exists(os.path.join(c, "bin", "nvcc")) and glob.glob(os.path.join(c, "lib*", "libcudart.so*")):
            return c
    return None


def _want_cuda(torch):
    flag = os.environ.get("GSA_KERNELS_CUDA")
    if flag == "0":
        return False
    have = torch.version.cuda is not None and _find_cuda_home() is not None
    if flag == "1" and not have:
        sys.exit("GSA_KERNELS_CUDA=1 but torch is not CUDA-enabled or no CUDA toolkit (nvcc + libcudart) was found")
    return have


NO_TORCH = """
gsa_kernels compiles its extension against the torch installed in your environment, and this
build cannot import torch: either torch is not installed, or pip is building in an isolated
environment (its default), which hides your torch. Install torch first, then build without
isolation:

    pip install torch "setuptools>=64,<81" wheel ninja
    pip install --no-build-isolation .        (or -e . , or git+<url>)

or run `bash scripts/install.sh` from a clone, which does both.
"""


def _extensions():
    try:
        import torch
    except ModuleNotFoundError:
        sys.exit(NO_TORCH)

    use_cuda = _want_cuda(torch)
    if use_cuda:
        os.environ["CUDA_HOME"] = _find_cuda_home()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # imported only now: cpp_extension reads CUDA_HOME at import time
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda pats: sorted(os.path.relpath(p, HERE) for pat in pats for p in glob.glob(os.path.join(HERE, pat)))
    sources = rel(["csrc/*.cpp", "csrc/cpu/*.cpp", "csrc/emu/*.cpp"])
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    # The baseline instruction set of the target (x86-64, aarch64), so that a build runs on every
    # CPU of its architecture; the CPU kernels' hot loops are compiled again for AVX2 and AVX-512
    # and chosen at run time (csrc/cpu/isa.h). No FMA contraction: every variant then computes
    # the same bits. No errno: sqrt vectorizes.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-DGSA_KERNELS_BUILD"]
    if os.environ.get("GSA_KERNELS_NATIVE", "0") == "1":
        cxx.append("-march=native")  # opt-in: the generic code for this machine only
    link = ["-fopenmp"]
    if os.environ.get("GSA_KERNELS_SANITIZE", "0") == "1":  # scripts/sanitize.sh: ASan + UBSan build
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", "-g"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1"] + san
        link += san
    extra = {"cxx": cxx}
    if use_cuda:
        sources += rel(["csrc/cuda/*.cu", "csrc/cuda/*.cpp"])
        extra["cxx"] = cxx + ["-DGSA_KERNELS_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-std=c++20", "-DGSA_KERNELS_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension("gsa_kernels._C", sources, include_dirs=include_dirs,
                            extra_compile_args=extra, extra_link_args=link)
    else:
        ext = CppExtension("gsa_kernels._C", sources, include_dirs=include_dirs,
                           extra_compile_args=extra, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if os.environ.get("GSA_KERNELS_PREBUILT") == "1":  # scripts/install.sh built _C in place already:
    ext_modules, cmdclass = [], {}  # pip install -e would compile it all again in a temporary folder
else:
    ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
