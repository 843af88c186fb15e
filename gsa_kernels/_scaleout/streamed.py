"""Empirical mixtures whose points live in a file: training sets larger than memory.

`GaussianMixture.from_points(p)` with p a `numpy.memmap` (or a view of one: its own offset,
row stride and columns are kept) or the path of a `.npy` / `.safetensors` file returns a
`StreamedMixture`: the points stay in the file and every op streams them in blocks. Each block
is read (pread, never a live mapping: a file truncated under a mapping kills the process with
SIGBUS) into one of two block buffers, the next block by a background thread while the current
one is computed, and each block's posterior becomes a float64 partial state
(gsa_kernels/_scaleout/partial.py) merged exactly into the running one by gk.merge_partials, so the
results are those of the in-memory mixture (ties across block edges included) and the anonymous
memory is the two buffers (`block_bytes` in all, per concurrent call) plus the [B, D] outputs,
whatever N is.

The file is data this process does not own: its identity (size, mtime_ns, inode) is taken at
from_points and checked at every call, and a file that changed (rewritten, truncated,
os.replace'd) raises PointsFileChanged; NaN / inf points raise a ValueError when read, as an
in-memory mixture does at construction; malformed headers give a ValueError naming the file.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from .. import ops
from .._core import _format
from .._core._args import PosteriorOperand, to_args
from . import partial

DEFAULT_BLOCK_BYTES = 256 * 2**20  # both block buffers together

_SAFETENSORS_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64}
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class PointsFileChanged(RuntimeError):
    """The points file of a file-backed mixture is not the file it was opened on (rewritten,
    truncated, replaced): the mixture's answers would mix two data sets."""


