"""GEMM-ready layouts of a model's tensors for the CPU kernels, owned by the model.

The CPU kernels multiply by U^T ([r, D], contiguous rows) and by per-block component panels
(csrc/cpu/mixture.cpp); building them costs as much as a small batch's GEMMs. A model keeps the
layouts it needs in its own __dict__ (they die with it), each with a 64-bit hash of the contents
of the tensors it was built from. Every call hashes those tensors again (one read of them, a
fraction 1 / (2 B) or less of the op's own reads) and rebuilds on a mismatch, so a change
made through any route -- in-place ops, `.data`, numpy or dlpack views, the storage, a new
attribute -- is seen by the next call. Under torch.compile the kernels build their own per call.
"""
from __future__ import annotations

import torch


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
    return backend_name == "cpu" and rank > 0 and not torch.compiler.is_compiling()


def gaussian(backend_name, model, basis):
    """The trailing layout arguments of gaussian_map / gaussian_trajectory for a backend:
    (basis_rows,) for the cpu backend, () otherwise. basis: the model's basis as prepared for
    the call (compute dtype, contiguous)."""
    if not _wanted(backend_name, basis.shape[1]):
        return ()
    return (_kept(model, "basis_rows", (basis,), torch.ops.gsa_kernels.basis_rows),)


def mixture(backend_name, model, means, bases):
    """(forward_panels, backward_panels) for the cpu backend, () otherwise."""
    if not _wanted(backend_name, bases.shape[2]):
        return ()
    return _kept(model, "panels", (means, bases), torch.ops.gsa_kernels.mixture_panels)
