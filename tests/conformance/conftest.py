"""Running the conformance suite's backends here.

- reference, cpu: in this process.
- cuda: on CPU tensors through the SIMT emulation (GSA_KERNELS_CUDA_EMULATE=1, set per test).
- triton: on CPU tensors the kernels must be interpreted, and Triton decides that when the kernel
  modules are imported (TRITON_INTERPRET=1 before import). Unless this process already has
  TRITON_INTERPRET=1, the triton items are run by a child pytest with TRITON_INTERPRET=1, started
  in the background right after collection (it shares the two cores with this process), and each
  triton item here reports its own case's outcome from the child: pass / fail with the child's
  message / skip. So the parent's output and --junitxml list every case of every backend.
- GSA_CONFORMANCE_DEVICE=cuda with a GPU visible: triton and cuda on CUDA tensors, compiled,
  in this process (harness.backends()).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gsa_kernels._core import _backends

from . import harness

CHILD_RESULTS = "GSA_CONFORMANCE_CHILD_RESULTS"  # set in the child: where it writes outcomes
CHILD_IDS = "GSA_CONFORMANCE_CHILD_IDS"  # set in the child: the node ids it runs
CHILD_TIMEOUT_S = 1200
_child = {}  # the parent's child process: popen, results path, log path


HERE = Path(__file__).resolve().parent


def _backend_of(item):
    """The backend of a conformance item, else None."""
    spec = getattr(item, "callspec", None)
    if spec is None or "case" not in spec.params or HERE not in Path(item.path).resolve().parents:
        return None
    return spec.params["backend"]


def _proxied(item):
    """A triton item that the child runs (this process cannot interpret Triton kernels)."""
    return (_backend_of(item) == "triton" and harness.device_type() == "cpu" and not harness.interpreting()
            and os.environ.get(CHILD_RESULTS) is None)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: the child runs only the selected triton items
def pytest_collection_modifyitems(session, config, items):
    ids_file = os.environ.get(CHILD_IDS)
    if ids_file is not None:  # the child: only the parent's triton items
        wanted = set(Path(ids_file).read_text().split("\n"))
        keep = [it for it in items if it.nodeid in wanted]
        config.hook.pytest_deselected(items=[it for it in items if it.nodeid not in wanted])
        items[:] = keep
        return
    for item in items:
        if _backend_of(item) == "triton" and harness.device_type() == "cpu" and not item.callspec.params["case"].interpreter:
            item.add_marker(pytest.mark.skip(reason="cannot run here: too many programs for the Triton interpreter"))
    proxied = [it for it in items if _proxied(it) and not it.get_closest_marker("skip")]
    if not proxied or config.option.collectonly:
        return
    items[:] = [it for it in items if not _proxied(it)] + [it for it in items if _proxied(it)]  # triton last
    _start_child(config, proxied)


def _start_child(config, items):
    tmp = Path(tempfile.mkdtemp(prefix="gsa_conformance_"))
    (tmp / "ids").write_text("\n".join(it.nodeid for it in items))
    files = sorted({str(it.path) for it in items})
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_RESULTS: str(tmp / "results.json"), CHILD_IDS: str(tmp / "ids")})
    log = open(tmp / "log.txt", "w")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", *files]
    _child.update(popen=subprocess.Popen(cmd, cwd=config.rootpath, env=env, stdout=log, stderr=subprocess.STDOUT),
                  results=tmp / "results.json", log=tmp / "log.txt", outcomes=None)


def _child_outcomes():
    if _child["outcomes"] is None:
        try:
            _child["popen"].wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _child["popen"].kill()
        path = _child["results"]
        _child["outcomes"] = json.loads(path.read_text()) if path.exists() else {}
    return _child["outcomes"]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not _proxied(pyfuncitem):
        return None
    outcome = _child_outcomes().get(pyfuncitem.nodeid)
    if outcome is None:
        tail = "\n".join(_child["log"].read_text().splitlines()[-40:])
        pytest.fail(f"the TRITON_INTERPRET=1 child pytest reported nothing for this case:\n{tail}", pytrace=False)
    if outcome["outcome"] == "skipped":
        pytest.skip(outcome["message"])
    if outcome["outcome"] == "failed":
        pytest.fail(f"(in the TRITON_INTERPRET=1 child)\n{outcome['message']}", pytrace=False)
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session):
    yield
    if "popen" in _child and _child["popen"].poll() is None:  # e.g. interrupted: do not leave it running
        _child["popen"].kill()


def pytest_runtest_logreport(report):
    """The child: record each item's outcome (a failure in setup or call, else the call's)."""
    path = os.environ.get(CHILD_RESULTS)
    if path is None or not (report.when == "call" or report.outcome != "passed"):
        return
    results = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        message = report.longrepr[2]
    else:
        message = report.longreprtext
    if results.get(report.nodeid, {}).get("outcome") != "failed":
        results[report.nodeid] = {"outcome": report.outcome, "message": message}
    Path(path).write_text(json.dumps(results))


@pytest.fixture(autouse=True)
def _backend_usable(request, monkeypatch):
    """Skip a backend that cannot run here (the only skip); the cuda backend on CPU tensors
    is the emulation, enabled for its own tests only."""
    backend = _backend_of(request.node)
    if backend is None or _proxied(request.node):
        return
    if backend == "cuda" and harness.device_type() == "cpu":
        monkeypatch.setenv("GSA_KERNELS_CUDA_EMULATE", "1")
    ok, why = _backends.BACKENDS[backend].status()
    if not ok:
        pytest.skip(f"cannot run here: backend {backend!r}: {why}")