def _identity(st):
    """What names one version of a file: rewriting it changes mtime_ns (and usually size),
    os.replace changes the inode."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class PointsFile:
    """The layout of N points of D features in a file: row i's D values (dtype, C order) start
    at byte offset + i * row_stride. Read with pread, never mapped (a mapping of a file that
    someone truncates turns a read into SIGBUS); the file's identity (size, mtime_ns, inode) is
    taken when it is opened and checked at every call (open())."""

    def __init__(self, path, offset, dtype, N, D, row_stride, shape=None):
        self.path, self.offset, self.dtype = path, int(offset), np.dtype(dtype)
        self.N, self.D, self.row_stride = int(N), int(D), int(row_stride)
        self.shape = tuple(shape) if shape is not None else (self.N, self.D)
        if self.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"from_points: points must be float16, float32 or float64, got {self.dtype}")
        if self.N < 1 or self.D < 1:
            raise ValueError(f"from_points: points must be [N, ...] with N >= 1 and D >= 1, got N = {self.N}, D = {self.D}")
        if self.offset < 0 or self.row_stride < self.row_bytes:
            raise ValueError(f"from_points: invalid layout of {path}: offset {self.offset}, row stride {self.row_stride} "
                             f"< {self.row_bytes} bytes per row")
        st = os.stat(path)
        if self.end > st.st_size:
            raise ValueError(f"from_points: {path} is too short ({st.st_size} bytes) for {self.N} points of {self.D} "
                             f"{self.dtype} values at offset {self.offset} (needs {self.end} bytes): truncated?")
        self.identity = _identity(st)

    row_bytes = property(lambda self: self.D * self.dtype.itemsize)
    end = property(lambda self: self.offset + (self.N - 1) * self.row_stride + self.row_bytes)

    def layout(self) -> dict:
        return {"offset": self.offset, "dtype": self.dtype.str, "N": self.N, "D": self.D, "row_stride": self.row_stride,
                "shape": list(self.shape), "size": self.identity[0]}

    def open(self):
        """A raw file descriptor of the file, checked to be the file from_points opened."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise PointsFileChanged(f"the points file {self.path} of this file-backed mixture cannot be opened "
                                    f"any more ({e.strerror}): it was moved or deleted") from None
        try:
            self.check(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def check(self, fd):
        if _identity(os.fstat(fd)) != self.identity:
            raise PointsFileChanged(
                f"the points file {self.path} changed since this file-backed mixture was made (size, modification "
                "time or inode differ: rewritten, truncated or replaced); build a new one with "
                "GaussianMixture.from_points")

    def read_rows(self, fd, k0, nb, dst, staging=None):
        """Rows k0 .. k0 + nb into dst [nb, D] (numpy, the compute dtype), converting as needed."""
        if self.row_stride == self.row_bytes and self.dtype == dst.dtype and dst.flags.c_contiguous:
            self._pread(fd, memoryview(dst.reshape(-1).view(np.uint8)), self.offset + k0 * self.row_stride)
            return
        step = max(1, len(staging) // self.row_stride) if staging is not None else nb
        for j0 in range(0, nb, step):
            n = min(step, nb - j0)
            span = (n - 1) * self.row_stride + self.row_bytes
            buf = staging if staging is not None and len(staging) >= span else bytearray(span)
            self._pread(fd, memoryview(buf)[:span], self.offset + (k0 + j0) * self.row_stride)
            rows = np.ndarray((n, self.D), self.dtype, buffer=buf, strides=(self.row_stride, self.dtype.itemsize))
            np.copyto(dst[j0:j0 + n], rows, casting="unsafe")

    def _pread(self, fd, dst, at):
        done = 0
        while done < len(dst):  # os.preadv releases the GIL
            got = os.preadv(fd, [dst[done:]], at + done)
            if got <= 0:
                self.check(fd)  # truncated under us: that error, else an I/O error
                raise OSError(f"short read from {self.path} at byte {at + done}")
            done += got

    def take(self, idx: np.ndarray, dtype) -> np.ndarray:
        """Rows idx (any order, repeats) as [n, D] of dtype."""
        out = np.empty((len(idx), self.D), dtype)
        fd = self.open()
        try:
            order = np.argsort(idx, kind="stable")
            row = np.empty((1, self.D), dtype)
            last = -1
            for i in order:
                k = int(idx[i])
                if k != last:
                    self.read_rows(fd, k, 1, row)
                    last = k
                out[i] = row[0]
            self.check(fd)
        finally:
            os.close(fd)
        return out


def _bad_file(path, what):
    return ValueError(f"from_points: {path} is not a valid {what}")


def _safetensors_layout(path: str, key: Optional[str]):
    """One tensor of a .safetensors file (8-byte header length, JSON header with dtype / shape /
    data_offsets, then the data), every field checked against the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad_file(path, f"safetensors file: {size} bytes, shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _bad_file(path, f"safetensors file: its header claims {n} bytes, the file has {size - 8} after the length")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad_file(path, f"safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad_file(path, "safetensors file: its header is not a JSON object")
    names = [k for k in header if k != "__metadata__"]
    if key is None:
        if len(names) != 1:
            raise ValueError(f"from_points: {path} holds {len(names)} tensors {names}; name one with key=")
        key = names[0]
    if key not in header or key == "__metadata__":
        raise ValueError(f"from_points: {path} has no tensor {key!r} (it has {names})")
    info = header[key]
    try:
        dtype_name, shape, (begin, stop) = info["dtype"], [int(v) for v in info["shape"]], info["data_offsets"]
        begin, stop = int(begin), int(stop)
    except (TypeError, KeyError, ValueError):
        raise _bad_file(path, f"safetensors file: tensor {key!r} lacks a valid dtype / shape / data_offsets") from None
    if dtype_name not in _SAFETENSORS_DTYPES:
        raise _bad_file(path, f"safetensors file: tensor {key!r} has an unknown dtype {dtype_name!r}")
    dtype = _SAFETENSORS_DTYPES[dtype_name]
    if dtype is None:
        raise TypeError(f"from_points: tensor {key!r} of {path} is {dtype_name}; need F16, F32 or F64")
    dtype = np.dtype(dtype)
    if len(shape) < 2 or min(shape) < 0:
        raise ValueError(f"from_points: points must be [N, ...] with N >= 1, got shape {tuple(shape)}")
    if stop - begin != math.prod(shape) * dtype.itemsize or begin < 0 or 8 + n + stop > size:
        raise _bad_file(path, f"safetensors file: tensor {key!r} of shape {shape} has data_offsets [{begin}, {stop}] that "
                        f"disagree with its shape or lie beyond the file's {size} bytes")
    D = math.prod(shape[1:])
    return PointsFile(path, 8 + n + begin, dtype, shape[0], D, D * dtype.itemsize, shape), key


def _npy_layout(path: str):
    """A .npy file's array, from its header (numpy.lib.format), checked against the file's size."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read_header(f)
        except (ValueError, OSError, SyntaxError, TypeError) as e:
            raise _bad_file(path, f".npy file ({e})") from None
        offset = f.tell()
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"from_points: points must be float16, float32 or float64, got {dtype}")
    if len(shape) < 2:
        raise ValueError(f"from_points: points must be [N, ...] with N >= 1, got shape {tuple(shape)}")
    D = math.prod(shape[1:])
    if fortran and shape[0] > 1 and D > 1:
        raise ValueError(f"from_points: {path} is stored in Fortran order (column-major): a point's values are not "
                         "contiguous; save it in C order (np.save(path, np.ascontiguousarray(a)))")
    return PointsFile(path, offset, dtype, shape[0], D, D * dtype.itemsize, shape)


def _memmap_layout(arr: np.memmap):
    """Where a numpy.memmap (or a view of one: mm[1000:], mm[::2], mm[:, :10]) keeps its rows in
    its file: the view's own offset and row stride, taken from its address in the mapping."""
    if arr.filename is None or getattr(arr, "_mmap", None) is None:
        raise ValueError("from_points: this numpy.memmap has no file mapping behind it (pass the memmap itself "
                         "or a view of it, or a path)")
    if arr.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"from_points: points must be float16, float32 or float64, got {arr.dtype}")
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(f"from_points: points must be [N, ...] with N >= 1, got shape {arr.shape}")
    item = arr.dtype.itemsize
    want = [item * math.prod(arr.shape[i + 1:]) for i in range(1, arr.ndim)]  # a point's values in C order
    if (arr.shape[0] > 1 and arr.strides[0] <= 0) or any(st != w for st, w, n in zip(arr.strides[1:], want, arr.shape[1:])
                                                         if n > 1):
        raise ValueError(f"from_points: this numpy.memmap view (shape {arr.shape}, strides {arr.strides}) does not keep "
                         "each point's values contiguous in the file in order (Fortran order, a reversed or column-"
                         "strided view): write the points in C order to their own file")
    mapped = np.frombuffer(arr._mmap, np.uint8).ctypes.data
    start = arr.offset - arr.offset % mmap.ALLOCATIONGRANULARITY + arr.ctypes.data - mapped
    D = math.prod(arr.shape[1:])
    stride = arr.strides[0] if arr.shape[0] > 1 else D * item
    return PointsFile(os.path.abspath(arr.filename), start, arr.dtype, arr.shape[0], D, stride, arr.shape)


