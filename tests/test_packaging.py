"""Builds bound to their torch: the pin and version label setup.py gives a build, and the
import-time warning of an extension that does not load (checked with a planted broken _C and a
build record of another torch, so no second torch is needed; GSA_KERNELS_OTHER_TORCH_PYTHON,
a python with another torch, runs the real case too)."""
import ast
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from gsa_kernels._core import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_helpers():
    """setup.py's constants and helpers, without running setup()."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    names = {"HERE", "TORCH_SUPPORTED", "DEPENDENCIES", "VERSION", "torch_variant", "bound_metadata"}
    body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.FunctionDef) and n.name in names)
            or (isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) in names)]
    ns = {"__file__": os.path.join(ROOT, "setup.py")}
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


def test_a_build_pins_its_torch_release_and_variant():
    from packaging.requirements import Requirement
    from packaging.version import Version

    s = setup_helpers()
    cuda = SimpleNamespace(version=SimpleNamespace(cuda="13.0", hip=None))
    cpu = SimpleNamespace(version=SimpleNamespace(cuda=None, hip=None))
    assert (s["torch_variant"](cuda), s["torch_variant"](cpu)) == ("cu130", "cpu")
    version, deps = s["bound_metadata"]("2.14.1+cu130", "cu130")
    assert version == s["VERSION"] + "+torch2.14.1.cu130" and Version(version).local == "torch2.14.1.cu130"
    torch_req = Requirement(deps[0])
    assert torch_req.name == "torch" and str(torch_req.specifier) == "==2.14.1"
    assert "2.14.1" in torch_req.specifier and "2.13.0" not in torch_req.specifier
    assert s["bound_metadata"]("2.13.0", "cpu")[0].endswith("+torch2.13.0.cpu")
    assert s["TORCH_SUPPORTED"].startswith("torch>=")  # what an sdist and scripts/install.sh use


def test_setup_py_reports_the_bound_version():
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    release = torch.__version__.split("+")[0]
    variant = setup_helpers()["torch_variant"](torch)
    assert out.stdout.strip().splitlines()[-1].endswith(f"+torch{release}.{variant}")
    assert "No CUDA runtime is found" not in out.stderr and "Deprecat" not in out.stderr


def test_mismatch_sentence():
    assert _extension.mismatch({"torch": torch.__version__}) is None
    text = _extension.mismatch({"torch": "2.13.0+cpu"}, "2.14.1+cu130")
    assert "built for torch 2.13.0+cpu" in text and "torch 2.14.1+cu130 is installed" in text


def test_an_extension_that_does_not_load_warns_once_naming_both_torches(tmp_path):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_core").mkdir()
    (pkg / "_core" / "__init__.py").write_text("")
    (pkg / "_core" / "_contract.py").write_text("OPS = []\n\ndef register(*args, **kwargs):\n    pass\n")  # the op registry, unused here
    shutil.copy(os.path.join(ROOT, "gsa_kernels", "_core", "_extension.py"), pkg / "_core" / "_extension.py")
    (pkg / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not an ELF file")  # there, but unloadable
    (pkg / "_C.so").write_bytes(b"not an ELF file")
    (pkg / "_build_info.json").write_text(json.dumps({"torch": "2.13.0+cpu", "variant": "cpu", "cuda": None}))
    code = ("import warnings; warnings.simplefilter('default')\n"
            "import fakepkg._core._extension as e, importlib; importlib.reload(e)\n"
            "print('LOADED', e.loaded)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert "LOADED False" in out.stdout, out.stderr
    assert f"built for torch 2.13.0+cpu, but torch {torch.__version__} is installed" in out.stderr
    assert "setup.py build_ext --inplace" in out.stderr
    assert out.stderr.count("RuntimeWarning") == 2  # once per import of the module (it was reloaded once)


@pytest.mark.skipif(not os.environ.get("GSA_KERNELS_OTHER_TORCH_PYTHON"),
                    reason="no second torch at hand (GSA_KERNELS_OTHER_TORCH_PYTHON=path/to/python with another torch)")
def test_the_extension_against_a_real_second_torch():
    other = os.environ["GSA_KERNELS_OTHER_TORCH_PYTHON"]
    out = subprocess.run([other, "-c", "import torch, gsa_kernels; print(torch.__version__)"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    other_version = out.stdout.strip().splitlines()[-1]
    if other_version == torch.__version__:
        pytest.skip("that python has this same torch")
    assert f"but torch {other_version} is installed" in out.stderr or "does not load" in out.stderr


@pytest.mark.skipif(not _extension.loaded, reason="needs the compiled extension")
def test_a_stale_build_without_an_emulated_op_is_reported_not_a_crash():
    """A build older than the sources that lacks only a cuda_emu_* op (the emulation is always
    built) used to fail the import in register_fake; it must load as 'older than the sources'."""
    code = ("import torch\n"
            "real = torch._C._dispatch_has_kernel\n"
            "torch._C._dispatch_has_kernel = lambda name: not name.endswith('cuda_emu_local_posterior') and real(name)\n"
            "import gsa_kernels as gk\n"
            "from gsa_kernels._core import _extension\n"
            "assert not _extension.loaded and 'cuda_emu_local_posterior' in _extension.error, _extension.error\n"
            "assert 'cpu' not in gk.available_backends()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
