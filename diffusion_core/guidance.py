"""Guidance as denoiser wrappers: classifier-free guidance and autoguidance.

Classifier-free guidance (Ho & Salimans 2022, eq. 6):

    eps~(x, c) = (1 + w) eps(x, c) - w eps(x, null)

``w = 0`` is the plain conditional model; ``w > 0`` sharpens towards class ``c``. In score terms
``grad log p~(x|c) = grad log p(x|c) + w (grad log p(x|c) - grad log p(x))``. The "guidance scale"
of other libraries (diffusers, Stable Diffusion) is ``s = 1 + w``: ``s = 1`` means no guidance.
Because it is a denoiser itself, it composes with every sampler. It never clips ``x_0``: clipping
is one outer :class:`~diffusion_core.denoiser.ClipX0` around the guided denoiser.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself",
eq. 2, written with the same ``w``):

    D~(x; t) = (1 + w) D_1(x; t) - w D_0(x; t)

with ``D_1`` the model and ``D_0`` a weaker version of it (a smaller one, or an earlier snapshot
of the same training run). Where the two agree nothing changes; where the weak model puts mass
that the good one does not (the blurry, malformed outliers), the difference points away from it.
It needs no labels, so it also guides unconditional models. The weights sum to one, so mixing
``eps``, ``x_0`` or ``v`` is the same combination.
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


class AutoGuidance:
    """``(1 + w) D_good - w D_guide`` (Karras et al. 2024, eq. 2), around two denoisers of the
    same process; two forward passes per call (the networks differ). Labels go to both."""

    def __init__(self, denoiser: DenoiserLike, guide: DenoiserLike, w: float):
        if w < 0:
            raise ValueError(f"autoguidance weight w must be >= 0, got {w}")
        if guide.process.describe() != denoiser.process.describe():
            raise ValueError("autoguidance needs a guide trained on the same noise process as the "
                             "model")
        self.denoiser, self.guide, self.w = denoiser, guide, float(w)
        self.process = denoiser.process
        self.null_label = getattr(denoiser, "null_label", None)  # for an outer guidance

    def __call__(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> DenoiserOutput:
        out = self.denoiser(x, t, labels)
        if self.w == 0.0:
            return out
        weak = self.guide(x, t, labels)
        eps = (1.0 + self.w) * out.eps - self.w * weak.eps
        alpha, sigma, _ = process_coeffs(self.process, t, x)
        return DenoiserOutput(eps, x0_from_eps(x, eps, alpha, sigma))


def network_evaluations(denoiser: DenoiserLike, labelled: bool) -> int:
    """Network evaluations per image in one call of ``denoiser`` (a plain denoiser or a stack
    of wrappers), so that a sampler's count of denoiser calls becomes an honest NFE.

    Classifier-free guidance with ``w > 0`` and labels runs the conditional and the null-label
    pass as one batch of twice the images: 2 evaluations per image, as the literature counts
    them. Autoguidance runs the model and its guide: the sum of both. Wrappers that only
    transform the output (:class:`~diffusion_core.denoiser.ClipX0`) add none. So an autoguided
    sampler of N calls costs 2N, a guided one 2N, both together 4N.
    """
    if isinstance(denoiser, ClassifierFreeGuidance):
        inner = network_evaluations(denoiser.denoiser, labelled)
        return inner * (2 if labelled and denoiser.w > 0 else 1)
    if isinstance(denoiser, AutoGuidance):
        inner = network_evaluations(denoiser.denoiser, labelled)
        return inner + (network_evaluations(denoiser.guide, labelled) if denoiser.w > 0 else 0)
    wrapped = getattr(denoiser, "denoiser", None)
    return network_evaluations(wrapped, labelled) if wrapped is not None else 1