def open_points(points, key: Optional[str] = None):
    """A path (.npy / .safetensors) or numpy.memmap -> (PointsFile, source description for
    save()). Nothing is read but headers."""
    if isinstance(points, np.memmap):
        f = _memmap_layout(points)
        return f, {"kind": "raw", "path": f.path, **f.layout()}
    path = os.path.abspath(os.fspath(points))
    if not os.path.exists(path):
        raise FileNotFoundError(f"from_points: no such file {path}")
    if path.endswith(".npy"):
        f = _npy_layout(path)
        return f, {"kind": "npy", "path": path, **f.layout()}
    if path.endswith(".safetensors"):
        f, key = _safetensors_layout(path, key)
        return f, {"kind": "safetensors", "path": path, "key": key, **f.layout()}
    raise ValueError(f"from_points: a points file must end in .npy or .safetensors, got {path}")


_SOURCE_FIELDS = {"path": str, "offset": int, "dtype": str, "N": int, "D": int, "row_stride": int, "size": int}


def reopen(source) -> PointsFile:
    """The points of a source description written by save(), checked: the file must still have
    the layout and size it had then (a clear ValueError for a tampered or stale description)."""
    if not isinstance(source, dict) or source.get("kind") not in ("raw", "npy", "safetensors"):
        raise ValueError(f"GaussianMixture.load: the saved points source is not a valid description: {source!r}")
    for name, typ in _SOURCE_FIELDS.items():
        if not isinstance(source.get(name), typ) or isinstance(source.get(name), bool):
            raise ValueError(f"GaussianMixture.load: the saved points source lacks a valid {name!r} (a {typ.__name__}): "
                             f"{source!r}")
    path = source["path"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"GaussianMixture.load: the points file {path} of this saved mixture does not exist")
    if source["kind"] == "raw":
        try:
            dtype = np.dtype(source["dtype"])
        except TypeError:
            raise ValueError(f"GaussianMixture.load: the saved points dtype {source['dtype']!r} is not a dtype") from None
        f = PointsFile(path, source["offset"], dtype, source["N"], source["D"], source["row_stride"], source.get("shape"))
    elif source["kind"] == "npy":
        f = _npy_layout(path)
    else:
        f = _safetensors_layout(path, source.get("key"))[0]
    now = f.layout()
    for name in ("offset", "dtype", "N", "D", "row_stride", "size"):
        if now[name] != source[name]:
            raise ValueError(f"GaussianMixture.load: the points file {path} does not match this saved mixture any more "
                             f"({name} {now[name]!r}, saved {source[name]!r}): rewritten since save()?")
    return f


