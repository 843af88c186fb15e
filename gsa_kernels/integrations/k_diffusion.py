"""Teleport into k-diffusion's samplers (k-diffusion 0.1.x: `k_diffusion.sampling.sample_*`).

k-diffusion works in the EDM convention already: a model is `model(x, sigma [B], **extra_args)
-> x0` and a sampler `sample_*(model, x, sigmas, extra_args=..., disable=...)` runs x from
sigmas[0] down the schedule. Teleporting = one closed-form jump of x to a sigma inside the
schedule, then the unchanged sampler on the truncated schedule.

    import k_diffusion as K
    from gsa_kernels.integrations import k_diffusion as gkk
    sigmas = K.sampling.get_sigmas_karras(30, 0.002, 80.0)
    x = torch.randn(16, 3, 32, 32) * sigmas[0]
    out = gkk.sample(model, x, sigmas, g, K.sampling.sample_heun, skip_fraction=0.3)

Class-conditional: m = GaussianMixture.fit_per_class(data, labels) and labels=y [B]; each row
jumps with its class's Gaussian and the model gets extra_args[labels_key] = y ("class_cond", the
name k-diffusion's class-conditional models take, by default).
"""
from __future__ import annotations

from typing import Optional

import k_diffusion  # noqa: F401  (fail early with ImportError when the extra is missing)
import torch

from .. import schedules
from ..sampling import HybridDenoiser, teleport_with_model

__all__ = ["HybridDenoiser", "teleport_sigmas", "sample"]


def teleport_sigmas(sigmas: torch.Tensor, *, skip_fraction: Optional[float] = None,
                    teleport_to: Optional[float] = None) -> torch.Tensor:
    """The schedule left after a teleport: sigmas[k:] with k = schedules.skip_index(steps,
    skip_fraction), or [teleport_to] + the sigmas below it. Keeps the dtype and device of sigmas."""
    if (skip_fraction is None) == (teleport_to is None):
        raise ValueError("give exactly one of skip_fraction and teleport_to")
    if skip_fraction is not None:
        return sigmas[schedules.skip_index(sigmas.shape[0] - 1, skip_fraction):]
    return schedules.truncate(sigmas.detach().cpu(), teleport_to).to(sigmas)


def sample(model, x: torch.Tensor, sigmas: torch.Tensor, gaussian, sampler=None, *,
           skip_fraction: Optional[float] = None, teleport_to: Optional[float] = None,
           extra_args: Optional[dict] = None, labels: Optional[torch.Tensor] = None,
           labels_key: Optional[str] = "class_cond", **sampler_kwargs) -> torch.Tensor:
    """Run a k-diffusion sampler (default `k_diffusion.sampling.sample_heun`) from x at
    sigmas[0], its first steps replaced by the closed-form flow of `gaussian` (a GaussianModel,
    or a GaussianMixture: its moment-matched Gaussian). The model is evaluated only on the
    truncated schedule, so the sampler spends its usual NFE on the remaining steps.
    labels [B] int64 (class-conditional): a GaussianMixture `gaussian` is one component per class
    (row b jumps with component labels[b]; a GaussianModel serves every class); the model gets them as
    extra_args[labels_key] (labels_key=None: not passed; put them in extra_args yourself).
    sampler_kwargs go to the sampler (tqdm is off unless disable=False is passed)."""
    if sampler is None:
        sampler = k_diffusion.sampling.sample_heun
    rest = teleport_sigmas(sigmas, skip_fraction=skip_fraction, teleport_to=teleport_to)
    if labels is not None and labels_key is not None:
        if labels_key in (extra_args or {}):
            raise ValueError(f"labels given twice: as labels= and as extra_args[{labels_key!r}]")
        extra_args = {**(extra_args or {}), labels_key: labels}
    if float(rest[0]) < float(sigmas[0]):
        x = teleport_with_model(x, float(sigmas[0]), float(rest[0]), None, gaussian, labels)
    sampler_kwargs.setdefault("disable", True)
    return sampler(model, x, rest, extra_args=extra_args, **sampler_kwargs)
