"""The kernel contract (gsa_kernels/_core/_contract.py) is the one every implementation declares: op
names and argument order of the compiled schemas, the Triton entry points, the reference and
the fakes; SpectralKind as in spectral.h; the layers import one way."""
import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

from gsa_kernels import reference
from gsa_kernels._core import _autograd, _backends, _contract, _extension

REPO = Path(__file__).resolve().parents[2]


def _params(fn):
    return tuple(inspect.signature(fn).parameters)


def _defined_params(path, name):
    """The parameter names of the top-level function `name` in a source file, read without
    importing it (the Triton kernel modules read TRITON_INTERPRET when imported)."""
    for node in ast.parse((REPO / path).read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return tuple(a.arg for a in node.args.args)
    raise AssertionError(f"{path} defines no function {name}")


@pytest.mark.parametrize("op", _contract.OPS)
def test_python_implementations_take_the_contract_order(op):
    args = _contract.ARGUMENTS[op]
    assert _params(getattr(reference, op)) == args
    # the Triton op is defined on this launcher with the registry's schema; it may take more
    # tuning parameters after the contract's (with defaults)
    assert _defined_params(_contract.REGISTRY[op].kernels["triton"], op)[:len(args)] == args
    # the fakes serve the CPU ops too, which take the model's prepared layouts last
    assert _params(_contract.FAKES[op]) == args + _contract.LAYOUT_ARGUMENTS[op]


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


# ----------------------------------------------------------------------------- the registry


def _cases_module():
    from tests.conformance import cases

    return cases


@pytest.mark.parametrize("op", _contract.OPS)
def test_every_registered_op_is_complete(op):
    """Each registry entry has a fake, an autograd rule, a reference function, kernels for every
    compiled backend, conformance cases, and a conformance test file that runs them."""
    entry = _contract.REGISTRY[op]
    assert callable(entry.fake) and callable(entry.backward_rule)
    assert callable(getattr(reference, op, None)), f"reference.{op} missing"
    assert set(entry.kernels) == {"cpu", "cuda", "triton"}
    for path in entry.kernels.values():
        assert (REPO / path).is_file(), path
    cases = _cases_module()
    assert len(getattr(cases, f"{op}_cases")()) > 0 and callable(getattr(cases, f"{op}_args"))
    assert f'"{op}"' in (REPO / entry.conformance).read_text() or f"{op}_cases" in (REPO / entry.conformance).read_text()
    # every argument with a gradient exists; every tensor without one is checked by the rule
    assert set(entry.grads) <= set(entry.arguments)
    assert set(entry.no_grad.values()).isdisjoint(entry.grads)
    # the autograd rule builds for a namespace where the op is registered
    if _extension.loaded:
        backward, setup = entry.backward_rule(lambda name: getattr(torch.ops.gsa_kernels, name), f"gsa_kernels::{op}",
                                         entry.no_grad, False)
        assert callable(backward) and callable(setup)


@pytest.mark.skipif(not _extension.loaded, reason="needs the compiled extension")
@pytest.mark.parametrize("op", ["gaussian_map", "mixture_posterior"])
def test_the_default_rule_is_the_closed_form_rule(op):
    """An entry without a rule gets the VJP of its reference (_autograd.reference_rule): defined
    as a test op on the same CPU kernel, its gradients are the registered closed-form ones."""
    entry = _contract.REGISTRY[op]
    qualname = f"gsa_test_default_rule::{op}"
    if not hasattr(getattr(torch.ops, "gsa_test_default_rule", None), op):
        lib = torch.library.Library("gsa_test_default_rule", "FRAGMENT")
        _LIBRARIES.append(lib)
        lib.define(op + entry.schema)
        lib.impl(op, getattr(torch.ops.gsa_kernels, op), "CPU")
        torch.library.register_fake(qualname)(entry.fake)
        backward, setup = _autograd.reference_rule(op)(None, qualname, entry.no_grad, False)
        torch.library.register_autograd(qualname, backward, setup_context=setup)
    g = torch.Generator().manual_seed(0)
    B, D, K, r = 5, 6, 3, 2
    f64 = dict(dtype=torch.float64)
    x = torch.randn(B, D, generator=g, **f64)
    if op == "gaussian_map":
        basis = torch.linalg.qr(torch.randn(D, r, generator=g, **f64)).Q.contiguous()
        rows = torch.rand(B, generator=g, **f64) + 0.3
        args = [x, torch.randn(D, generator=g, **f64), basis, torch.rand(r, generator=g, **f64) + 0.1, 0.4,
                rows, rows * 0.5, torch.ones(B, **f64), torch.ones(B, **f64), 2]
    else:
        bases = torch.linalg.qr(torch.randn(K, D, r, generator=g, **f64)).Q.contiguous()
        args = [x, torch.randn(K, D, generator=g, **f64), bases, torch.rand(K, r, generator=g, **f64) + 0.1,
                torch.rand(K, generator=g, **f64) + 0.1, torch.randn(K, generator=g, **f64),
                torch.rand(B, generator=g, **f64) + 0.5, True, True]
    wrt = [i for i, name in enumerate(entry.arguments) if name in entry.grads]

    def grads(ops):
        leaves = [a.clone().requires_grad_() if i in wrt else a for i, a in enumerate(args)]
        out = getattr(ops, op)(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o * torch.linspace(-1, 2, o.numel(), **f64).reshape(o.shape)).sum() for o in outs)
        return torch.autograd.grad(loss, [leaves[i] for i in wrt])

    for name, ours, closed in zip([entry.arguments[i] for i in wrt], grads(torch.ops.gsa_test_default_rule),
                                  grads(torch.ops.gsa_kernels)):
        torch.testing.assert_close(ours, closed, rtol=1e-9, atol=1e-9, msg=f"{op}: grad {name}")


