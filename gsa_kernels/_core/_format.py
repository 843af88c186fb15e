"""The model file format: safetensors (portable, no pickle), tagged in its metadata with the
kind of model that wrote it ("gsa_kernels": "GaussianModel" / "GaussianMixture" /
"StreamedMixture"), so that loading another kind of file is a clear error; and the check of the
data metadata that `python -m gsa_kernels fit` adds (the sample shape the statistics were fitted on)."""
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


def check_shape(data_meta, shape, where):
    """ValueError when the statistics were fitted on samples of another shape than `shape`."""
    if shape is None or "shape" not in data_meta:
        return
    shape = tuple(int(s) for s in shape)
    if shape != tuple(data_meta["shape"]):
        raise ValueError(f"{where}: statistics fitted on samples of shape {tuple(data_meta['shape'])} "
                         f"({data_meta.get('transform', 'transform unknown')}; scale {data_meta.get('scale', '1')}), "
                         f"used on samples of shape {shape}: refit with matching --resolution / --mode")


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
