"""Local score machines (Kamb & Ganguli, ICML 2025, arXiv 2412.20292): the optimal denoisers
under locality and translation equivariance, posteriors over training *patches*.

    m = gk.LocalScoreMachine(images, mode="ls" | "els" | "bbels", padding="zeros" | "circular")
    out = gk.local_denoise(x, sigma, m, patch_size, backend="auto")   # x [B, C, H, W]
    s = gk.local_score(x, sigma, m, patch_size, backend="auto")

For pixel u of a query x, a candidate is a training image n windowed at pixel v (P x P, P odd);
its weight is softmax(-|x_{window u} - images[n]_{window v}|^2 / (2 sigma^2)) over u's
candidates and its value images[n, :, v]: LS takes v = u, ELS every v, BB-ELS every v in u's
boundary class (zeros padding). The denoiser is the weighted mean of the values; the score
(denoiser - x) / sigma^2, computed as sum w (value - x_u) / sigma^2 (no cancellation). The math,
dtypes and the NaN rule are the kernel contract's (_contract.py); one call is one launch of the
kernel-level op local_posterior on the chosen backend. Memory: the CPU kernel streams the
training images in blocks of 16 (float) / 8 (double) with an online softmax per pixel: about
HW (1 + 16 (C + 1)) doubles of state and two (H + P - 1) x (W + P - 1) planes of 16 floats per
task (~0.5 MiB at MNIST size, P = 7), never the N HW x HW logits.

Also here: LocalDenoiser (a sampler denoiser with a patch size per noise level) and
calibrate_patch_size (per sigma, the P whose machine best matches a given denoiser, r^2).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence, Union

import torch

from . import ops
from ._core._args import LocalMode, LocalPadding, SpectralKind

__all__ = ["LocalScoreMachine", "local_denoise", "local_score"]

MODES = {"ls": LocalMode.LS, "els": LocalMode.ELS, "bbels": LocalMode.BBELS}
PADDINGS = {"zeros": LocalPadding.ZEROS, "circular": LocalPadding.CIRCULAR}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _images_from(images, key):
    """A tensor [N, C, H, W] from a tensor, a numpy array / memmap or a .npy / .safetensors path.
    A float32 / float64 memmap or .npy file is used in place (pages are read as the kernel streams
    over the images); other dtypes are converted (a copy)."""
    import numpy as np

    if isinstance(images, (str, os.PathLike)):
        path = str(images)
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                names = list(f.keys())
                if key is None and len(names) != 1:
                    raise ValueError(f"LocalScoreMachine: {path} holds {names}: say which with key=...")
                images = f.get_tensor(key if key is not None else names[0])
        else:
            images = np.load(path, mmap_mode="r")
    if isinstance(images, np.ndarray):
        if images.dtype not in (np.float32, np.float64):
            images = images.astype(np.float32)
        import warnings

        with warnings.catch_warnings():  # a read-only memmap: the kernels never write to images
            warnings.simplefilter("ignore", UserWarning)
            images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"LocalScoreMachine: images must be a tensor, a numpy array or a .npy / .safetensors path, "
                        f"got {type(images).__name__}")
    return images


class LocalScoreMachine:
    """The training images [N, C, H, W] of a local score machine, its mode ("ls", "els",
    "bbels") and padding ("zeros", "circular"). A model like the others: `.to(device, dtype)`,
    `save(path)` / `load(path)`; `denoise` / `score` call the public ops."""

    def __init__(self, images, mode: str = "els", padding: str = "zeros", *, key: Optional[str] = None):
        images = _images_from(images, key)
        if images.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"LocalScoreMachine: images must be float16, bfloat16, float32 or float64, got {images.dtype}")
        if images.dim() != 4:
            raise ValueError(f"LocalScoreMachine: images must be [N, C, H, W], got shape {tuple(images.shape)} "
                             "(a single channel: images[:, None])")
        if min(images.shape) == 0:
            raise ValueError(f"LocalScoreMachine: images must be [N, C, H, W] with every size >= 1, got {tuple(images.shape)}")
        if mode not in MODES:
            raise ValueError(f"LocalScoreMachine: mode must be one of {tuple(MODES)}, got {mode!r}")
        if padding not in PADDINGS:
            raise ValueError(f"LocalScoreMachine: padding must be one of {tuple(PADDINGS)}, got {padding!r}")
        if mode == "bbels" and padding != "zeros":
            raise ValueError("LocalScoreMachine: mode 'bbels' (boundary-broken ELS) is defined for padding='zeros' "
                             f"only, got padding={padding!r}")
        self.images, self.mode, self.padding = images, mode, padding
        self._cast = {}  # compute dtype -> images contiguous in it (the op's operand)

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    @property
    def device(self):
        return self.images.device

    @property
    def dtype(self):
        return self.images.dtype

    def __repr__(self):
        return (f"LocalScoreMachine(N={self.num_images}, shape={self.image_shape}, mode={self.mode!r}, "
                f"padding={self.padding!r}, dtype={self.dtype}, device={self.device})")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_cast"}

    def __setstate__(self, state):
        self.__dict__.update(state, _cast={})

    def operand(self, dtype: torch.dtype) -> torch.Tensor:
        """The images in `dtype`, contiguous (kept per dtype: the ops call this every time)."""
        t = self._cast.get(dtype)
        if t is None:
            t = self.images.to(dtype).contiguous()
            self._cast[dtype] = t
        return t

    def to(self, device=None, dtype=None) -> "LocalScoreMachine":
        return LocalScoreMachine(self.images.to(device=device, dtype=dtype), self.mode, self.padding)

    def state_dict(self):
        return {"images": self.images}

    def save(self, path):
        from safetensors.torch import save_file

        save_file({"images": self.images.detach().cpu().contiguous()}, str(path),
                  metadata={"gsa_kernels": "LocalScoreMachine", "mode": self.mode, "padding": self.padding})

    @classmethod
    def load(cls, path, device="cpu") -> "LocalScoreMachine":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("gsa_kernels") != "LocalScoreMachine":
                raise ValueError(f"{path} is not a saved LocalScoreMachine (it holds {meta.get('gsa_kernels')!r})")
            return cls(f.get_tensor("images"), meta["mode"], meta["padding"])

    def denoise(self, x, sigma, patch_size: int, backend: str = "auto"):
        return local_denoise(x, sigma, self, patch_size, backend)

    def score(self, x, sigma, patch_size: int, backend: str = "auto"):
        return local_score(x, sigma, self, patch_size, backend)


def _check_patch_size(patch_size, op):
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise TypeError(f"{op}: patch_size must be an odd int >= 1, got {type(patch_size).__name__}")
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"{op}: patch_size must be an odd int >= 1 (a window centred on the pixel), got {patch_size}")


def _local(x, sigma, m, patch_size, kind, backend, op):
    if not isinstance(m, LocalScoreMachine):
        raise TypeError(f"{op}: expected a gsa_kernels.LocalScoreMachine, got {type(m).__name__}")
    _check_patch_size(patch_size, op)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 4 or tuple(x.shape[1:]) != m.image_shape:
        raise ValueError(f"{op}: x must be [B, C, H, W] with the machine's C, H, W = {m.image_shape}, "
                         f"got shape {tuple(x.shape)}")
    if m.device != x.device:
        raise ValueError(f"{op}: the machine is on {m.device} but x is on {x.device}; call m.to({str(x.device)!r})")
    return ops.local_posterior(x, sigma, m, patch_size, MODES[m.mode], PADDINGS[m.padding], kind, backend, op)


def local_denoise(x, sigma: Union[float, torch.Tensor], m: LocalScoreMachine, patch_size: int, backend: str = "auto"):
    """The local machine's denoiser: x [B, C, H, W] (float16 / bfloat16 / float32 / float64),
    sigma a float, 0-d or [B] -> [B, C, H, W] in x's dtype. A NaN in x[b] makes out[b] NaN."""
    return _local(x, sigma, m, patch_size, SpectralKind.DENOISE, backend, "local_denoise")


