"""The Triton kernels as torch ops gsa_kernels_triton::<op> for every op of the registry
(gsa_kernels/_core/_contract.py; own namespace: never clashes with the compiled extension's
gsa_kernels::). Each op is defined with the registry's schema on the function `<op>` of the
registry's Triton kernel file (gaussian.py, mixture.py, local.py): no wrappers to keep in step.

Registration is picked per case (checked here, see tests/test_triton_backend.py):
- GPU: torch.library.triton_op, with every kernel launched through wrap_triton, so that
  torch.compile / Inductor sees the Triton kernels themselves (and can fuse around them).
  triton_op traces the Python launcher with fake tensors, so no register_fake is needed.
- TRITON_INTERPRET=1 (CPU tensors): an opaque torch.library.custom_op + register_fake. Under
  the interpreter, tracing a triton_op with fake tensors reaches the interpreter, which reads
  data pointers and fails; the opaque op compiles with fullgraph=True and passes opcheck.
"""
from __future__ import annotations

import importlib
from pathlib import PurePosixPath

import torch

from .._core import _contract
from . import _config

NAMESPACE = "gsa_kernels_triton"


def implementation(op: _contract.Op):
    """The launcher of `op` in its Triton kernel file (imports that module)."""
    module = importlib.import_module(f"{__package__}.{PurePosixPath(op.kernels['triton']).stem}")
    return getattr(module, op.name)


for _op in _contract.REGISTRY.values():
    _define = torch.library.custom_op if _config.INTERPRET else torch.library.triton_op
    _define(f"{NAMESPACE}::{_op.name}", implementation(_op), mutates_args=(), schema=_op.schema)

# fakes only for the opaque custom ops; backward formulas for both (gsa_kernels/_core/_autograd.py)
_contract.register(NAMESPACE, fakes=_config.INTERPRET)
ops = getattr(torch.ops, NAMESPACE)
