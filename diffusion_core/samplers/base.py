"""What every sampler shares: the result type, the callback, and per-step coefficients."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from diffusion_core.processes import NoiseProcess

Callback = Callable[[dict], None]


class SampleResult(NamedTuple):
    """Final images and the number of function (denoiser) evaluations spent on them."""

    x: Tensor
    nfe: int


def coeffs(process: NoiseProcess, t: Tensor | float) -> tuple[float, float]:
    """``(alpha(t), sigma(t))`` of one grid time as Python floats.

    Grids live on the host, so a step's coefficients are host arithmetic in float64 and reach
    the device as kernel arguments: no host-to-device copy (which would synchronise a CUDA
    sampling loop) and no work that grows with the batch."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return float(process.alpha(t)), float(process.sigma(t))


def combine(terms: Sequence[tuple[float, Tensor]]) -> Tensor:
    """``sum_k c_k T_k`` for host-side float coefficients: one multiply, then one fused
    multiply-add per further term (``Tensor.add_(T, alpha=c)``), so an update of any order costs
    as many passes over the batch as it has tensors, and no temporaries beyond its result."""
    (c0, t0), *rest = terms
    out = t0 * c0
    for c, t in rest:
        if c != 0.0:
            out.add_(t, alpha=c)
    return out


def report(callback: Callback | None, i: int, t: Tensor, x: Tensor, x0_pred: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "t": float(t), "x": x, "x0_pred": x0_pred})


def check_grid(grid: Tensor) -> None:
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError("grid must be a 1-D tensor of at least two times")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("grid must be strictly decreasing (from t=1 towards 0)")