_LIBRARIES = []  # the test namespace's library objects live as long as the module


def test_registered_gradients_match_the_compiled_autograd():
    """The registry's no-gradient arguments are the ones the registered rule refuses."""
    if not _extension.loaded:
        pytest.skip(f"compiled extension not loaded: {_extension.error}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=torch.float64)).Q.contiguous().requires_grad_()
    args = (x, torch.zeros(4, dtype=torch.float64), basis, torch.ones(2, dtype=torch.float64), 0.5,
            *[torch.ones(3, dtype=torch.float64)] * 4, 0)
    with pytest.raises(RuntimeError, match="basis requires grad"):
        torch.ops.gsa_kernels.gaussian_map(*args)


# ----------------------------------------------------------------------------- the import graph


def _package_modules():
    """{module name: path} of every module of gsa_kernels."""
    root = REPO / "gsa_kernels"
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(module, level, name, is_package):
    if level == 0:
        return name
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _package_imports(module, path, modules):
    """(module-level imports, function-local imports) of package modules by `module`: sets of
    module names. `from . import x` counts as importing the module x."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    top, local = set(), set()

    def targets(node):
        if isinstance(node, ast.Import):
            return {a.name for a in node.names}
        base = _resolve(module, node.level, node.module or "", is_package)
        names = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" != "gsa_kernels._C"}  # compiled
        return {n if n in modules else base for n in names}

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = {t for t in targets(child) if t in modules and t != module}
                (local if in_function else top).update(found)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, local


# Function-local imports of package modules, each with its reason; every other import is at
# module level, so the graph below is the whole dependency structure.
LAZY_IMPORTS = {
    # PEP 562: `python -m gsa_kernels --help` parses before torch and the API load
    ("gsa_kernels", "gsa_kernels._core._extension"), ("gsa_kernels", "gsa_kernels.distributed"),
    ("gsa_kernels", "gsa_kernels.models"), ("gsa_kernels", "gsa_kernels.ops"), ("gsa_kernels", "gsa_kernels._scaleout.partial"),
    ("gsa_kernels", "gsa_kernels.reference"), ("gsa_kernels", "gsa_kernels.sampling"),
    ("gsa_kernels", "gsa_kernels.schedules"), ("gsa_kernels", "gsa_kernels.local"),
    ("gsa_kernels.__main__", "gsa_kernels"), ("gsa_kernels.__main__", "gsa_kernels._core._backends"),
    ("gsa_kernels.__main__", "gsa_kernels._core._extension"), ("gsa_kernels.__main__", "gsa_kernels.tools.demo.cli"),
    # `fit --help` parses before torch: the fit command loads the API when it runs
    ("gsa_kernels.__main__", "gsa_kernels.tools.fit_cli"), ("gsa_kernels.tools.fit_cli", "gsa_kernels"),
    ("gsa_kernels.tools.fit_cli", "gsa_kernels.models"), ("gsa_kernels.tools.fit_cli", "gsa_kernels._core._format"),
    # importing triton is slow and optional; its kernel modules read TRITON_INTERPRET at import
    ("gsa_kernels._core._backends", "gsa_kernels.triton"), ("gsa_kernels.triton", "gsa_kernels.triton._library"),
}

# The layers (docs/architecture.md, section 5), lowest first: a module imports only modules of its
# own or lower layers. A name ending in "." is every module under that package. The folders
# follow them: _core/ holds the layers up to the backends, _scaleout/ the scale-out internals,
# tools/ what merely uses the library.
LAYERS = [
    ("leaves", {"gsa_kernels._core._layouts", "gsa_kernels._core._format", "gsa_kernels.schedules",
                "gsa_kernels._core", "gsa_kernels._scaleout", "gsa_kernels.tools"}),  # the subpackages' docstrings
    ("arguments", {"gsa_kernels._core._args"}),
    ("oracle", {"gsa_kernels.reference"}),
    ("backward", {"gsa_kernels._core._autograd"}),
    ("registry", {"gsa_kernels._core._contract"}),
    ("kernels", {"gsa_kernels._core._extension", "gsa_kernels.triton", "gsa_kernels.triton."}),
    ("backends", {"gsa_kernels._core._backends"}),
    ("public ops", {"gsa_kernels.ops"}),
    ("scale-out, fits", {"gsa_kernels._scaleout.partial", "gsa_kernels.fitting"}),
    ("streaming", {"gsa_kernels._scaleout.streamed"}),
    ("models", {"gsa_kernels.models", "gsa_kernels.local"}),
    ("users", {"gsa_kernels.sampling", "gsa_kernels.distributed"}),
    ("adapters", {"gsa_kernels.integrations", "gsa_kernels.integrations."}),
    ("the API namespace", {"gsa_kernels"}),
    ("tools", {"gsa_kernels.tools."}),
    ("command line", {"gsa_kernels.__main__"}),
]


def _layer(module):
    for i, (_, names) in enumerate(LAYERS):
        if module in names or any(n.endswith(".") and module.startswith(n) for n in names):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS (docs/architecture.md, section 5)")


def _graph():
    modules = _package_modules()
    graph, local = {}, set()
    for name, path in modules.items():
        top, inner = _package_imports(name, path, modules)
        graph[name] = top
        local |= {(name, t) for t in inner}
    return graph, local


def test_the_package_import_graph_has_no_cycle():
    graph, _ = _graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_function_local_imports_are_only_the_listed_lazy_ones():
    _, local = _graph()
    # the tools import what they need when a command runs (nothing imports them but __main__)
    local = {(a, b) for a, b in local if not (a.startswith("gsa_kernels.tools.") and a != "gsa_kernels.tools.fit_cli")}
    assert local <= LAZY_IMPORTS, f"function-local imports of package modules: {sorted(local - LAZY_IMPORTS)}"


def test_layers_import_one_way():
    """Every module has a layer, and imports only modules of its own or lower layers."""
    graph, local = _graph()
    for module, imported in graph.items():
        for t in imported:
            assert _layer(t) <= _layer(module), (f"{module} ({LAYERS[_layer(module)][0]}) imports {t} "
                                                 f"({LAYERS[_layer(t)][0]})")
    # the public ops know no model type, the registry no backend
    assert not {"gsa_kernels.models", "gsa_kernels._scaleout.streamed", "gsa_kernels.local"} & graph["gsa_kernels.ops"]
    assert not {"gsa_kernels._core._backends", "gsa_kernels.ops"} & graph["gsa_kernels._core._contract"]
    # the tools stand apart: only the command line (and other tools) import them
    users = {a for a, ts in graph.items() for t in ts if t.startswith("gsa_kernels.tools.")}
    users |= {a for a, t in local if t.startswith("gsa_kernels.tools.")}
    assert {u for u in users if not u.startswith("gsa_kernels.tools.")} <= {"gsa_kernels.__main__"}, users
    # _core/ holds the layers up to the backends and nothing above
    assert max(_layer(m) for m in graph if m.startswith("gsa_kernels._core.")) == _layer("gsa_kernels._core._backends")


# ----------------------------------------------------------------------------- docs/architecture.md


def _doc_table(marker):
    """The rows (lists of cells) of the markdown table between <!-- marker --> and <!-- /marker -->."""
    text = (REPO / "docs/architecture.md").read_text()
    body = text.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.strip().splitlines()]
    return rows[2:]  # past the header and the --- line


def test_the_op_map_is_the_registry():
    doc = (REPO / "docs/architecture.md").read_text()
    rows = {r[0]: r[1:] for r in _doc_table("op-map")}
    assert set(rows) == set(_contract.OPS)
    for name, entry in _contract.REGISTRY.items():
        math, ref, cpu, cuda, triton, conformance = rows[name]
        assert math == entry.math and f"### {math} " in doc, name
        assert ref == f"reference.{name}"
        assert (cpu, cuda, triton) == tuple(entry.kernels[b] for b in ("cpu", "cuda", "triton")), name
        assert conformance == entry.conformance, name


def test_every_public_function_is_in_the_public_map():
    import gsa_kernels as gk
    from gsa_kernels import distributed, sampling

    mapped = {name for r in _doc_table("public-map") for name in re.findall(r"`([\w.]+)`", r[0])}
    public = {n for n in gk.__all__ if inspect.isfunction(getattr(gk, n))}
    public |= {f"distributed.{n}" for n in ("mixture_denoise", "mixture_score", "mixture_logp", "fit_gaussian")}
    public |= {f"sampling.{n}" for n in ("teleport", "sample")}
    assert callable(distributed.fit_gaussian) and callable(sampling.teleport)
    assert public <= mapped, f"not in docs/architecture.md's public map: {sorted(public - mapped)}"


def test_cited_repository_files_exist():
    """Comments and docs cite files by their repository path: every such path exists."""
    cited = re.compile(r"\b((?:gsa_kernels|csrc|tests|docs|scripts|benchmarks)/[\w./-]+\.(?:py|md|h|cpp|cu|cuh|sh))\b")
    # a document named without its folder (an upper-case name, .md) is one of the repository's
    named = re.compile(r"(?<![\w./-])([A-Z][\w-]*\.md)\b")
    documents = {p.name for p in REPO.rglob("*.md") if ".git" not in p.parts}
    missing = set()
    for pattern in ("gsa_kernels/**/*.py", "csrc/**/*.*", "tests/**/*.py", "docs/*.md", "scripts/*", "benchmarks/**/*.md",
                    "README.md", "tests/README.md"):
        for path in REPO.glob(pattern):
            if path.is_file() and path.suffix in (".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".sh"):
                text = path.read_text(errors="replace")
                for ref in cited.findall(text):
                    if not (REPO / ref).exists():
                        missing.add(f"{path.relative_to(REPO)} cites {ref}")
                missing |= {f"{path.relative_to(REPO)} cites {ref}" for ref in named.findall(text) if ref not in documents}
    assert not missing, sorted(missing)
