"""DDIM (Song, Meng & Ermon 2021, eq. 12) and its deterministic inversion.

    x_s = alpha_s x0_pred + sqrt(sigma_s^2 - c^2) eps_pred + c z,
    c = eta * sqrt(sigma_{t|s}^2 sigma_s^2 / sigma_t^2)     (eq. 16, general alpha/sigma form)

``eta = 0`` is deterministic (the probability-flow ODE's exponential-integrator step, Lu et al.
2022); ``eta = 1`` on the full grid is exactly DDPM ancestral sampling with the posterior variance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_core.denoiser import DenoiserLike
from diffusion_core.rng import randn_like
from diffusion_core.sampler_registry import check_settings
from diffusion_core.samplers.base import Callback, SampleResult, check_grid, coeffs, report


@torch.no_grad()
def ddim(
    denoiser: DenoiserLike,
    process,
    x: Tensor,
    grid: Tensor,
    *,
    labels: Tensor | None = None,
    rng=None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> SampleResult:
    check_settings("ddim", eta=eta)
    check_grid(grid)
    nfe = 0
    for i in range(grid.numel() - 1):
        t, s = grid[i], grid[i + 1]
        out = denoiser(x, t, labels)
        nfe += 1
        if s <= 0:
            x = out.x0
        else:
            a_s, sig_s = coeffs(process, s)
            c = eta * math.sqrt(float(process.posterior(s, t)[2]))
            x = a_s * out.x0 + math.sqrt(max(sig_s**2 - c**2, 0.0)) * out.eps
            if eta > 0:
                x = x + c * randn_like(x, rng)
        report(callback, i, t, x, out.x0)
    return SampleResult(x, nfe)


@torch.no_grad()
def ddim_invert(
    denoiser: DenoiserLike,
    process,
    x0: Tensor,
    grid: Tensor,
    *,
    labels: Tensor | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """Encode ``x_0`` into ``x_T`` by running the eta=0 DDIM update forwards in time
    (Song et al. 2021, Sec. 5.4; the ODE is reversible). ``grid`` is the same descending grid a
    decode would use; its last entry must be 0. The step from 0 to the smallest grid time
    ``t_1`` would evaluate the denoiser at ``t_1`` on the clean image and return
    ``alpha_1 x0_pred + sigma_1 eps_pred = x_0`` exactly (``x = alpha x0 + sigma eps`` for any
    denoiser), so it is skipped: the clean image stands in for ``x_{t_1}`` at no cost, and an
    inversion costs one evaluation fewer than its decode (``len(grid) - 2``)."""
    check_grid(grid)
    if float(grid[-1]) != 0.0:
        raise ValueError("the inversion grid must end at t = 0 (the clean image)")
    up = grid.flip(0)[1:]  # t_1, ..., t_S
    x = x0
    nfe = 0
    for i in range(up.numel() - 1):
        s, t = up[i], up[i + 1]
        out = denoiser(x, s, labels)
        nfe += 1
        a_t, sig_t = coeffs(process, t)
        x = a_t * out.x0 + sig_t * out.eps
        report(callback, i, t, x, out.x0)
    return SampleResult(x, nfe)
