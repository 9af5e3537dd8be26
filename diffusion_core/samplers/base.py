"""What every sampler shares: the result type, the callback, and per-step coefficients."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from diffusion_core.processes import NoiseProcess

Callback = Callable[[dict], None]


class SampleResult(NamedTuple):
    """Final images and the number of function (denoiser) evaluations spent on them."""

    x: Tensor
    nfe: int


def coeffs(process: NoiseProcess, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Scalar ``(alpha(t), sigma(t))`` in x's dtype and device."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return (process.alpha(t).to(x.device, x.dtype), process.sigma(t).to(x.device, x.dtype))


def report(callback: Callback | None, i: int, t: Tensor, x: Tensor, x0_pred: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "t": float(t), "x": x, "x0_pred": x0_pred})


def check_grid(grid: Tensor) -> None:
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError("grid must be a 1-D tensor of at least two times")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("grid must be strictly decreasing (from t=1 towards 0)")
