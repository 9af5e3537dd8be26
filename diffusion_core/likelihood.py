"""Exact likelihoods through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

Along the ODE ``dx/dt = v(x, t)`` the log-density obeys the instantaneous change of variables
(Chen et al. 2018, "Neural ODEs", Thm. 1): ``d log p_t(x(t)) / dt = -div v(x(t), t)``, so

    log p_{t_min}(x) = log p_T(x(T)) + int_{t_min}^{T} div v(x(t), t) dt,   T = t_max

(``t_max = 1`` but for rectified flow, whose ``t = 1`` is singular).

The divergence is estimated with the Hutchinson-Skilling trick ``div v ~= z^T (dv/dx) z`` with a
fixed Rademacher ``z`` per image (one vector-Jacobian product per evaluation), or computed exactly
for small inputs.

Discrete data with ``L`` levels ``k`` live on the model's scale at ``x_k = 2 k / (L - 1) - 1``
(``data.from_levels``, the map the data loaders use). They are uniformly dequantised in bins of
width ``Delta = 2 / (L - 1)`` centred on those points, ``y = x_k + Delta (u - 1/2)``,
``u ~ U[0, 1)^D``; the bins tile ``[-1 - Delta/2, 1 + Delta/2]``. The probability of the levels is
``P(k) = int_bin p(y) dy >= Delta^D exp(E_u log p(y))`` (Jensen; Theis et al. 2016, "A note on the
evaluation of generative models"; Ho et al. 2020, Sec. 3.3 use the same centred bins), so
``bpd = -(log p(y) + D log Delta) / (D ln 2)`` is an upper bound on ``-log2 P(k) / D``, in bits per
dimension on the level scale (``log2 L`` bits/dim is a uniform guess).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusion_core.data import from_levels
from diffusion_core.rng import StackedRNG
from diffusion_core.samplers.ode import dopri5, ode_velocity


def _divergence_exact(v: Tensor, x: Tensor) -> Tensor:
    flat_v = v.flatten(1)
    div = torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
    for j in range(flat_v.shape[1]):
        grad = torch.autograd.grad(flat_v[:, j].sum(), x, retain_graph=True)[0]
        div = div + grad.flatten(1)[:, j]
    return div


def ode_log_likelihood(
    denoiser,
    process,
    x: Tensor,
    *,
    labels: Tensor | None = None,
    rng: StackedRNG | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    exact_trace: bool = False,
    prior_logp=None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Tensor, int]:
    """``log p_{t_min}(x)`` in nats per image (float64) and the number of ODE evaluations.

    ``prior_logp`` replaces the process's prior ``log p_1`` (e.g. by the exact marginal in tests:
    the prior only approximates ``p_1``, by ``alpha(1) ~ 0.007`` for the default VP-SDE).
    ``callback`` sees ``{nfe, t}`` after every evaluation: the evaluations so far and the earliest
    time, from ``t_min`` to 1, that an image of the batch was evaluated at (for progress)."""
    shape = x.shape
    d = x[0].numel()
    if exact_trace:
        z = None
    elif rng is not None:
        z = rng.rademacher_like(x)
    else:
        z = torch.randint(0, 2, shape, device=x.device).to(x.dtype) * 2 - 1

    evaluations = 0

    def fn(y: Tensor, t: Tensor) -> Tensor:
        nonlocal evaluations
        with torch.enable_grad():
            xi = y[:, :d].reshape(shape).detach().requires_grad_(True)
            v, _ = ode_velocity(denoiser, process, xi, t, labels)
            if exact_trace:
                div = _divergence_exact(v, xi)
            else:
                vjp = torch.autograd.grad((v * z).sum(), xi)[0]
                div = (vjp * z).flatten(1).sum(1)
        evaluations += 1
        if callback is not None:
            callback({"nfe": evaluations, "t": float(t.min())})
        return torch.cat([v.detach().flatten(1), div.detach().reshape(-1, 1).to(v.dtype)], 1)

    y0 = torch.cat([x.flatten(1), torch.zeros(shape[0], 1, dtype=x.dtype, device=x.device)], 1)
    y1, nfe = dopri5(fn, y0, process.t_min, process.t_max, rtol=rtol, atol=atol)
    x1 = y1[:, :d].reshape(shape)
    logp = (prior_logp or process.prior_logp)(x1) + y1[:, d].double()
    return logp, nfe


def bits_per_dim(
    denoiser,
    process,
    levels: Tensor,
    num_levels: int,
    *,
    seeds: list[int] | None = None,
    labels: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dtype: torch.dtype = torch.float32,
    exact_trace: bool = False,
    prior_logp=None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Tensor, int]:
    """Negative log-likelihood in bits/dim of integer images ``levels`` in ``0..num_levels-1``,
    per image: ``-(log p(x_k + Delta (u - 1/2)) + D log Delta) / (D ln 2)``, ``Delta = 2/(L-1)``.

    ``u`` and the Hutchinson-Skilling probes come from per-image seeds; ``exact_trace``,
    ``prior_logp`` and ``callback`` are passed to ``ode_log_likelihood``."""
    if levels.dtype.is_floating_point:
        raise ValueError("bits_per_dim expects integer pixel levels (e.g. uint8), not floats")
    if int(levels.min()) < 0 or int(levels.max()) >= num_levels:
        raise ValueError(f"pixel levels must lie in [0, {num_levels - 1}]")
    seeds = list(range(levels.shape[0])) if seeds is None else seeds
    rng = StackedRNG(seeds, levels.device)
    u = rng.rand(levels.shape[1:], dtype=torch.float64).to(levels.device)
    delta = 2.0 / (num_levels - 1)
    centres = from_levels(levels, num_levels).double()
    y = (centres + delta * (u - 0.5)).to(dtype)
    logp, nfe = ode_log_likelihood(denoiser, process, y, labels=labels, rng=rng, rtol=rtol,
                                   atol=atol, exact_trace=exact_trace, prior_logp=prior_logp,
                                   callback=callback)
    d = y[0].numel()
    bpd = -(logp + d * math.log(delta)) / (d * math.log(2.0))
    return bpd, nfe