class StreamedMixture(PosteriorOperand):
    """An empirical mixture over points in a file (see the module docstring). Built by
    GaussianMixture.from_points; the ops and the model methods (denoise, score, logp, save)
    work as for an in-memory mixture. block_bytes: anonymous memory for the two point blocks."""

    def __init__(self, points, log_weights=None, block_bytes: int = DEFAULT_BLOCK_BYTES, key=None,
                 dtype: Optional[torch.dtype] = None):
        self._points, self.source = open_points(points, key)
        N = self._points.N
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

    num_components = property(lambda self: self._points.N)
    dim = property(lambda self: self._points.D)
    rank = property(lambda self: 0)
    device = property(lambda self: torch.device("cpu"))
    dtype = property(lambda self: self._dtype)

    def __repr__(self):
        return (f"StreamedMixture(N={self.num_components}, D={self.dim}, dtype={self.dtype}, "
                f"file={self.source['path']!r}, block_bytes={self.block_bytes})")

    def to(self, *args, **kwargs) -> "StreamedMixture":
        """A copy in another dtype (.to(dtype), .to("cpu"), .to(tensor), .to(device, dtype))."""
        device, dtype = to_args(args, kwargs, "StreamedMixture")
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
        """The mixture of save()'s tensors and metadata (GaussianMixture.load), every field
        checked: a clear ValueError for tampered metadata or a points file that changed."""
        m = cls.__new__(cls)
        try:
            source = json.loads(metadata.get("source", ""))
        except ValueError:
            raise ValueError("GaussianMixture.load: the saved StreamedMixture's 'source' metadata is not JSON") from None
        m._points = reopen(source)
        m.source = source
        try:
            m.block_bytes = int(metadata.get("block_bytes", ""))
        except ValueError:
            m.block_bytes = 0
        if m.block_bytes <= 0:
            raise ValueError(f"GaussianMixture.load: block_bytes must be a positive int, got {metadata.get('block_bytes')!r}")
        lw = tensors["log_weights"]
        if lw.dtype not in (torch.float32, torch.float64) or lw.shape != (m._points.N,):
            raise ValueError(f"GaussianMixture.load: log_weights must be float32 / float64 [N] = [{m._points.N}], got "
                             f"{lw.dtype} {tuple(lw.shape)}")
        if torch.isnan(lw).any() or torch.isposinf(lw).any() or torch.isneginf(lw).all():
            raise ValueError("GaussianMixture.load: log_weights must be finite or -inf, with at least one finite")
        m.log_weights = lw
        m._dtype = lw.dtype
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

    def posterior(self, backend, x2, sigma, need_denoised, need_weights, params, score_rule=None):
        return mixture_posterior(x2, sigma, self, need_denoised, need_weights, backend, score_rule)

    def sample(self, n: int, generator: Optional[torch.Generator] = None):
        """n training points drawn by weight, [n, D] (the delta mixture's samples)."""
        k = torch.multinomial(self.log_weights.double().exp(), n, replacement=True, generator=generator)
        np_dtype = torch.empty(0, dtype=self._dtype).numpy().dtype
        out = torch.from_numpy(self._points.take(k.numpy(), np_dtype))
        _check_finite(out, k.numpy(), self._points)
        return out


def _check_finite(block, rows, points: PointsFile):
    """NaN / inf points are an error, as for an in-memory mixture (there at construction; a file
    is checked block by block as it is read). rows: the block's first row number or its rows."""
    bad = ~torch.isfinite(block).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        row = rows + i if isinstance(rows, int) else int(rows[i])
        raise ValueError(f"from_points: point {row} of {points.path} contains NaN or inf (points must be finite)")


