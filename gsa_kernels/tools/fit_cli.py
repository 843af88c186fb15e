"""python -m gsa_kernels fit SRC --rank r [--per-class] [--mixture K] -o stats.safetensors

Fits the statistics teleport needs from a data set on disk, streamed in batches with a progress
bar (one bar per pass over the data: the randomized fit at large D reads it 3 times):

- SRC an image folder: every image file below it (PIL), converted to --mode (RGB / L), resized
  (shorter side) and centre-cropped to --resolution (else all images must share one size),
  scaled to [-1, 1] (--range); class subfolders (SRC/<class>/...) give labels in sorted order;
- SRC a .npy file [N, ...] (memory-mapped), labels from --labels FILE.npy;
- SRC a .safetensors file: tensor --key (default: the first), labels from --labels-key.

--scale c multiplies every sample by c (e.g. a VAE's scaling_factor when SRC holds raw VAE
latents). The sample shape, the transform, the value range and the scale go into the file's
metadata; load_stats(path, shape=...) refuses data of another shape, and
integrations.diffusers.enable_teleport refuses a pipeline whose latents have another shape.
"""
from __future__ import annotations

import argparse
import json
import os

from .demo.cli import at_least  # the one int >= lo argparse type of the commands

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
META_PREFIX = "data_"


_positive_int, _nonneg_int = at_least(1), at_least(0)


def parser():
    p = argparse.ArgumentParser(prog="python -m gsa_kernels fit", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="an image folder (class subfolders give labels), a .npy or a .safetensors file")
    p.add_argument("-o", "--output", required=True, help="where to write the statistics (.safetensors)")
    p.add_argument("--rank", type=_nonneg_int, default=None,
                   help="directions kept per Gaussian (default: all; needed when D x D float64 exceeds 1 GiB)")
    p.add_argument("--per-class", action="store_true", help="one Gaussian per class (GaussianMixture.fit_per_class)")
    p.add_argument("--mixture", type=_positive_int, default=None, metavar="K",
                   help="a K-component mixture (k-means + per-cluster PCA; holds the data in memory)")
    p.add_argument("--resolution", type=_positive_int, default=None, help="images: resize + centre-crop to this size")
    p.add_argument("--mode", choices=("RGB", "L"), default="RGB", help="images: colour mode (default RGB)")
    p.add_argument("--range", dest="value_range", choices=("-1,1", "0,1"), default="-1,1",
                   help="images: pixel values mapped to this range (default -1,1, as diffusers pipelines)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every sample by this (latent scaling)")
    p.add_argument("--key", default=None, help=".safetensors: the tensor holding the samples (default: the first)")
    p.add_argument("--labels", default=None, help=".npy: a .npy file of int labels [N]")
    p.add_argument("--labels-key", default="labels", help=".safetensors: the tensor holding int labels")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="samples per batch (default 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------- sources


class Source:
    """A data set read in batches: shape (one sample), n, classes (names or None), metadata,
    and batches() -> a fresh iterator of (x [b, *shape] float32, y [b] int64 or None)."""

    def __init__(self, shape, n, classes, meta, read):
        self.shape, self.n, self.classes, self.meta, self._read = tuple(shape), n, classes, meta, read

    def batches(self, batch_size):
        return self._read(batch_size)


def _image_files(root):
    out = []
    for folder, _, files in os.walk(root):
        out += [os.path.join(folder, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(out)


def image_folder(root, resolution=None, mode="RGB", value_range="-1,1", scale=1.0):
    import numpy as np
    import torch
    from PIL import Image

    files = _image_files(root)
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = [d for d in subdirs if _image_files(os.path.join(root, d))] or None
    if classes is not None:
        loose = [f for f in files if os.path.dirname(f) == os.path.abspath(root) or os.path.dirname(f) == root]
        if loose:
            raise ValueError(f"{root}: images both in class subfolders and loose at the top ({loose[0]}): "
                             "put every image in a class folder, or none")
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[os.path.relpath(f, root).split(os.sep)[0]] for f in files]
    else:
        labels = None
    lo, hi = (-1.0, 1.0) if value_range == "-1,1" else (0.0, 1.0)

    def load(path):
        with Image.open(path) as im:
            im = im.convert(mode)
            if resolution is not None:
                w, h = im.size
                f = resolution / min(w, h)
                im = im.resize((max(resolution, round(w * f)), max(resolution, round(h * f))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - resolution) // 2, (h - resolution) // 2
                im = im.crop((left, top, left + resolution, top + resolution))
            a = np.asarray(im, dtype=np.float32) / 255.0
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a * (hi - lo) + lo)) * scale

    first = load(files[0])
    shape = tuple(first.shape)

    def read(batch_size):
        for i in range(0, len(files), batch_size):
            xs = []
            for f in files[i:i + batch_size]:
                x = load(f)
                if tuple(x.shape) != shape:
                    raise ValueError(f"{f}: image of shape {tuple(x.shape)}, but {files[0]} has {shape}: "
                                     "give --resolution to resize and crop them all")
                xs.append(x)
            y = None if labels is None else torch.tensor(labels[i:i + batch_size])
            yield torch.stack(xs), y

    transform = f"PIL convert({mode})"
    if resolution is not None:
        transform += f", resize shorter side to {resolution} (bicubic), centre crop {resolution}x{resolution}"
    transform += f", [0, 255] -> [{lo:g}, {hi:g}]"
    return Source(shape, len(files), classes, {"source": "image folder", "transform": transform,
                                                "range": f"{lo:g},{hi:g}"}, read)


