"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a denoiser wrapper.

    eps~(x, c) = (1 + w) eps(x, c) - w eps(x, null)

``w = 0`` is the plain conditional model; ``w > 0`` sharpens towards class ``c``. In score terms
``grad log p~(x|c) = grad log p(x|c) + w (grad log p(x|c) - grad log p(x))``. The "guidance scale"
of other libraries (diffusers, Stable Diffusion) is ``s = 1 + w``: ``s = 1`` means no guidance.
Because it is a denoiser itself, it composes with every sampler. It never clips ``x_0``: clipping
is one outer :class:`~diffusion_core.denoiser.ClipX0` around the guided denoiser.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_core.denoiser import (
    DenoiserLike,
    DenoiserOutput,
    process_coeffs,
    scalar_time,
    time_batch,
)
from diffusion_core.parameterization import x0_from_eps


class ClassifierFreeGuidance:
    """Guided denoiser; the conditional and the null-label pass run as ONE batched forward."""

    def __init__(self, denoiser: DenoiserLike, w: float, null_label: int | None = None):
        if w < 0:
            raise ValueError(f"guidance weight w must be >= 0, got {w}")
        null = null_label if null_label is not None else getattr(denoiser, "null_label", None)
        if null is None:
            raise ValueError("classifier-free guidance needs a class-conditional model with a "
                             "null label (num_classes > 0)")
        self.denoiser, self.w, self.null_label = denoiser, float(w), int(null)
        self.process = denoiser.process

    @staticmethod
    def from_scale(denoiser: DenoiserLike, scale: float, null_label: int | None = None):
        """Build from the ``s = 1 + w`` convention (diffusers' ``guidance_scale``)."""
        return ClassifierFreeGuidance(denoiser, scale - 1.0, null_label)

    def __call__(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> DenoiserOutput:
        if labels is None:
            # unconditional sampling of a conditional network: the null label, no guidance
            return self.denoiser(x, t, None)
        if self.w == 0.0:
            return self.denoiser(x, t, labels)
        null = torch.full_like(labels, self.null_label)
        # one host-side time stays a scalar (no device copy); per-sample times are doubled
        t2 = t if scalar_time(t) is not None else torch.cat([time_batch(t, x)] * 2)
        out = self.denoiser(torch.cat([x, x]), t2, torch.cat([labels, null]))
        eps_c, eps_u = out.eps.chunk(2)
        eps = (1.0 + self.w) * eps_c - self.w * eps_u
        alpha, sigma, _ = process_coeffs(self.process, t, x)
        return DenoiserOutput(eps, x0_from_eps(x, eps, alpha, sigma))
