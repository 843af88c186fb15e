"""A small EDM-preconditioned denoiser for 28x28 MNIST (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", Table 1):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2)   c_out = sigma sd / sqrt(sigma^2 + sd^2)
    c_in   = 1 / sqrt(sigma^2 + sd^2)  c_noise = ln(sigma) / 4          (sd = sigma_data)

F is a small U-Net on the pixel-unshuffled image (14x14 with 32 channels, 7x7 with 64, residual
blocks with FiLM noise conditioning), about 0.3 M parameters (1.2 MB in float32). The
class-conditional variant (num_classes=10) adds a learned class embedding to the noise embedding.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

SIGMA_DATA = 0.5
DENOISER_FILE = "mnist_edm_denoiser.safetensors"
CONDITIONAL_DENOISER_FILE = "mnist_edm_denoiser_conditional.safetensors"
NUM_CLASSES = 10


class FourierEmbedding(nn.Module):
    """c_noise -> [B, dim] sinusoids at fixed log-spaced frequencies."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), dim // 2)), persistent=False)

    def forward(self, c_noise):
        a = c_noise[:, None] * self.freqs[None]
        return torch.cat([a.cos(), a.sin()], 1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the noise embedding as a per-channel scale and shift."""

    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class UNet(nn.Module):
    """F(x_in [B, 1, 28, 28], c_noise [B]) -> [B, 1, 28, 28]. The 28x28 image is folded into
    4 x 14 x 14 (pixel unshuffle, lossless) so that every conv runs at 14x14 or 7x7: a CPU
    budget of ~20 MFLOP per image."""

    def __init__(self, ch=(32, 64), emb_dim=128, num_classes=None):
        super().__init__()
        c1, c2 = ch
        self.embed = nn.Sequential(FourierEmbedding(emb_dim), nn.Linear(emb_dim, emb_dim), nn.SiLU(),
                                   nn.Linear(emb_dim, emb_dim), nn.SiLU())
        if num_classes is not None:  # zero-initialised: starts as the unconditional network it is tuned from
            self.class_embed = nn.Embedding(num_classes, emb_dim)
            nn.init.zeros_(self.class_embed.weight)
        self.inp = nn.Conv2d(4, c1, 3, padding=1)
        self.enc1 = ResBlock(c1, c1, emb_dim)                       # 14x14
        self.down = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid1, self.mid2 = ResBlock(c2, c2, emb_dim), ResBlock(c2, c2, emb_dim)  # 7x7
        self.up = nn.Conv2d(c2, c1, 3, padding=1)
        self.dec1 = ResBlock(2 * c1, c1, emb_dim)                   # 14x14
        self.out_norm, self.out = nn.GroupNorm(8, c1), nn.Conv2d(c1, 4, 3, padding=1)

    def forward(self, x, c_noise, labels=None):
        emb = self.embed(c_noise)
        if hasattr(self, "class_embed"):
            if labels is None:
                raise ValueError("this network is class-conditional: pass labels [B] (int64 class indices)")
            emb = emb + self.class_embed(labels)
        elif labels is not None:
            raise ValueError("this network is unconditional: it takes no labels")
        h1 = self.enc1(self.inp(F.pixel_unshuffle(x, 2)), emb)
        h = self.mid2(self.mid1(self.down(h1), emb), emb)
        h = self.up(F.interpolate(h, size=h1.shape[-2:], mode="nearest"))
        h = self.dec1(torch.cat([h, h1], 1), emb)
        return F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), 2)


class EDMDenoiser(nn.Module):
    """D(x, sigma) -> x0 estimate with EDM preconditioning. x: [B, 1, 28, 28] or [B, 784];
    sigma: float, 0-d or [B] tensor (> 0); labels: [B] int64 classes, for a class-conditional
    network (num_classes set) only. Output has x's shape. Usable directly as the
    `denoiser(x, sigma)` (conditional: `denoiser(x, sigma, labels=y)`) of gk.sampling."""

    def __init__(self, sigma_data=SIGMA_DATA, num_classes=None):
        super().__init__()
        self.sigma_data = sigma_data
        self.num_classes = num_classes
        self.net = UNet(num_classes=num_classes)

    def forward(self, x, sigma, labels=None):
        shape = x.shape
        x = x.reshape(shape[0], 1, 28, 28).float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(shape[0])
        s2, sd2 = sigma ** 2, self.sigma_data ** 2
        c_skip = (sd2 / (s2 + sd2))[:, None, None, None]
        c_out = (sigma * self.sigma_data / (s2 + sd2).sqrt())[:, None, None, None]
        c_in = (1 / (s2 + sd2).sqrt())[:, None, None, None]
        c_noise = sigma.log() / 4
        if labels is not None:
            labels = torch.as_tensor(labels, device=x.device).reshape(-1).expand(shape[0])
        out = c_skip * x + c_out * self.net(c_in * x, c_noise, labels)
        return out.reshape(shape)

    def loss(self, x0, generator=None, p_mean=-1.2, p_std=1.2, labels=None):
        """EDM training loss: ln sigma ~ N(p_mean, p_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2,
        i.e. unit-variance targets for F. labels [B]: the classes of x0 (conditional network).
        Returns the batch mean."""
        B = x0.shape[0]
        sigma = (torch.randn(B, generator=generator) * p_std + p_mean).exp().to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        err = (self(x0 + sigma[:, None, None, None] * noise, sigma, labels) - x0) ** 2
        return (weight * err.flatten(1).mean(1)).mean()


def load_denoiser(path=None, conditional=False) -> EDMDenoiser:
    """The committed demo network (gsa_kernels/assets/mnist_edm_denoiser.safetensors, or with
    conditional=True the class-conditional mnist_edm_denoiser_conditional.safetensors), in eval mode."""
    from safetensors.torch import load_file

    from .data import ASSETS_DIR

    net = EDMDenoiser(num_classes=NUM_CLASSES if conditional else None)
    net.load_state_dict(load_file(str(path or ASSETS_DIR / (CONDITIONAL_DENOISER_FILE if conditional else DENOISER_FILE))))
    return net.eval().requires_grad_(False)
