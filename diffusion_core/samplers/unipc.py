"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), data-prediction form with ``B(h) = e^h - 1`` ("bh2").

In the half log-SNR ``lambda = log(alpha / sigma)`` a step from ``t`` (history point 0) to
``s`` with ``h = lambda_s - lambda_t`` and earlier points ``r_k = (lambda_{t_k} - lambda_t) / h``:

    x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) D_0
          - alpha_s B(-h) sum_k a_k (D_k - D_0) / r_k                      (UniP, Algorithm 2)

where ``a`` solves ``R a = g`` with ``R_{mk} = r_k^{m-1}`` and
``g_m = m! (-h) phi_{m+1}(-h) / B(-h)`` (``phi_1(u) = (e^u - 1)/u``, ``phi_{m+1} = (phi_m - 1/m!)/u``);
order 2 uses ``a_1 = 1/2``. UniC (Algorithm 1) reuses the evaluation ``D_s`` at the predicted
point, made anyway for the next step, as one more node with ``r = 1``; order ``p`` UniC after an
order-``p`` UniP raises the accuracy to ``p + 1`` at no extra evaluation (order 1 uses
``a = 1/2``). The step to ``t = 0`` (``sigma = 0``) returns the data prediction; with
``lower_order_final`` the last steps use at most the number of steps left (as the reference code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_core.denoiser import DenoiserLike
from diffusion_core.sampler_registry import check_settings
from diffusion_core.samplers.base import Callback, SampleResult, check_grid, combine, report
from diffusion_core.samplers.dpm_solver import half_log_snr


def unipc_weights(h: float, rs: list[float]) -> tuple[list[float], float]:
    """Weights ``a_k`` of the divided differences and ``B(-h)``: ``R a = g`` on the nodes ``rs``
    (for UniC the last node is the new point, ``r = 1``); one node gives ``a = 1/2``."""
    u = -h
    b_h = math.expm1(u)
    if len(rs) == 1:
        return [0.5], b_h
    g, phi, fact = [], math.expm1(u) / u, 1.0  # phi = phi_1(u)
    for m in range(1, len(rs) + 1):
        fact *= m  # m!
        phi = (phi - 1.0 / fact) / u  # phi_{m+1}(u)
        g.append(fact * u * phi / b_h)
    r = torch.tensor(rs, dtype=torch.float64)
    mat = torch.stack([r**k for k in range(len(rs))])
    return torch.linalg.solve(mat, torch.tensor(g, dtype=torch.float64)).tolist(), b_h


def unipc_update(x: Tensor, ds: list[Tensor], lams: list[float], lam_s: float, a_s: float,
                 s_t: float, s_s: float, d_new: Tensor | None = None) -> Tensor:
    """UniP (``d_new is None``) or UniC (``d_new`` = evaluation at ``lambda_s``) from the newest
    history point of ``ds``/``lams`` (oldest first; order = ``len(ds)``) to ``lambda_s``."""
    d0, lam_t = ds[-1], lams[-1]
    if lam_s == float("inf"):
        return d0
    h = lam_s - lam_t
    rs = [(lam - lam_t) / h for lam in reversed(lams[:-1])]
    nodes = list(reversed(ds[:-1]))
    if d_new is not None:
        rs, nodes = rs + [1.0], nodes + [d_new]
    # x_s = (s_s/s_t) x - a_s expm1(-h) D_0 - a_s B(-h) sum_k a_k (D_k - D_0) / r_k, written as
    # one weight per tensor (host-side floats) and summed in one pass per tensor
    w0 = -a_s * math.expm1(-h)
    terms: list[tuple[float, Tensor]] = []
    if nodes:
        weights, b_h = unipc_weights(h, rs)
        for a_k, r_k, d_k in zip(weights, rs, nodes, strict=True):
            c = a_s * b_h * a_k / r_k
            terms.append((-c, d_k))
            w0 += c
    return combine([(s_s / s_t, x), (w0, d0), *terms])


@torch.no_grad()
def unipc(denoiser: DenoiserLike, process, x: Tensor, grid: Tensor, *,
          labels: Tensor | None = None, rng=None, callback: Callback | None = None,
          order: int = 2, lower_order_final: bool = True) -> SampleResult:
    """UniPC-p with bh2 (Zhao et al. 2023, Algorithms 1-2): at every grid time evaluate
    ``D = x0_pred``, correct the current point with UniC, then predict the next with UniP.
    One denoiser evaluation per step (the corrector reuses it)."""
    check_settings("unipc", order=order, lower_order_final=lower_order_final)
    check_grid(grid)
    steps = grid.numel() - 1
    ds: list[Tensor] = []
    lams: list[float] = []
    x_prev, p_prev = x, 0
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        out = denoiser(x, t, labels)
        lam_t = half_log_snr(process, t)
        a_t, s_t = float(process.alpha(t.double())), float(process.sigma(t.double()))
        if i > 0:  # UniC: refine x_t with the new evaluation; the history keeps D at the prediction
            s_prev = float(process.sigma(grid[i - 1].double()))
            x = unipc_update(x_prev, ds[-p_prev:], lams[-p_prev:], lam_t, a_t, s_prev, s_t,
                             d_new=out.x0)
        ds, lams = (ds + [out.x0])[-order:], (lams + [lam_t])[-order:]
        p = min(order, len(ds), steps - i if lower_order_final else order)
        a_s, s_s = float(process.alpha(s.double())), float(process.sigma(s.double()))
        x_prev, p_prev = x, p
        x = unipc_update(x, ds[-p:], lams[-p:], half_log_snr(process, s), a_s, s_t, s_s)
        report(callback, i, t, x, out.x0)
    return SampleResult(x, steps)
