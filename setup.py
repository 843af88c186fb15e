"""Build the optional compiled extension gsa_kernels._C.

C++ CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) and the host-side SIMT emulation of the CUDA
kernels (csrc/emu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu) are added when the
installed torch is CUDA-enabled and nvcc is found; GSA_KERNELS_CUDA=0|1 forces that off/on.
Install with `pip install --no-build-isolation .` so the build uses the torch you have.

A build is bound to that torch (its C++ ABI): the wheel requires exactly that torch release
(Requires-Dist torch==X.Y.Z) and carries the variant in its version's local label
(0.1.0+torch2.14.1.cu130, ...+cpu); gsa_kernels/_build_info.json records it for the import-time
check (gsa_kernels/_core/_extension.py). An sdist keeps the supported range TORCH_SUPPORTED.
"""
import glob
import json
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# the torch range the sources support (scripts/install.sh reads this line); a built wheel pins one release
TORCH_SUPPORTED = "torch>=2.13"
DEPENDENCIES = ["numpy", "tqdm", "safetensors"]
VERSION = re.search(r'^__version__ = "([^"]+)"', open(os.path.join(HERE, "gsa_kernels", "__init__.py")).read(), re.M).group(1)


def torch_variant(torch):
    """'cu130' for a CUDA 13.0 torch, 'rocm6.2' for ROCm, 'cpu' for a CPU-only one."""
    if torch.version.cuda:
        return "cu" + torch.version.cuda.replace(".", "")
    if getattr(torch.version, "hip", None):
        return "rocm" + ".".join(torch.version.hip.split(".")[:2])
    return "cpu"


def bound_metadata(torch_version, variant):
    """(version, dependencies) of a build bound to torch `torch_version` (its local label dropped)."""
    release = torch_version.split("+")[0]
    return f"{VERSION}+torch{release}.{variant}", [f"torch=={release}"] + DEPENDENCIES


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

    pip install torch "setuptools>=77,<81" wheel ninja
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
    # cpp_extension warns "No CUDA runtime is found" on every machine without a GPU: expected when
    # building, and nothing to do with whether the CUDA kernels compile (that needs nvcc only)
    import logging

    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not record.getMessage().startswith("No CUDA runtime is found"))
    # imported only now: cpp_extension reads CUDA_HOME at import time
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda pats: sorted(os.path.relpath(p, HERE) for pat in pats for p in glob.glob(os.path.join(HERE, pat)))
    sources = rel(["csrc/*.cpp", "csrc/cpu/*.cpp", "csrc/emu/*.cpp"])
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    # The baseline instruction set of the target (x86-64, aarch64), so that a build runs on every
    # CPU of its architecture; the CPU kernels' hot loops are compiled again for AVX2 and AVX-512
    # and chosen at run time (csrc/cpu/isa.h). No FMA contraction: every variant then computes
    # the same bits. No errno: sqrt vectorizes. No -Wpsabi: it warns that the AVX-512 helpers' ABI
    # differs from the baseline's, which is intended (they are only called from AVX-512 code) and
    # reads like an error in an install log.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wno-psabi", "-DGSA_KERNELS_BUILD"]
    if os.environ.get("GSA_KERNELS_NATIVE", "0") == "1":
        cxx.append("-march=native")  # opt-in: the generic code for this machine only
    link = ["-fopenmp"]
    if os.environ.get("GSA_KERNELS_SANITIZE", "0") == "1":  # scripts/sanitize.sh: ASan + UBSan build
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", "-g"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1", "-DGSA_KERNELS_SANITIZE"] + san
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
    class BuildBound(BuildExtension.with_options(use_ninja=True)):
        """build_ext that also records the torch it built against, next to _C (in place or in the wheel)."""

        def run(self):
            super().run()
            info = {"torch": torch.__version__, "variant": torch_variant(torch), "cuda": torch.version.cuda}
            with open(os.path.join(os.path.dirname(self.get_ext_fullpath("gsa_kernels._C")), "_build_info.json"), "w") as f:
                json.dump(info, f)

    return [ext], {"build_ext": BuildBound}


if "sdist" in sys.argv:  # sources: not bound to any torch
    ext_modules, cmdclass, version, dependencies = [], {}, VERSION, [TORCH_SUPPORTED] + DEPENDENCIES
else:
    if os.environ.get("GSA_KERNELS_PREBUILT") == "1":  # scripts/install.sh built _C in place already:
        ext_modules, cmdclass = [], {}  # pip install -e would compile it all again in a temporary folder
    else:
        ext_modules, cmdclass = _extensions()
    try:
        import torch
    except ModuleNotFoundError:
        sys.exit(NO_TORCH)
    version, dependencies = bound_metadata(torch.__version__, torch_variant(torch))
setup(ext_modules=ext_modules, cmdclass=cmdclass, version=version, install_requires=dependencies)
