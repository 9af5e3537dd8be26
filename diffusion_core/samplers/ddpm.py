"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on any (respaced) time grid.

Each step samples the posterior of the forward process between grid times ``s < t``
(Ho et al. 2020, eq. 6-7, written for a general ``alpha, sigma``; Nichol & Dhariwal 2021, Sec. 4
for respaced steps):

    mean = alpha_{t|s} sigma_s^2 / sigma_t^2 * x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 * x0_pred
    var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2      ("posterior", beta-tilde)
        or sigma_{t|s}^2                             ("beta", the larger choice)

where ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``
(``= beta_t`` for adjacent DDPM steps). The last step (to ``t = 0``) returns ``x0_pred``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffusion_core.denoiser import DenoiserLike
from diffusion_core.rng import randn_like
from diffusion_core.sampler_registry import check_settings
from diffusion_core.samplers.base import Callback, SampleResult, check_grid, report


@torch.no_grad()
def ddpm(
    denoiser: DenoiserLike,
    process,
    x: Tensor,
    grid: Tensor,
    *,
    labels: Tensor | None = None,
    rng=None,
    callback: Callback | None = None,
    variance: Literal["posterior", "beta"] = "posterior",
) -> SampleResult:
    check_settings("ddpm", variance=variance)
    check_grid(grid)
    nfe = 0
    for i in range(grid.numel() - 1):
        t, s = grid[i], grid[i + 1]
        out = denoiser(x, t, labels)
        nfe += 1
        if s <= 0:
            x = out.x0
        else:
            # host-side float64 coefficients: no device copy or sync inside the loop
            c_t, c_0, var = (float(v) for v in process.posterior(s, t))
            if variance == "beta":
                var = float(process.transition(s, t)[1])
            x = c_t * x + c_0 * out.x0 + math.sqrt(var) * randn_like(x, rng)
        report(callback, i, t, x, out.x0)
    return SampleResult(x, nfe)
