"""Empirical mixtures whose points live in a file: training sets larger than memory.

`GaussianMixture.from_points(p)` with p a `numpy.memmap` or the path of a `.npy` / `.safetensors`
file returns a `StreamedMixture`: the points stay in the file (mapped, never read whole) and
every op streams them in blocks. Each block is copied from the mapping into one of two block
buffers (mapped pages are page cache, not anonymous memory; the buffers are), the next block is
read by a background thread while the current one is computed, and each block's posterior is a
partial state (gsa_kernels/partial.py) merged exactly into the running one by gk.merge_partials,
so the results are those of the in-memory mixture (up to float rounding of the merge) and the
anonymous memory is the two buffers (`block_bytes` in all, per concurrent call) plus the [B, D]
outputs, whatever N is.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from . import _format, ops, partial
from ._args import PosteriorOperand

DEFAULT_BLOCK_BYTES = 256 * 2**20  # both block buffers together

_SAFETENSORS_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64}


def _safetensors_memmap(path: str, key: Optional[str]):
    """One tensor of a .safetensors file as a read-only numpy.memmap (the format: 8-byte header
    length, JSON header with dtype / shape / data_offsets, then the data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    names = [k for k in header if k != "__metadata__"]
    if key is None:
        if len(names) != 1:
            raise ValueError(f"from_points: {path} holds {len(names)} tensors {names}; name one with key=")
        key = names[0]
    if key not in header:
        raise ValueError(f"from_points: {path} has no tensor {key!r} (it has {names})")
    info = header[key]
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise TypeError(f"from_points: tensor {key!r} of {path} is {info['dtype']}; need F16, F32 or F64")
    begin, _ = info["data_offsets"]
    shape = tuple(info["shape"])
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape), key


def open_points(points, key: Optional[str] = None):
    """A path (.npy / .safetensors) or numpy.memmap -> (2-D read-only array view [N, D], source
    description for save()). Nothing is read but headers."""
    if isinstance(points, np.memmap):
        arr = points
        if arr.filename is None:
            raise ValueError("from_points: this numpy.memmap has no file name")
        source = {"kind": "memmap", "path": os.path.abspath(arr.filename), "offset": int(arr.offset),
                  "dtype": arr.dtype.str, "shape": list(arr.shape), "order": "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"}
    else:
        path = os.path.abspath(os.fspath(points))
        if not os.path.exists(path):
            raise FileNotFoundError(f"from_points: no such file {path}")
        if path.endswith(".npy"):
            arr = np.load(path, mmap_mode="r")
            source = {"kind": "npy", "path": path}
        elif path.endswith(".safetensors"):
            arr, key = _safetensors_memmap(path, key)
            source = {"kind": "safetensors", "path": path, "key": key}
        else:
            raise ValueError(f"from_points: a points file must end in .npy or .safetensors, got {path}")
    if arr.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"from_points: points must be float16, float32 or float64, got {arr.dtype}")
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(f"from_points: points must be [N, ...] with N >= 1, got shape {arr.shape}")
    return arr.reshape(arr.shape[0], -1), source


def reopen(source: dict):
    """The array of a source description written by save()."""
    if source["kind"] == "memmap":
        arr = np.memmap(source["path"], dtype=np.dtype(source["dtype"]), mode="r", offset=source["offset"],
                        shape=tuple(source["shape"]), order=source.get("order", "C"))
        return open_points(arr)[0]
    return open_points(source["path"], source.get("key"))[0]


