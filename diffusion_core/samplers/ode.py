"""Probability-flow ODE samplers (Song et al. 2021, Sec. 4.3, eq. 13).

    dx/dt = f(t) x - 1/2 g(t)^2 grad log p_t(x) = f(t) x + g(t)^2 eps(x, t) / (2 sigma(t))

integrated from t = 1 to t_min, then the denoising step ``x_0 = E[x_0 | x_{t_min}]``.
``heun_ode``: fixed-step Heun (2nd order; EDM, Karras et al. 2022, Algorithm 1).
``rk45_ode``: adaptive Dormand-Prince RK4(5) with per-image error control, so every image takes
its own steps and stays independent of its batch; reports the number of function evaluations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_core.denoiser import DenoiserLike, time_batch
from diffusion_core.processes import broadcast
from diffusion_core.sampler_registry import check_settings
from diffusion_core.samplers.base import Callback, SampleResult, check_grid, report


def ode_velocity(denoiser: DenoiserLike, process, x: Tensor, t: Tensor,
                 labels: Tensor | None = None):
    """``dx/dt`` of the probability-flow ODE at per-sample times ``t`` (shape ``(B,)`` or scalar).
    Returns ``(velocity, x0_pred)``."""
    t = time_batch(t, x)
    out = denoiser(x, t, labels)
    f, g2, sigma = (broadcast(c, x) for c in (process.f(t), process.g2(t), process.sigma(t)))
    return f * x + 0.5 * g2 * out.eps / sigma, out.x0


@torch.no_grad()
def heun_ode(
    denoiser: DenoiserLike,
    process,
    x: Tensor,
    grid: Tensor,
    *,
    labels: Tensor | None = None,
    rng=None,
    callback: Callback | None = None,
) -> SampleResult:
    """Heun's method on the grid; the last interval (to t = 0) is the denoising step."""
    check_grid(grid)
    nfe = 0
    for i in range(grid.numel() - 1):
        t, s = grid[i], grid[i + 1]
        if s <= 0:
            x0 = denoiser(x, t, labels).x0
            nfe += 1
            x = x0
        else:
            h = float(s - t)
            d1, x0 = ode_velocity(denoiser, process, x, t, labels)
            x_euler = x + h * d1
            d2, _ = ode_velocity(denoiser, process, x_euler, s, labels)
            nfe += 2
            x = x + 0.5 * h * (d1 + d2)
        report(callback, i, t, x, x0)
    return SampleResult(x, nfe)


# ----------------------------------------------------------------------- Dormand-Prince 5(4)
_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_B5 = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
_B4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
_E = [b5 - b4 for b5, b4 in zip(_B5, _B4, strict=True)]


def dopri5(
    fn: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t0: float,
    t1: float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_evals: int = 100_000,
) -> tuple[Tensor, int]:
    """Integrate ``dy/dt = fn(y, t)`` from ``t0`` to ``t1`` with Dormand & Prince's RK5(4)
    (Dormand & Prince 1980; the method behind scipy's RK45), one step size per sample.

    ``y0`` is ``(B, ...)``; ``fn`` receives ``y`` and per-sample times ``(B,)`` (float64) and is
    evaluated on the whole batch at once. The error norm is the RMS of
    ``err / (atol + rtol * max(|y|, |y_new|))`` over each sample; a step is accepted when it is
    <= 1, and ``h <- h * clip(0.9 err^(-1/5), 0.2, 10)``. Returns ``(y(t1), nfe)``.
    """
    b = y0.shape[0]
    dev = y0.device
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    t = torch.full((b,), float(t0), dtype=torch.float64, device=dev)
    h = torch.full((b,), direction * (first_step or 0.02 * span), dtype=torch.float64, device=dev)
    shape = (-1,) + (1,) * (y0.dim() - 1)
    y = y0
    k1 = fn(y, t)
    nfe = 1
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    while not bool(done.all()):
        if nfe >= max_evals:
            raise RuntimeError(f"dopri5 did not reach t={t1} within {max_evals} evaluations")
        remaining = (t1 - t) * direction
        h = torch.where(done, torch.zeros_like(h), direction * torch.minimum(h.abs(), remaining))
        hb = h.to(y.dtype).reshape(shape)
        ks = [k1]
        for i in range(1, 7):
            yi = y + hb * sum(a * k for a, k in zip(_A[i], ks, strict=False) if a != 0.0)
            ks.append(fn(yi, t + _C[i] * h))
        nfe += 6
        y_new = y + hb * sum(bb * k for bb, k in zip(_B5, ks, strict=True) if bb != 0.0)
        err = hb * sum(e * k for e, k in zip(_E, ks, strict=True) if e != 0.0)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err_norm = (err / scale).flatten(1).pow(2).mean(1).sqrt().double()
        accept = (err_norm <= 1.0) & ~done
        acc_b = accept.reshape(shape)
        y = torch.where(acc_b, y_new, y)
        k1 = torch.where(acc_b, ks[6], k1)
        t = torch.where(accept, t + h, t)
        factor = (0.9 * err_norm.clamp_min(1e-10) ** -0.2).clamp(0.2, 10.0)
        h = torch.where(done, h, h * factor)
        done = done | ((t1 - t) * direction <= 1e-12 * max(1.0, span))
    return y, nfe


@torch.no_grad()
def rk45_ode(
    denoiser: DenoiserLike,
    process,
    x: Tensor,
    grid: Tensor,
    *,
    labels: Tensor | None = None,
    rng=None,
    callback: Callback | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> SampleResult:
    """Adaptive RK45 on the probability-flow ODE from ``grid[0]`` to the last positive grid time
    (``t_min``), then the denoising step. Only the grid's end points are used."""
    check_settings("ode_rk45", rtol=rtol, atol=atol)
    check_grid(grid)
    t_start = float(grid[0])
    t_end = float(grid[-2]) if float(grid[-1]) == 0.0 else float(grid[-1])

    def fn(y: Tensor, t: Tensor) -> Tensor:
        return ode_velocity(denoiser, process, y, t, labels)[0]

    y, nfe = dopri5(fn, x, t_start, t_end, rtol=rtol, atol=atol)
    out = denoiser(y, torch.tensor(t_end, dtype=torch.float64), labels)
    report(callback, 0, torch.tensor(t_end), out.x0, out.x0)
    return SampleResult(out.x0, nfe + 1)