def _blocks(points: PointsFile, bufs):
    """Yield (k0, block [nb, D] tensor) over the points, each block read (pread) into one of the
    two buffers `bufs` ([rows, D] each); the next block is read by a background thread while the
    caller computes. A yielded block is valid until the next one is requested; once the
    generator is closed, no read is in flight. The file is opened once, checked to be the file
    from_points opened, and checked again after the last block."""
    N = points.N
    rows = bufs[0].shape[0]
    views = [b.numpy() for b in bufs]
    direct = points.row_stride == points.row_bytes and points.dtype == views[0].dtype
    # rows in another dtype or with a stride: read into a staging buffer a quarter of a block
    staging = None if direct else bytearray(max(points.row_stride, views[0].nbytes // 4))
    fd = points.open()

    def read(j):
        k0 = j * rows
        nb = min(rows, N - k0)
        points.read_rows(fd, k0, nb, views[j % 2][:nb], staging)
        return k0, nb

    num = (N + rows - 1) // rows
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="gsa-read-ahead") as pool:
            pending = pool.submit(read, 0)
            for j in range(num):
                k0, nb = pending.result()
                if j + 1 < num:
                    pending = pool.submit(read, j + 1)  # into the other buffer
                else:
                    points.check(fd)  # rewritten while this call read it
                yield k0, bufs[j % 2][:nb]
    finally:
        os.close(fd)


def mixture_posterior(x2, sigma, m: StreamedMixture, need_denoised, need_weights, backend, score_rule=None):
    """The kernel-level mixture_posterior of a streamed mixture on `backend` (a _backends.Backend
    row, resolved by ops.py): x2 [B, D] contiguous, sigma [B] in the compute dtype. Each block
    goes to the chosen backend as an r = 0 mixture with the block's (globally normalised) log weights; its posterior becomes a
    float64 partial state (partial.exact_state: a float32 block's logp refined from its heaviest
    point), merged into the running one with gk.merge_partials, so that points on either side
    of a block edge weigh as in one kernel. score_rule (ops.stable_score): each block's state
    carries the block's score instead of its denoised mean, and so does the first output."""
    cd = sigma.dtype
    out_dtype, x2 = x2.dtype, x2.to(cd)  # half-precision x: blocks' outputs in the compute dtype until the merge
    B, D = x2.shape
    kernel = backend.kernel("mixture_posterior", x2.device.type)
    logw = m.log_weights.to(cd)
    state, parts = None, []  # parts: (block weights, block logp) for return_weights
    # a recorded graph keeps each block for backward, but the next read reuses its buffer: the
    # graph then gets its own copy of every block (backward holds the points read, as in memory)
    records = torch.is_grad_enabled() and x2.requires_grad
    bufs = m._take_buffers(cd)
    blocks = _blocks(m._points, bufs)
    try:
        for k0, block in blocks:
            if records:
                block = block.clone()
            nb = block.shape[0]
            _check_finite(block, k0, m._points)
            zeros = (block.new_zeros(nb, D, 0), block.new_zeros(nb, 0), block.new_zeros(nb))
            den_b, logp_b, w_b = kernel(x2, block, *zeros, logw[k0:k0 + nb], sigma, need_denoised, True)  # weights: the refinement
            if score_rule is not None:
                den_b = score_rule(backend, x2, sigma, (block, *zeros, logw[k0:k0 + nb]), den_b, w_b)
            block_state = partial.exact_state(den_b if need_denoised else x2.new_zeros(B, 0), logp_b, w_b, x2, block, *zeros,
                                              logw[k0:k0 + nb], sigma, (D,), out_dtype)
            state = block_state if state is None else partial.merge_partials([state, block_state])
            if need_weights:
                parts.append((w_b, block_state))
    finally:
        blocks.close()  # the read-ahead thread is done with the buffers before another call takes them
        m._return_buffers(bufs)
    # a row without weight anywhere (NaN in x) gets NaN, as from the in-memory kernel: 0 / 0
    den = (state.weighted / state.sum_exp[:, None]).to(out_dtype) if need_denoised else x2.new_empty((0,), dtype=out_dtype)
    if need_weights:  # block k's weights times its share of the whole posterior, in float64
        weights = torch.cat([(w_b.double() * partial.weight_share(st, state)[:, None]).to(cd) for w_b, st in parts], 1)
    else:
        weights = x2.new_empty((0,), dtype=cd)
    return den, state.logp().to(cd), weights
