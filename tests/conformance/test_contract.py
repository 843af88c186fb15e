"""The kernel contract (gsa_kernels/_contract.py) is the one every implementation declares: op
names and argument order of the compiled schemas, the Triton entry points, the reference and
the fakes; SpectralKind as in spectral.h; the layers import one way."""
import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

from gsa_kernels import _backends, _contract, _extension, reference

REPO = Path(__file__).resolve().parents[2]


def _params(fn):
    return tuple(inspect.signature(fn).parameters)


@pytest.mark.parametrize("op", _contract.OPS)
def test_python_implementations_take_the_contract_order(op):
    import gsa_kernels.triton as triton_backend  # the entry points only: no kernel is imported

    assert _params(getattr(reference, op)) == _contract.ARGUMENTS[op]
    assert _params(getattr(triton_backend, op)) == _contract.ARGUMENTS[op]
    # the fakes serve the CPU ops too, which take the model's prepared layouts last
    assert _params(_contract.FAKES[op]) == _contract.ARGUMENTS[op] + _contract.LAYOUT_ARGUMENTS[op]


@pytest.mark.skipif(not _extension.loaded, reason=f"compiled extension not loaded: {_extension.error}")
@pytest.mark.parametrize("op", _contract.OPS)
@pytest.mark.parametrize("prefix", ["", "cuda_emu_"])
def test_compiled_schemas_take_the_contract_order(op, prefix):
    schema = getattr(torch.ops.gsa_kernels, prefix + op).default._schema
    layouts = _contract.LAYOUT_ARGUMENTS[op] if prefix == "" else ()
    assert tuple(a.name for a in schema.arguments) == _contract.ARGUMENTS[op] + layouts
    assert all(a.default_value is None for a in schema.arguments[len(_contract.ARGUMENTS[op]):])


def test_spectral_kind_matches_the_header():
    header = (REPO / "csrc/include/gsa/spectral.h").read_text()
    values = dict(re.findall(r"k(Denoise|Score|Flow) = (\d)", header))
    assert {k.name: int(k) for k in _contract.SpectralKind} == {n.upper(): int(v) for n, v in values.items()}


def test_compute_dtype_rule():
    cd = _contract.compute_dtype
    assert cd(torch.float64) == torch.float64
    assert cd(torch.float32) == cd(torch.float16) == cd(torch.bfloat16) == torch.float32


def test_every_usable_backend_serves_every_op():
    for name, b in _backends.BACKENDS.items():
        if not b.status()[0]:
            continue
        device = next((d for d in ("cpu", "cuda") if _backends.accepts(b, d)[0]), None)
        if device is None:
            continue
        for op in _contract.OPS:
            assert callable(b.kernel(op, device)), (name, op)


def test_auto_never_picks_an_interpreted_or_emulated_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GSA_KERNELS_CUDA_EMULATE", "1")
    assert _backends._resolve_name("auto", "cpu") in ("cpu", "reference")


def _imports(module_path):
    tree = ast.parse(Path(module_path).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_layers_import_one_way():
    """models -> ops -> contract -> backends: the public ops never import the models (no cycle),
    the contract imports nothing of the package."""
    assert not {"models", "gsa_kernels.models"} & _imports(REPO / "gsa_kernels/ops.py")
    assert not any(n.startswith(("gsa_kernels", ".")) or n in ("ops", "models", "_backends") for n in _imports(REPO / "gsa_kernels/_contract.py"))
