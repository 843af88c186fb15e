import pytest
import torch


def pytest_report_header(config):
    from gsa_kernels import _backends

    return ["gsa_kernels backends: " + ", ".join(f"{n}={'yes' if ok else 'no'}" for n, (ok, _) in _backends.status().items())]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def requires_backend(name):
    """Skip marker for a backend that is not usable here, with the reason."""
    from gsa_kernels import _backends

    ok, why = _backends.BACKENDS[name].status()
    return pytest.mark.skipif(not ok, reason=f"backend {name!r} unavailable: {why}")
