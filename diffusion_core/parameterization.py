"""Network parameterisations as pure functions of ``(x_t, alpha, sigma)``.

With ``x_t = alpha x_0 + sigma eps`` a network may predict
``eps`` (Ho et al. 2020), ``x_0``, the velocity ``v = alpha eps - sigma x_0``
(Salimans & Ho 2022, "Progressive Distillation", Sec. 4), or the flow ``u = eps - x_0``
(rectified flow / flow matching: Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024, Sec. 2),
which is ``d x_t / dt`` on the linear path ``x_t = (1 - t) x_0 + t eps`` and an invertible linear
map of ``(x_t, eps)`` on any other process. The score of the marginal is
``grad log p_t(x_t) = -E[eps | x_t] / sigma`` (Vincent 2011; Song et al. 2021, eq. 7).
Nothing else in the library knows which one a network predicts.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Prediction = Literal["eps", "x0", "v", "flow"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "flow")


def x0_from_eps(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``x_0 = (x_t - sigma eps) / alpha``."""
    return (x - sigma * eps) / alpha


def eps_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``eps = (x_t - alpha x_0) / sigma``."""
    return (x - alpha * x0) / sigma


def v_from_eps_x0(eps: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``v = alpha eps - sigma x_0``."""
    return alpha * eps - sigma * x0


def eps_x0_from_v(x: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Invert ``[x_t, v] = [[alpha, sigma], [-sigma, alpha]] [x_0, eps]``:
    ``x_0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)``, ``eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)``.
    Exact for every process, also those with ``alpha^2 + sigma^2 != 1`` (VE, sub-VP)."""
    norm = alpha**2 + sigma**2
    return (sigma * x + alpha * v) / norm, (alpha * x - sigma * v) / norm


def flow_from_eps_x0(eps: Tensor, x0: Tensor) -> Tensor:
    """``u = eps - x_0`` (the rectified-flow velocity; Liu et al. 2023, Sec. 2)."""
    return eps - x0


def eps_x0_from_flow(x: Tensor, u: Tensor, alpha: Tensor, sigma: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """Invert ``[x_t, u] = [[alpha, sigma], [-1, 1]] [x_0, eps]``:
    ``x_0 = (x_t - sigma u) / (alpha + sigma)``, ``eps = (x_t + alpha u) / (alpha + sigma)``.
    On rectified flow ``alpha + sigma = 1``: ``x_0 = x_t - t u``, finite also at ``t = 1``."""
    norm = alpha + sigma
    return (x + alpha * u) / norm, (x - sigma * u) / norm


def score_from_eps(eps: Tensor, sigma: Tensor) -> Tensor:
    """``grad_x log p_t(x) = -eps / sigma``."""
    return -eps / sigma


def eps_x0_from_prediction(
    kind: str, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """Turn a network output of parameterisation ``kind`` into ``(eps, x_0)``."""
    if kind == "eps":
        return out, x0_from_eps(x, out, alpha, sigma)
    if kind == "x0":
        return eps_from_x0(x, out, alpha, sigma), out
    if kind == "v":
        return eps_x0_from_v(x, out, alpha, sigma)
    if kind == "flow":
        return eps_x0_from_flow(x, out, alpha, sigma)
    raise ValueError(f"unknown prediction {kind!r}: choose one of {PREDICTIONS}")


def training_target(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """What a network of parameterisation ``kind`` regresses onto."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return v_from_eps_x0(eps, x0, alpha, sigma)
    if kind == "flow":
        return flow_from_eps_x0(eps, x0)
    raise ValueError(f"unknown prediction {kind!r}: choose one of {PREDICTIONS}")
