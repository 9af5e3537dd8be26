"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): multistep exponential integrators of the probability-flow ODE written
for the data prediction ``D = x0_pred`` in the half log-SNR ``lambda = log(alpha / sigma)``.

With ``h = lambda_s - lambda_t > 0`` for a step from ``t`` to ``s < t``, the exact solution is
``x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^l D(l) dl`` (eq. 9); the
solvers expand ``D`` in ``lambda`` through the previous evaluations (multistep):

* first order (DDIM): ``x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) D_0``;
* 2M (Algorithm 2): ``D_0 -> D_0 + (D_0 - D_{-1}) / (2 r)``, ``r = h_{-1} / h``;
* 3M (Lu et al. 2022, DPM-Solver eq. 3.6 in data form): ``x_s = (sigma_s/sigma_t) x_t
  + alpha_s [h phi_1 D_0 + h phi_2 D_1 - h phi_3 D_2]`` with ``phi_1 = (1 - e^{-h})/h``,
  ``phi_{k+1} = (phi_k - 1/k!)/h`` and ``D_1, D_2`` the first and second divided differences;
  the coefficients are those of the paper's reference code (and diffusers, k-diffusion). Note:
  ``D_2 ~ h^2 D''/2``, for which the Taylor-exact weight is ``2 h phi_3``; with ``h phi_3`` the
  update is third order only up to an O(h^3) local term, and on the exact Gaussian ODE
  (tests/diffusion_core/test_fast_samplers.py) 3M converges at order 2, still below 2M's error;
* 2M-SDE (Lu et al. 2022, Sec. 5 / App. "SDE-DPM-Solver++(2M)"), the exact solution of the
  reverse SDE with the same expansion: ``x_s = (sigma_s/sigma_t) e^{-h} x_t
  + alpha_s (1 - e^{-2h}) (D_0 + (D_0 - D_{-1}) / (2r)) + sigma_s sqrt(1 - e^{-2h}) z``.