class StreamedMixture(PosteriorOperand):
    """An empirical mixture over points in a file (see the module docstring). Built by
    GaussianMixture.from_points; the ops and the model methods (denoise, score, logp, save)
    work as for an in-memory mixture. block_bytes: anonymous memory for the two point blocks."""

    def __init__(self, points, log_weights=None, block_bytes: int = DEFAULT_BLOCK_BYTES, key=None,
                 dtype: Optional[torch.dtype] = None):
        self._points, self.source = open_points(points, key)
        N, D = self._points.shape
        if not isinstance(block_bytes, int) or block_bytes <= 0:
            raise ValueError(f"from_points: block_bytes must be a positive int, got {block_bytes!r}")
        self.block_bytes = block_bytes
        # the model's dtype (what .dtype reports, blocks are read in x's compute dtype):
        # float64 for a float64 file, else float32 (a float16 file is widened block by block)
        self._dtype = dtype or (torch.float64 if self._points.dtype == np.float64 else torch.float32)
        if log_weights is None:
            log_weights = torch.zeros(N, dtype=torch.float64)
        log_weights = torch.as_tensor(log_weights, dtype=torch.float64)
        if log_weights.shape != (N,):
            raise ValueError(f"log_weights must be [N] = [{N}], got shape {tuple(log_weights.shape)}")
        if torch.isnan(log_weights).any() or torch.isposinf(log_weights).any() or torch.isneginf(log_weights).all():
            raise ValueError("log_weights must be finite or -inf, with at least one finite")
        self.log_weights = torch.log_softmax(log_weights, 0).to(self._dtype)
        self._spare = []  # block buffers of a finished call, for the next (_take_buffers)

    num_components = property(lambda self: self._points.shape[0])
    dim = property(lambda self: self._points.shape[1])
    rank = property(lambda self: 0)
    device = property(lambda self: torch.device("cpu"))
    dtype = property(lambda self: self._dtype)

    def __repr__(self):
        return (f"StreamedMixture(N={self.num_components}, D={self.dim}, dtype={self.dtype}, "
                f"file={self.source['path']!r}, block_bytes={self.block_bytes})")

    def to(self, device=None, dtype=None) -> "StreamedMixture":
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("StreamedMixture: file-backed points are streamed on the CPU only")
        m = StreamedMixture.__new__(StreamedMixture)
        m.__dict__.update(self.__dict__)
        m._spare = []  # each model its own block buffers
        if dtype is not None:
            m._dtype = dtype
            m.log_weights = self.log_weights.to(dtype)
        return m

    def rows_per_block(self, dtype: torch.dtype) -> int:
        """Points per block: two blocks of the compute dtype fit block_bytes."""
        row = self.dim * torch.empty(0, dtype=dtype).element_size()
        return max(1, min(self.num_components, self.block_bytes // (2 * row)))

    def _take_buffers(self, dtype):
        """Two block buffers for one call: the pair a finished call left, else new ones (kept:
        touching fresh pages of block_bytes costs a large block's read). Concurrent calls on
        this mixture (threads) each hold their own pair; list.pop hands a pair to one only."""
        try:
            bufs = self._spare.pop()
        except IndexError:
            bufs = None
        if bufs is None or bufs[0].dtype != dtype:
            bufs = [torch.empty(self.rows_per_block(dtype), self.dim, dtype=dtype) for _ in range(2)]
        return bufs

    def _return_buffers(self, bufs):
        if not self._spare:  # one pair kept: the memory of a single call
            self._spare.append(bufs)

    # ------------------------------------------------------------------ io
    def save(self, path):
        """A small safetensors file (log weights, in the model's dtype) that refers to the points
        file: no copy. GaussianMixture.load reads it back."""
        _format.save(path, {"log_weights": self.log_weights}, "StreamedMixture",
                   source=json.dumps(self.source), block_bytes=str(self.block_bytes))

    @classmethod
    def from_saved(cls, tensors: dict, metadata: dict) -> "StreamedMixture":
        """The mixture of save()'s tensors and metadata (GaussianMixture.load)."""
        m = cls.__new__(cls)
        m.source = json.loads(metadata["source"])
        m._points = reopen(m.source)
        m.block_bytes = int(metadata["block_bytes"])
        m.log_weights = tensors["log_weights"]
        m._dtype = m.log_weights.dtype
        m._spare = []
        return m

    # ------------------------------------------------------------------ ops
    def denoise(self, x, sigma, return_weights=False, backend="auto"):
        return ops.mixture_denoise(x, sigma, self, return_weights=return_weights, backend=backend)

    def score(self, x, sigma, backend="auto"):
        return ops.mixture_score(x, sigma, self, backend=backend)

    def logp(self, x, sigma, backend="auto"):
        return ops.mixture_logp(x, sigma, self, backend=backend)

    def __call__(self, x, sigma):
        return self.denoise(x, sigma)

    def posterior_args(self, x2, sigma, op):
        if x2.device.type != "cpu":
            raise ValueError(f"{op}: a file-backed mixture streams its points on the CPU; x is on {x2.device}")
        return None  # no model tensors: the points are read block by block

    def posterior(self, backend, x2, sigma, need_denoised, need_weights, params):
        return mixture_posterior(x2, sigma, self, need_denoised, need_weights, backend)

    def sample(self, n: int, generator: Optional[torch.Generator] = None):
        """n training points drawn by weight, [n, D] (the delta mixture's samples)."""
        k = torch.multinomial(self.log_weights.double().exp(), n, replacement=True, generator=generator)
        return torch.from_numpy(np.ascontiguousarray(self._points[k.numpy()])).to(self._dtype)


def _blocks(points: np.ndarray, bufs):
    """Yield (k0, block [nb, D] tensor) over the points, each block copied into one of the two
    buffers `bufs` ([rows, D] each); the next block is read by a background thread while the
    caller computes. A yielded block is valid until the next one is requested; once the
    generator is closed, no read is in flight."""
    N, D = points.shape
    rows = bufs[0].shape[0]
    views = [b.numpy() for b in bufs]
    # rows stored contiguously in the compute dtype: read() the file straight into the buffer
    # (the kernel's read-ahead serves a sequential read; page faults on the mapping, ~4x slower
    # here, do not); otherwise convert from the mapping
    direct = (isinstance(points, np.memmap) and getattr(points, "_mmap", None) is not None
              and points.flags.c_contiguous and points.dtype == views[0].dtype)
    if direct:  # where the rows start in the file (a view of a memmap keeps its parent's .offset)
        mapped = np.frombuffer(points._mmap, np.uint8).ctypes.data
        start = points.offset - points.offset % mmap.ALLOCATIONGRANULARITY + points.ctypes.data - mapped
    f = open(points.filename, "rb", buffering=0) if direct else None
    row_bytes = D * points.dtype.itemsize

    def read(j):
        k0 = j * rows
        nb = min(rows, N - k0)
        if direct:
            dst = memoryview(views[j % 2][:nb].reshape(-1).view(np.uint8))
            done = 0
            while done < nb * row_bytes:  # os.preadv releases the GIL
                got = os.preadv(f.fileno(), [dst[done:]], start + k0 * row_bytes + done)
                if got <= 0:
                    raise OSError(f"short read from {points.filename}")
                done += got
        else:
            np.copyto(views[j % 2][:nb], points[k0:k0 + nb], casting="unsafe")  # GIL released
        return k0, nb

    num = (N + rows - 1) // rows
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="gsa-read-ahead") as pool:
            pending = pool.submit(read, 0)
            for j in range(num):
                k0, nb = pending.result()
                if j + 1 < num:
                    pending = pool.submit(read, j + 1)  # into the other buffer
                yield k0, bufs[j % 2][:nb]
    finally:
        if f is not None:
            f.close()


def mixture_posterior(x2, sigma, m: StreamedMixture, need_denoised, need_weights, backend):
    """The kernel-level mixture_posterior of a streamed mixture on `backend` (a _backends.Backend
    row, resolved by ops.py): x2 [B, D] contiguous, sigma [B] in the compute dtype. Each block goes to the chosen backend as an
    r = 0 mixture with the block's (globally normalised) log weights; its posterior is a partial
    state, merged into the running one with gk.merge_partials."""
    cd = sigma.dtype
    out_dtype, x2 = x2.dtype, x2.to(cd)  # half-precision x: blocks' outputs in the compute dtype until the merge
    B, D = x2.shape
    kernel = backend.kernel("mixture_posterior", x2.device.type)
    logw = m.log_weights.to(cd)
    state, parts = None, []  # parts: (block weights, block logp) for return_weights
    bufs = m._take_buffers(cd)
    blocks = _blocks(m._points, bufs)
    try:
        for k0, block in blocks:
            nb = block.shape[0]
            den_b, logp_b, w_b = kernel(
                x2, block, block.new_zeros(nb, D, 0), block.new_zeros(nb, 0), block.new_zeros(nb),
                logw[k0:k0 + nb], sigma, need_denoised, need_weights)
            block_state = partial.from_posterior(den_b if need_denoised else x2.new_zeros(B, 0), logp_b, (D,), out_dtype)
            state = block_state if state is None else partial.merge_partials([state, block_state])
            if need_weights:
                parts.append((w_b, logp_b))
    finally:
        blocks.close()  # the read-ahead thread is done with the buffers before another call takes them
        m._return_buffers(bufs)
    # a row without weight anywhere (NaN in x) gets NaN, as from the in-memory kernel: 0 / 0
    den = (state.weighted / state.sum_exp[:, None]).to(out_dtype) if need_denoised else x2.new_empty((0,), dtype=out_dtype)
    if need_weights:  # block k's weights times exp(logp_k - max) / sum_exp: exact float32 differences
        weights = torch.cat([w_b * (torch.exp(lb - state.max_logit) / state.sum_exp).nan_to_num(0.0)[:, None]
                             for w_b, lb in parts], 1)
    else:
        weights = x2.new_empty((0,), dtype=cd)
    return den, state.logp(), weights
