"""Reverse-time SDE samplers (Song et al. 2021, Sec. 4).

The reverse SDE (eq. 6) of ``dx = f x dt + g dW`` is
``dx = [f(t) x - g(t)^2 grad log p_t(x)] dt + g(t) dW_bar``, with ``grad log p_t = -eps / sigma``.
Both samplers end with the denoising step ``x_0 = E[x_0 | x_{t_min}]`` (Tweedie; Song et al. 2021,
App. G "denoising").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_core.denoiser import DenoiserLike
from diffusion_core.parameterization import score_from_eps
from diffusion_core.rng import randn_like
from diffusion_core.sampler_registry import check_settings
from diffusion_core.samplers.base import Callback, SampleResult, check_grid, coeffs, report


def langevin_step_size(snr: float, sigma: Tensor | float, a: Tensor | float = 1.0
                       ) -> Tensor | float:
    """``eps_step = 2 a (snr sigma_t)^2``: Song et al. 2021 (Alg. 4-5) set
    ``eps_step = 2 a (snr ||z|| / ||score||)^2``; with ``score = -eps / sigma_t`` and a network
    ``eps`` of white noise's norm, ``||z|| / ||score|| = sigma_t``. Unlike the norms (per image
    here before, per batch in score_sde and diffusers) it does not depend on the state, so the
    corrector is a plain unadjusted Langevin chain (whose stationary law, for a Gaussian target
    of variance v, has variance ``v / (1 - eps_step / (2 v))``) and images stay independent of
    their batch."""
    return 2.0 * a * (snr * sigma) ** 2


@torch.no_grad()
def euler_maruyama(
    denoiser: DenoiserLike,
    process,
    x: Tensor,
    grid: Tensor,
    *,
    labels: Tensor | None = None,
    rng=None,
    callback: Callback | None = None,
) -> SampleResult:
    """Euler-Maruyama on the reverse SDE, from t to s < t (h = t - s > 0):
    ``x_s = x_t - [f x_t - g^2 score] h + g sqrt(h) z``."""
    check_grid(grid)
    nfe = 0
    for i in range(grid.numel() - 1):
        t, s = grid[i], grid[i + 1]
        out = denoiser(x, t, labels)
        nfe += 1
        if s <= 0:
            x = out.x0
        else:
            _, sig_t = coeffs(process, t)
            f, g2 = float(process.f(t.double())), float(process.g2(t.double()))
            h = float(t - s)
            score = score_from_eps(out.eps, sig_t)
            x = x - (f * x - g2 * score) * h + math.sqrt(g2 * h) * randn_like(x, rng)
        report(callback, i, t, x, out.x0)
    return SampleResult(x, nfe)


@torch.no_grad()
def langevin_correct(
    denoiser: DenoiserLike,
    x: Tensor,
    t: Tensor,
    *,
    labels: Tensor | None = None,
    rng=None,
    snr: float = 0.16,
    steps: int = 1,
    a: float = 1.0,
) -> Tensor:
    """Langevin corrector (Song et al. 2021, Algorithms 4-5) at a fixed time t:
    ``x <- x + eps_step score + sqrt(2 eps_step) z`` with the state-independent
    ``eps_step = 2 a (snr sigma_t)^2`` of :func:`langevin_step_size`. Costs ``steps``
    evaluations."""
    sigma = float(denoiser.process.sigma(torch.as_tensor(t, dtype=torch.float64)))
    step = float(langevin_step_size(snr, sigma, float(a)))
    for _ in range(steps):
        score = score_from_eps(denoiser(x, t, labels).eps, sigma)
        x = x + step * score + math.sqrt(2 * step) * randn_like(x, rng)
    return x


@torch.no_grad()
def predictor_corrector(
    denoiser: DenoiserLike,
    process,
    x: Tensor,
    grid: Tensor,
    *,
    labels: Tensor | None = None,
    rng=None,
    callback: Callback | None = None,
    snr: float = 0.16,
    corrector_steps: int = 1,
) -> SampleResult:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2-5).

    Corrector (Langevin, Alg. 4/5) at time t, repeated ``corrector_steps`` times:
    ``x <- x + eps_step score + sqrt(2 eps_step) z`` with ``eps_step = 2 a (snr sigma_t)^2``
    (:func:`langevin_step_size`, independent of the state) and ``a = alpha_{t|s}^2``
    (``1 - beta_i`` for DDPM steps, 1 for VE).
    Predictor (reverse diffusion, Alg. 2/3 with the exact forward transition):
    ``x_s = (x_t + sigma_{t|s}^2 score) / alpha_{t|s} + sigma_{t|s} z``.
    """
    check_settings("pc", snr=snr, corrector_steps=corrector_steps)
    check_grid(grid)
    nfe = 0
    for i in range(grid.numel() - 1):
        t, s = grid[i], grid[i + 1]
        a_t, sig_t = coeffs(process, t)
        if s > 0:
            a_s, sig_s = coeffs(process, s)
            a_ts = a_t / a_s
            var_ts = max(sig_t**2 - a_ts**2 * sig_s**2, 0.0)
            x = langevin_correct(denoiser, x, t, labels=labels, rng=rng, snr=snr,
                                 steps=corrector_steps, a=a_ts**2)
            nfe += corrector_steps
        out = denoiser(x, t, labels)
        nfe += 1
        if s <= 0:
            x = out.x0
        else:
            score = score_from_eps(out.eps, sig_t)
            x = (x + var_ts * score) / a_ts + math.sqrt(var_ts) * randn_like(x, rng)
        report(callback, i, t, x, out.x0)
    return SampleResult(x, nfe)