The order ramps up from a first-order start (no history yet). Steps near the end lower it
("lower_order_final", as in the paper's reference code and diffusers): the step to ``t = 0``
(``sigma = 0``, ``lambda = +inf``) is first order and returns ``D_0`` exactly, and with fewer than
15 steps the one before it is at most second order. One denoiser evaluation per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_core.denoiser import DenoiserLike
from diffusion_core.rng import randn_like
from diffusion_core.sampler_registry import check_settings
from diffusion_core.samplers.base import Callback, SampleResult, check_grid, combine, report

#: with fewer steps than this, the step before the last is at most second order
LOWER_ORDER_FINAL_BELOW = 15


def half_log_snr(process, t: Tensor) -> float:
    """``lambda(t) = log(alpha / sigma)`` (DPM-Solver's time variable), ``+inf`` at ``t = 0``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if float(t) <= 0:
        return float("inf")
    return 0.5 * float(process.log_snr(t))


def step_order(order: int, i: int, steps: int, lower_order_final: bool) -> int:
    """The order of step ``i`` of ``steps``: warm-up ``i + 1``; last step first order; with
    ``lower_order_final`` and few steps, at most the number of steps left."""
    p = min(order, i + 1)
    if i == steps - 1:
        return 1
    if lower_order_final and steps < LOWER_ORDER_FINAL_BELOW:
        p = min(p, steps - i)
    return p


def dpmpp_update(x: Tensor, ds: list[Tensor], lams: list[float], lam_s: float,
                 a_s: float, s_t: float, s_s: float, *, noise: Tensor | None = None) -> Tensor:
    """One DPM-Solver++ multistep update from the newest history point to ``lambda_s``.

    ``ds``/``lams``: data predictions and their ``lambda`` (oldest first; the last is at x's time),
    of length = the order. ``noise`` selects the SDE form (2M-SDE, order <= 2)."""
    d0, lam_t = ds[-1], lams[-1]
    if lam_s == float("inf"):  # sigma_s = 0: every order reduces to the data prediction
        return d0
    h = lam_s - lam_t
    order = len(ds)
    # every form is x_s = c_x x + sum_k w_k D_k (+ c_z z): host-side coefficients, one pass each
    if noise is not None:
        em = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
        w = [a_s * em]  # on D_0, then D_{-1}
        if order >= 2:
            k = a_s * em / (2.0 * (lam_t - lams[-2]) / h)
            w = [w[0] + k, -k]
        terms = [((s_s / s_t) * math.exp(-h), x), *zip(w, reversed(ds[-2:]), strict=True),
                 (s_s * em**0.5, noise)]
        return combine(terms)
    e = math.expm1(-h)  # e^{-h} - 1
    h_phi1 = -e
    w = [a_s * h_phi1, 0.0, 0.0]  # weights on D_0, D_{-1}, D_{-2}
    if order == 2:
        k = a_s * h_phi1 / (2.0 * (lam_t - lams[-2]) / h)
        w = [w[0] + k, -k, 0.0]
    elif order == 3:
        r0, r1 = (lam_t - lams[-2]) / h, (lams[-2] - lams[-3]) / h
        d1_0 = [1.0 / r0, -1.0 / r0, 0.0]  # first divided differences, as weights on D_k
        d1_1 = [0.0, 1.0 / r1, -1.0 / r1]
        d1 = [a + r0 / (r0 + r1) * (a - b) for a, b in zip(d1_0, d1_1, strict=True)]
        d2 = [(a - b) / (r0 + r1) for a, b in zip(d1_0, d1_1, strict=True)]
        h_phi2 = e / h + 1.0
        h_phi3 = (e + h) / h**2 - 0.5
        w = [w0 + a_s * h_phi2 * a - a_s * h_phi3 * b for w0, a, b in zip(w, d1, d2, strict=True)]
    return combine([((s_s / s_t), x), *zip(w[:order], reversed(ds), strict=True)])


def _dpmpp_multistep(denoiser: DenoiserLike, process, x: Tensor, grid: Tensor, *, name: str,
                     order: int, sde: bool, labels, rng, callback,
                     lower_order_final: bool) -> SampleResult:
    check_settings(name, lower_order_final=lower_order_final)
    check_grid(grid)
    steps = grid.numel() - 1
    ds: list[Tensor] = []
    lams: list[float] = []
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        out = denoiser(x, t, labels)
        ds, lams = (ds + [out.x0])[-order:], (lams + [half_log_snr(process, t)])[-order:]
        p = step_order(order, i, steps, lower_order_final)
        s_t = float(process.sigma(t.double()))
        a_s, s_s = float(process.alpha(s.double())), float(process.sigma(s.double()))
        noise = randn_like(x, rng) if sde and float(s) > 0 else None
        x = dpmpp_update(x, ds[-p:], lams[-p:], half_log_snr(process, s), a_s, s_t, s_s,
                         noise=noise)
        report(callback, i, t, x, out.x0)
    return SampleResult(x, steps)


@torch.no_grad()
def dpmpp_2m(denoiser: DenoiserLike, process, x: Tensor, grid: Tensor, *,
             labels: Tensor | None = None, rng=None, callback: Callback | None = None,
             lower_order_final: bool = True) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2):
    ``x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) [(1 + 1/(2r)) D_0 - 1/(2r) D_{-1}]``."""
    return _dpmpp_multistep(denoiser, process, x, grid, name="dpmpp_2m", order=2, sde=False,
                            labels=labels, rng=rng, callback=callback,
                            lower_order_final=lower_order_final)


@torch.no_grad()
def dpmpp_3m(denoiser: DenoiserLike, process, x: Tensor, grid: Tensor, *,
             labels: Tensor | None = None, rng=None, callback: Callback | None = None,
             lower_order_final: bool = True) -> SampleResult:
    """DPM-Solver++(3M) (Lu et al. 2022, Sec. 4; third-order multistep in data form):
    ``x_s = (sigma_s/sigma_t) x_t + alpha_s [h phi_1 D_0 + h phi_2 D_1 - h phi_3 D_2]``."""
    return _dpmpp_multistep(denoiser, process, x, grid, name="dpmpp_3m", order=3, sde=False,
                            labels=labels, rng=rng, callback=callback,
                            lower_order_final=lower_order_final)


@torch.no_grad()
def dpmpp_2m_sde(denoiser: DenoiserLike, process, x: Tensor, grid: Tensor, *,
                 labels: Tensor | None = None, rng=None, callback: Callback | None = None,
                 lower_order_final: bool = True) -> SampleResult:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022): ``x_s = (sigma_s/sigma_t) e^{-h} x_t
    + alpha_s (1 - e^{-2h}) [D_0 + (D_0 - D_{-1})/(2r)] + sigma_s sqrt(1 - e^{-2h}) z``."""
    return _dpmpp_multistep(denoiser, process, x, grid, name="dpmpp_2m_sde", order=2, sde=True,
                            labels=labels, rng=rng, callback=callback,
                            lower_order_final=lower_order_final)
