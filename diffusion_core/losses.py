"""One denoising loss for every process (Ho et al. 2020, eq. 14; Song et al. 2021, eq. 7).

    L = E_{t, x_0, eps} w(t) || net(c_in x_t, t, c) - target(x_0, eps) ||^2,
    x_t = alpha x_0 + sigma eps

With the eps target and ``w = 1`` this is denoising score matching with weighting
``lambda(t) = sigma(t)^2`` (since ``sigma^2 || s_theta + eps / sigma ||^2 = || eps_theta - eps ||^2``);
the x0 and v targets give the SNR and SNR+1 weightings of the same objective (Salimans & Ho 2022).
``t`` comes from the process's own training distribution (uniform steps for DDPM, ``U(t_min, 1)``
for the SDEs), EDM's log-normal or SD3's logit-normal one (:mod:`diffusion_core.noise_levels`).

Loss weightings ``w(t)``. For a fixed ``x_t`` the errors of the three targets are proportional:
``||d eps||^2 = SNR ||d x0||^2``, ``||d v||^2 = (alpha^2 + sigma^2)(SNR + 1) ||d x0||^2`` and
``||d u||^2 = ((alpha + sigma) / sigma)^2 ||d x0||^2`` for the flow ``u = eps - x0``
(``SNR = alpha^2 / sigma^2``), so a weighting is stated once on the ``x_0`` error,
``lambda_x0(t) ||d x0||^2``, and applied to any target as ``w = lambda_x0 / k_target``
(:func:`target_factor`):

* ``none``: ``w = 1`` (the "simple" loss of Ho et al. 2020);
* ``min_snr``: ``lambda_x0 = min(SNR, gamma)`` (Hang et al. 2023, "Efficient Diffusion Training via
  Min-SNR Weighting Strategy", eq. 7, ``gamma = 5``): ``w = min(SNR, gamma) / SNR`` for eps,
  ``min(SNR, gamma)`` for x0, ``min(SNR, gamma) / (SNR + 1)`` for v (VP);
* ``edm``: ``lambda_x0 = (sigma_e^2 + sigma_data^2) / (sigma_e sigma_data)^2 = SNR + 1/sigma_data^2``
  with ``sigma_e = sigma / alpha`` (Karras et al. 2022, eq. 8 and Table 1, ``sigma_data = 0.5``),
  the weight that makes EDM's preconditioned network error have unit weight. With
  ``sigma_data = 1`` on a VP process it is the uniform v-loss: EDM's ``F_theta`` is ``-v`` there,
  so v prediction is EDM's preconditioning for unit-variance data.

For rectified flow (``alpha = 1 - t``, ``sigma = t``) with the flow target, ``none`` is the
loss of Liu et al. 2023 and Esser et al. 2024 (with ``t_sampling="logit_normal"``, SD3's
"rf/lognorm(0.00, 1.00)"); it is ``lambda_x0 = 1 / t^2``, i.e. ``1 / (1 - t)^2`` on the eps error.
``min_snr`` and ``edm`` are defined on any process and target through ``k_target``, so they apply
unchanged (min-SNR caps ``lambda_x0`` at ``gamma``, i.e. ``w = min(SNR, gamma) t^2`` on the flow
error); neither is part of the published flow recipes.

Classifier-free guidance training replaces each label by the null label with probability
``p_uncond`` (Ho & Salimans 2022, Algorithm 1).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

from diffusion_core.denoiser import input_scale
from diffusion_core.noise_levels import (
    EDM_P_MEAN,
    EDM_P_STD,
    SD3_LOGIT_MEAN,
    SD3_LOGIT_STD,
    sample_training_t,
)
from diffusion_core.parameterization import PREDICTIONS, training_target
from diffusion_core.processes import NoiseProcess, broadcast

LossWeighting = Literal["none", "min_snr", "edm"]
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)


def target_factor(prediction: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``k = ||d target||^2 / ||d x0||^2`` at fixed ``x_t``: ``SNR`` (eps), 1 (x0),
    ``(alpha^2 + sigma^2)(SNR + 1)`` (v), ``((alpha + sigma) / sigma)^2`` (flow)."""
    snr = alpha**2 / sigma**2
    if prediction == "eps":
        return snr
    if prediction == "x0":
        return torch.ones_like(snr)
    if prediction == "v":
        return (alpha**2 + sigma**2) * (snr + 1.0)
    if prediction == "flow":
        return ((alpha + sigma) / sigma) ** 2
    raise ValueError(f"unknown prediction {prediction!r}: choose one of {PREDICTIONS}")


def x0_weight(weighting: str, alpha: Tensor, sigma: Tensor, *, min_snr_gamma: float = 5.0,
              sigma_data: float = 0.5) -> Tensor:
    """``lambda_x0(t)`` of ``min_snr`` or ``edm``, the weighting on the ``x_0`` error (see the
    module docstring; ``none`` has no fixed one: it is ``k_target``, whatever the target)."""
    snr = alpha**2 / sigma**2
    if weighting == "min_snr":
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        return snr.clamp(max=min_snr_gamma)
    if weighting == "edm":
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        return snr + 1.0 / sigma_data**2
    raise ValueError(f"loss weighting {weighting!r} has no x0 weight: use min_snr or edm")


def loss_weight(weighting: str, prediction: str, alpha: Tensor, sigma: Tensor, *,
                min_snr_gamma: float = 5.0, sigma_data: float = 0.5) -> Tensor:
    """``w(t)`` multiplying the squared error of ``prediction``'s target: 1 for ``none``, else
    ``lambda_x0(t) / k_target(t)``."""
    if weighting == "none":
        return torch.ones_like(alpha)
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}: choose one of {list(LOSS_WEIGHTINGS)}")
    lam = x0_weight(weighting, alpha, sigma, min_snr_gamma=min_snr_gamma, sigma_data=sigma_data)
    return lam / target_factor(prediction, alpha, sigma)


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
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
    t_sampling: str = "uniform",
    p_mean: float = EDM_P_MEAN,
    p_std: float = EDM_P_STD,
    logit_mean: float = SD3_LOGIT_MEAN,
    logit_std: float = SD3_LOGIT_STD,
) -> Tensor:
    """Weighted mean squared error of ``net`` on one batch; all randomness comes from
    ``generator``. ``weighting`` and ``t_sampling`` as in the module docstring; the defaults
    (``none``, ``uniform``) are the loss of Ho et al. 2020."""
    b = x0.shape[0]
    dev = generator.device if generator is not None else x0.device
    t = sample_training_t(process, b, kind=t_sampling, generator=generator, device=dev,
                          p_mean=p_mean, p_std=p_std, logit_mean=logit_mean,
                          logit_std=logit_std).to(x0.device)
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
    err = (out.float() - target.float()).pow(2)
    if weighting == "none":
        return err.mean()
    a64, s64 = process.alpha(t.cpu()), process.sigma(t.cpu())
    w = loss_weight(weighting, prediction, a64, s64, min_snr_gamma=min_snr_gamma,
                    sigma_data=sigma_data).to(err.device, err.dtype)
    return (err.flatten(1).mean(1) * w).mean()
