"""The model file format: safetensors (portable, no pickle), tagged in its metadata with the
kind of model that wrote it ("gsa_kernels": "GaussianModel" / "GaussianMixture" /
"StreamedMixture"), so that loading another kind of file is a clear error."""
from __future__ import annotations

from safetensors import safe_open
from safetensors.torch import save_file


def save(path, tensors, kind, **metadata):
    """Save tensors (detached, on the CPU, contiguous) tagged as `kind`; string metadata besides."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"gsa_kernels": kind, **metadata})


def metadata(path) -> dict:
    """The string metadata of a saved file ({} if none)."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load(path, device, kind, keys):
    """The tensors `keys` of a file saved by `kind`.save, or a clear error for another kind of file."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        saved_as = (f.metadata() or {}).get("gsa_kernels")
        if saved_as is not None and saved_as != kind:
            raise ValueError(f"{path} holds a {saved_as}, not a {kind}: load it with gsa_kernels.{saved_as}.load")
        missing = [k for k in keys if k not in f.keys()]
        if missing:
            raise ValueError(f"{path} is not a saved {kind}: it lacks {', '.join(missing)}")
        return {k: f.get_tensor(k) for k in keys}