def local_score(x, sigma: Union[float, torch.Tensor], m: LocalScoreMachine, patch_size: int, backend: str = "auto"):
    """The local machine's score (denoiser - x) / sigma^2, computed without cancellation."""
    return _local(x, sigma, m, patch_size, SpectralKind.SCORE, backend, "local_score")


# Autograd: the registry's rule (_contract.REGISTRY["local_posterior"], _autograd.local_posterior_rule):
# the gradient w.r.t. x is reference.local_posterior_vjp, float64 PyTorch, for the compiled ops too.


# ----------------------------------------------------------------------------- sampling


class LocalDenoiser:
    """A sampler denoiser f(x, sigma) -> x0 (gk.sampling.sample, HybridDenoiser, k-diffusion)
    from a LocalScoreMachine with a patch size per noise level: an odd int, or a callable
    sigma (float) -> odd int (e.g. the table calibrate_patch_size returns, through
    `patch_schedule`). Rows with different sigmas and patch sizes go in one call per size.
    Extra keyword arguments (class labels, ...) are ignored. `calls` counts kernel calls."""

    def __init__(self, machine: LocalScoreMachine, patch_size: Union[int, Callable[[float], int]],
                 backend: str = "auto"):
        if not isinstance(machine, LocalScoreMachine):
            raise TypeError(f"LocalDenoiser: machine must be a LocalScoreMachine, got {type(machine).__name__}")
        if not callable(patch_size):
            _check_patch_size(patch_size, "LocalDenoiser")
        self.machine, self.patch_size, self.backend = machine, patch_size, backend
        self.calls = 0

    def patch_size_at(self, sigma: float) -> int:
        P = self.patch_size(float(sigma)) if callable(self.patch_size) else self.patch_size
        _check_patch_size(P, "LocalDenoiser: patch_size(sigma)")
        return P

    def __call__(self, x, sigma, **extra_args):
        B = x.shape[0]
        sig = sigma.to(torch.float64).reshape(-1).expand(B) if isinstance(sigma, torch.Tensor) else torch.full(
            (B,), float(sigma), dtype=torch.float64)
        sizes = [self.patch_size_at(s) for s in sig.tolist()]
        out = torch.empty_like(x)
        for P in sorted(set(sizes)):
            rows = torch.tensor([i for i, q in enumerate(sizes) if q == P], device=x.device)
            sub = sigma if not isinstance(sigma, torch.Tensor) or sigma.dim() == 0 else sigma[rows]
            out[rows] = local_denoise(x[rows], sub, self.machine, P, self.backend)
            self.calls += 1
        return out


