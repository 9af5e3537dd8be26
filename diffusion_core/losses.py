"""One denoising loss for every process (Ho et al. 2020, eq. 14; Song et al. 2021, eq. 7).

    L = E_{t, x_0, eps} || net(c_in x_t, t, c) - target(x_0, eps) ||^2,   x_t = alpha x_0 + sigma eps

With the eps target this is denoising score matching with weighting ``lambda(t) = sigma(t)^2``
(since ``sigma^2 || s_theta + eps / sigma ||^2 = || eps_theta - eps ||^2``); the x0 and v targets give
the SNR and SNR+1 weightings of the same objective (Salimans & Ho 2022). ``t`` comes from the
process's own training distribution (uniform steps for DDPM, ``U(t_min, 1)`` for the SDEs).
Classifier-free guidance training replaces each label by the null label with probability
``p_uncond`` (Ho & Salimans 2022, Algorithm 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_core.denoiser import input_scale
from diffusion_core.parameterization import training_target
from diffusion_core.processes import NoiseProcess, broadcast


def drop_labels(labels: Tensor, p_uncond: float, null_label: int,
                generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_label`` with probability ``p_uncond``."""
    if p_uncond <= 0:
        return labels
    dev = generator.device if generator is not None else labels.device
    drop = torch.rand(labels.shape, generator=generator, device=dev).to(labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def denoising_loss(
    net: nn.Module,
    process: NoiseProcess,
    x0: Tensor,
    labels: Tensor | None = None,
    *,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    p_uncond: float = 0.0,
    null_label: int | None = None,
) -> Tensor:
    """Mean squared error of ``net`` on one batch; all randomness comes from ``generator``."""
    b = x0.shape[0]
    dev = generator.device if generator is not None else x0.device
    t = process.sample_t(b, generator=generator, device=dev).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=dev).to(x0.device, x0.dtype)
    alpha = broadcast(process.alpha(t), x0)
    sigma = broadcast(process.sigma(t), x0)
    x_t = alpha * x0 + sigma * eps
    if labels is not None:
        null = null_label if null_label is not None else getattr(net, "null_label", None)
        if p_uncond > 0:
            if null is None:
                raise ValueError("p_uncond > 0 needs a class-conditional network (num_classes > 0)")
            labels = drop_labels(labels, p_uncond, null, generator)
    out = net(x_t * input_scale(alpha, sigma), t.to(x0.dtype), labels)
    target = training_target(prediction, x0, eps, alpha, sigma)
    return (out.float() - target.float()).pow(2).mean()