def _array_source(x, labels, kind, scale):
    import numpy as np
    import torch

    if x.ndim < 2:
        raise ValueError(f"{kind}: samples must be [N, ...], got shape {tuple(x.shape)}")
    if labels is not None and len(labels) != x.shape[0]:
        raise ValueError(f"{kind}: {len(labels)} labels for {x.shape[0]} samples")

    def read(batch_size):
        for i in range(0, x.shape[0], batch_size):
            xb = torch.as_tensor(np.array(x[i:i + batch_size]) if isinstance(x, np.ndarray) else x[i:i + batch_size])
            xb = xb.float() * scale
            yield xb, (None if labels is None else torch.as_tensor(labels[i:i + batch_size]).long())

    classes = None if labels is None else [str(c) for c in sorted(set(int(v) for v in labels))]
    return Source(x.shape[1:], x.shape[0], classes, {"source": kind, "transform": "none"}, read)


def open_source(args):
    src = args.src
    if os.path.isdir(src):
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ValueError("src: an image folder needs Pillow (pip install Pillow, or the integrations extra)") from None
        return image_folder(src, args.resolution, args.mode, args.value_range, args.scale)
    if not os.path.exists(src):
        raise ValueError(f"src: {src} does not exist")
    if src.endswith(".npy"):
        import numpy as np

        x = np.load(src, mmap_mode="r")
        labels = None if args.labels is None else np.load(args.labels)
        return _array_source(x, labels, ".npy", args.scale)
    if src.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(src, framework="pt") as f:
            keys = list(f.keys())
            key = args.key or next((k for k in keys if k != args.labels_key), None)
            if key not in keys:
                raise ValueError(f"{src}: no tensor {key!r} (it has {', '.join(keys) or 'none'}): give --key")
            x = f.get_tensor(key)
            labels = f.get_tensor(args.labels_key) if args.labels_key in keys and args.labels_key != key else None
        return _array_source(x, labels, ".safetensors", args.scale)
    raise ValueError(f"src: {src} is neither a folder, a .npy nor a .safetensors file")


# ----------------------------------------------------------------------------- metadata


def save_stats(model, path, meta):
    """model.save(path), then `meta` ({name: str}) added to the file's metadata as data_<name>."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model.save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        old = dict(f.metadata() or {})
    old.update({META_PREFIX + k: str(v) for k, v in meta.items()})
    save_file(tensors, str(path), metadata=old)


def load_stats(path, shape=None, device="cpu"):
    """The GaussianModel / GaussianMixture saved by `fit` (or by .save), with .data_meta = the
    data metadata ({} for files without it). shape: the sample shape the caller will use it on
    (e.g. (3, 64, 64)); a file fitted on another shape raises a ValueError naming both."""
    from safetensors import safe_open

    from .._core import _format
    from ..models import GaussianMixture, GaussianModel

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    kind = meta.get("gsa_kernels")
    model = (GaussianModel if kind == "GaussianModel" else GaussianMixture).load(path, device)
    data = {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
    if "shape" in data:
        data["shape"] = tuple(json.loads(data["shape"]))
    if "classes" in data:
        data["classes"] = json.loads(data["classes"])
    _format.check_shape(data, shape, str(path))
    model.data_meta = data
    return model


# ----------------------------------------------------------------------------- the command


def main(argv=None):
    args = parser().parse_args(argv)
    if args.per_class and args.mixture is not None:
        parser().error("--per-class and --mixture exclude each other")
    if args.mixture is not None and args.rank is None:
        parser().error("--mixture needs --rank")
    import torch
    from tqdm import tqdm

    import gsa_kernels as gk

    try:
        source = open_source(args)
    except ValueError as e:
        parser().error(str(e))
    if args.per_class and source.classes is None:
        parser().error(f"--per-class: {args.src} has no labels (class subfolders, --labels or --labels-key)")
    nb = -(-source.n // args.batch_size)
    passes = []

    def pairs():
        passes.append(1)
        it = source.batches(args.batch_size)
        return tqdm(it, total=nb, desc=f"pass {len(passes)}", unit="batch", disable=args.no_progress)

    if args.mixture is not None:
        x = torch.cat([b for b, _ in pairs()])
        model = gk.GaussianMixture.fit(x, args.mixture, args.rank)
    elif args.per_class:
        model = gk.GaussianMixture.fit_per_class(lambda: ((x, y) for x, y in pairs()), rank=args.rank)
    else:
        model = gk.GaussianModel.fit(lambda: (x for x, _ in pairs()), rank=args.rank)
    meta = dict(source.meta, shape=json.dumps(list(source.shape)), scale=repr(args.scale), rows=source.n,
                src=os.path.abspath(args.src), fit=("per-class" if args.per_class else
                                                    f"mixture {args.mixture}" if args.mixture else "gaussian"))
    if source.classes is not None:
        meta["classes"] = json.dumps(source.classes)
    save_stats(model, args.output, meta)
    rank = model.rank if hasattr(model, "rank") else model.basis.shape[1]
    print(f"wrote {args.output}: {type(model).__name__} of {source.n} samples of shape {source.shape}, rank {rank}, "
          f"{len(passes)} pass(es) over the data")
    return 0