def patch_schedule(table: dict) -> Callable[[float], int]:
    """sigma -> P from a {sigma: P} table (calibrate_patch_size's): the P of the nearest
    calibrated sigma in log sigma."""
    keys = sorted(table)

    def pick(sigma: float) -> int:
        best = min(keys, key=lambda s: abs(math.log(max(sigma, 1e-30)) - math.log(s)))
        return table[best]

    return pick


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - |pred - target|^2 / |target - mean(target)|^2 over everything (the paper's r^2)."""
    pred, target = pred.double().flatten(), target.double().flatten()
    return 1.0 - float(((pred - target) ** 2).sum() / ((target - target.mean()) ** 2).sum().clamp_min(1e-300))


def calibrate_patch_size(machine: LocalScoreMachine, denoiser, images: torch.Tensor, sigmas: Sequence[float],
                         patch_sizes: Sequence[int] = (1, 3, 5, 7, 9, 11, 13, 15), *, seed: int = 0,
                         backend: str = "auto"):
    """Per sigma, the patch size whose machine output best matches `denoiser` (a callable
    (x, sigma) -> x0, e.g. a network) on held-out `images` [M, C, H, W] noised at that sigma
    (one noise draw per sigma, from `seed`), as Kamb & Ganguli calibrate. Returns
    ({sigma: best P}, {sigma: {P: r^2}})."""
    best, scores = {}, {}
    gen = torch.Generator().manual_seed(seed)
    for s in sigmas:
        noise = torch.randn(images.shape, generator=gen, dtype=torch.float64).to(images.device, images.dtype)
        x = images + float(s) * noise
        with torch.no_grad():
            target = denoiser(x, float(s))
        scores[float(s)] = {P: r_squared(local_denoise(x, float(s), machine, P, backend), target) for P in patch_sizes}
        best[float(s)] = max(scores[float(s)], key=scores[float(s)].get)
    return best, scores
