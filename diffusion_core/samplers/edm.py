"""EDM's stochastic Heun sampler (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 2), on any process through ``alpha`` and ``sigma``.

EDM integrates the probability-flow ODE in the scaled variable ``y = x / alpha`` against the
noise level ``sigma~ = sigma / alpha`` (= ``exp(-lambda)``), where it is
``dy/dsigma~ = (y - D(y; sigma~)) / sigma~`` for every process (Karras et al. 2022, eq. 4 with
``s(t) = alpha``). Each step from ``sigma~_i`` to ``sigma~_{i+1}``:

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma~_i <= S_tmax else 0
    sigma^ = (1 + gamma_i) sigma~_i,   y^ = y + sqrt(sigma^2 - sigma~_i^2) S_noise z     (churn)
    d = (y^ - D(y^; sigma^)) / sigma^,   y' = y^ + (sigma~_{i+1} - sigma^) d               (Euler)
    y_{i+1} = y^ + (sigma~_{i+1} - sigma^) (d + d') / 2,  d' at (y', sigma~_{i+1})    (Heun)

The last step to ``sigma~ = 0`` (``t = 0``) is Euler and returns ``D``: ``2N - 1`` evaluations for
``N`` steps. ``S_tmin``/``S_tmax`` are in ``sigma~`` units. The churned level ``sigma^`` has no grid
time; its time is found by bisection of the monotone log-SNR (:func:`time_of_sigma`).
Deterministic with ``s_churn = 0`` (EDM Algorithm 1). Karras sigma spacing (rho = 7) is a grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_core.denoiser import DenoiserLike
from diffusion_core.rng import randn_like
from diffusion_core.sampler_registry import check_settings
from diffusion_core.samplers.base import Callback, SampleResult, check_grid, report


def edm_sigma(process, t: Tensor | float) -> float:
    """``sigma~(t) = sigma(t) / alpha(t)``, EDM's noise level."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return float(process.sigma(t) / process.alpha(t))


def time_of_sigma(process, sigma: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """The time ``t in [lo, hi]`` with ``sigma~(t) = sigma`` (bisection; ``sigma~`` increases)."""
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if edm_sigma(process, mid) < sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@torch.no_grad()
def edm_heun(
    denoiser: DenoiserLike,
    process,
    x: Tensor,
    grid: Tensor,
    *,
    labels: Tensor | None = None,
    rng=None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
) -> SampleResult:
    """Karras et al. 2022, Algorithm 2 (see the module docstring); ``s_churn = 0`` is Algorithm 1.
    ``s_tmax = None``: no upper bound on the churned noise levels (EDM's ``S_tmax = inf``)."""
    check_settings("edm_heun", s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    check_grid(grid)
    s_tmax = math.inf if s_tmax is None else s_tmax
    steps = grid.numel() - 1
    nfe = 0
    for i in range(steps):
        t, s = float(grid[i]), float(grid[i + 1])
        sig, a_t = edm_sigma(process, t), float(process.alpha(torch.tensor(t, dtype=torch.float64)))
        y = x / a_t
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sig <= s_tmax else 0.0
        t_hat, sig_hat = t, sig
        if gamma > 0:
            sig_hat = sig * (1 + gamma)
            t_hat = time_of_sigma(process, sig_hat, lo=t)
            sig_hat = edm_sigma(process, t_hat)  # the level the network actually sees
            y = y + math.sqrt(sig_hat**2 - sig**2) * s_noise * randn_like(y, rng)
        a_hat = float(process.alpha(torch.tensor(t_hat, dtype=torch.float64)))
        d0 = denoiser(a_hat * y, torch.tensor(t_hat, dtype=torch.float64), labels).x0
        nfe += 1
        if s <= 0:
            x = d0
        else:
            sig_s = edm_sigma(process, s)
            a_s = float(process.alpha(torch.tensor(s, dtype=torch.float64)))
            slope = (y - d0) / sig_hat
            y_euler = y + (sig_s - sig_hat) * slope
            d1 = denoiser(a_s * y_euler, torch.tensor(s, dtype=torch.float64), labels).x0
            nfe += 1
            x = a_s * (y + (sig_s - sig_hat) * 0.5 * (slope + (y_euler - d1) / sig_s))
        report(callback, i, torch.tensor(t), x, d0)
    return SampleResult(x, nfe)
