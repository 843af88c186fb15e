"""GEMM-ready layouts of a model's tensors for the CPU kernels, owned by the model.

The CPU kernels multiply by U^T ([r, D], contiguous rows) and by per-block component panels
(csrc/cpu/mixture.cpp); building them costs as much as a small batch's GEMMs. A model keeps the
layouts it needs in its own __dict__ (they die with it), each with a 64-bit hash of the contents
of the tensors it was built from. Every call hashes those tensors again (one read of them, a
fraction 1 / (2 B) or less of the op's own reads) and rebuilds on a mismatch, so a change
made through any route -- in-place ops, `.data`, numpy or dlpack views, the storage, a new
attribute -- is seen by the next call. Under torch.compile the kernels build their own per call.

U^T (basis_rows) is kept only where it pays: without it the kernels read U as it is (at::mm, any
GEMM engine that takes strided operands), with it an engine that needs U^T's rows (oneDNN) may
run, but U is hashed on every call. With a full-rank basis and a small batch the hash costs more
than the faster engine saves on some hosts: csrc/cpu/layouts.cpp measures the three costs on first
use and decides per batch size. GSA_KERNELS_LAYOUTS=always|never overrides (default auto).
"""
from __future__ import annotations

import os

import torch

_POLICIES = ("auto", "always", "never")


def _policy():
    policy = os.environ.get("GSA_KERNELS_LAYOUTS", "auto") or "auto"
    if policy not in _POLICIES:
        raise ValueError(f"GSA_KERNELS_LAYOUTS must be one of {', '.join(_POLICIES)}; got {policy!r}")
    return policy


def _kept(model, name, sources, build):
    """build(*sources), kept in the model while the sources' hashes are unchanged."""
    store = model.__dict__.setdefault("_layouts", {})
    key = (name, sources[0].dtype)
    sources = tuple(s.detach() for s in sources)  # a layout is data for the kernel, not a graph
    fingerprint = tuple(torch.ops.gsa_kernels.content_hash(s) for s in sources)
    kept = store.get(key)
    if kept is not None and kept[0] == fingerprint:
        return kept[1]
    store.pop(key, None)  # drop the old layout before building the new one
    layout = build(*sources)
    store[key] = (fingerprint, layout)
    return layout


def _wanted(backend_name, rank):
    return (backend_name == "cpu" and rank > 0 and not torch.compiler.is_compiling()
            and _policy() != "never")


def gaussian(backend_name, model, basis, rows):
    """The trailing layout arguments of gaussian_map / gaussian_trajectory for a backend:
    (basis_rows,) for the cpu backend where keeping it pays for `rows` rows, () otherwise.
    basis: the model's basis as prepared for the call (compute dtype, contiguous)."""
    if not _wanted(backend_name, basis.shape[1]):
        return ()
    if _policy() == "auto" and not torch.ops.gsa_kernels.basis_rows_pay(rows, basis):
        return ()
    return (_kept(model, "basis_rows", (basis,), torch.ops.gsa_kernels.basis_rows),)


def mixture(backend_name, model, means, bases):
    """(forward_panels, backward_panels) for the cpu backend, () otherwise."""
    if not _wanted(backend_name, bases.shape[2]):
        return ()
    return _kept(model, "panels", (means, bases), torch.ops.gsa_kernels.mixture_panels)
