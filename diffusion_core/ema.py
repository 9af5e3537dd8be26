"""Exponential moving average of model weights (Polyak & Juditsky 1992; used for sampling by
Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Sec. 4, and Song et al. 2021).

After every optimiser step ``k`` (``k = 0, 1, ...`` counts the updates already done):

    theta_ema <- d_k * theta_ema + (1 - d_k) * theta,
    d_k = min(decay, (1 + k) / (10 + k))   with warm-up,    d_k = decay   without.

The warm-up (the schedule of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``) keeps the
average from being dominated by the random initial weights early in training. Buffers that are not
floating point (counters) and all buffers in general are copied, not averaged.

Power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models" (EDM2), Sec. 3.1, eq. 2-3): with ``std`` given,

    d_k = (1 - 1/(k + 1))^(gamma + 1),   std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),

so after ``K`` updates the average weighs the weights after update ``k`` (1-based) by
``(k^(gamma+1) - (k-1)^(gamma+1)) / K^(gamma+1)`` (a telescoping product), a profile ``~ k^gamma``
whose width is the fraction ``std`` of the training so far at every length of run: no decay to
re-tune when a run is a few hundred steps instead of a few hundred thousand.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["EMA", "power_ema_gamma", "power_ema_std", "unwrap_model"]

#: the largest relative std a power-function profile can have (near gamma = -0.3)
MAX_POWER_EMA_STD = 0.28


def power_ema_std(gamma: float) -> float:
    """Relative standard deviation of the profile ``p(tau) ~ tau^gamma`` on ``[0, 1]``:
    ``sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (EDM2, eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_ema_gamma(std: float) -> float:
    """The exponent ``gamma`` of the power-function EMA with relative std ``std``: the largest
    real root of ``gamma^3 + 7 gamma^2 + (16 - 1/std^2) gamma + (12 - 1/std^2) = 0`` (eq. 3
    multiplied out)."""
    if not 0.0 < std <= MAX_POWER_EMA_STD:
        raise ValueError(f"power EMA std must be in (0, {MAX_POWER_EMA_STD}], got {std}")
    c = 1.0 / std**2
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside ``DistributedDataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


class EMA:
    """An averaged copy of a model: ``theta_ema <- d_k theta_ema + (1 - d_k) theta``.

    Args:
        model: the trained model (wrappers such as DDP or ``torch.compile`` are looked through).
        decay: the asymptotic decay ``d`` in ``[0, 1)``.
        warmup: use ``d_k = min(decay, (1 + k) / (10 + k))`` after ``k`` earlier updates.
        std: if given, the power-function EMA of that relative std instead (``decay`` and
            ``warmup`` are then unused).

    ``ema.module`` is the averaged copy (in eval mode, no gradients); ``copy_to(model)`` writes
    it into another model of the same architecture.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True,
                 std: float | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.std = None if std is None else float(std)
        self.gamma = None if std is None else power_ema_gamma(std)
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """``d_k`` for the next update (``k = num_updates``)."""
        if self.gamma is not None:
            return (1.0 - 1.0 / (self.num_updates + 1)) ** (self.gamma + 1.0)
        if not self.warmup:
            return self.decay
        k = self.num_updates
        return min(self.decay, (1.0 + k) / (10.0 + k))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step ``theta_ema <- d_k theta_ema + (1 - d_k) theta`` over all float parameters.

        The averaging is one multi-tensor (``torch._foreach_*``) multiply and add over all
        parameters, not two kernels per parameter: on a GPU a small model's per-parameter loop
        costs more launches than its forward pass. Element by element it is the same arithmetic.
        """
        d = self.current_decay()
        src = unwrap_model(model)
        pairs = self._pairs(src)
        if pairs["float"][0]:
            ema_f, src_f = pairs["float"]
            torch._foreach_mul_(ema_f, d)
            torch._foreach_add_(ema_f, [p.detach().to(e.dtype) for p, e in zip(src_f, ema_f,
                                                                                strict=True)],
                                alpha=1.0 - d)
        for e, p in zip(*pairs["copy"], strict=True):
            e.copy_(p)
        self.num_updates += 1

    def _pairs(self, src: nn.Module) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Matching (EMA, source) tensors by name, found once per source model: floating-point
        parameters are averaged, other parameters and all buffers copied."""
        if getattr(self, "_pairs_of", None) is not src:
            ema_params = dict(self.module.named_parameters())
            ema_buffers = dict(self.module.named_buffers())
            avg: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
            copy_: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
            for name, p in src.named_parameters():
                e = ema_params[name]
                target = avg if e.dtype.is_floating_point else copy_
                target[0].append(e)
                target[1].append(p)
            for name, b in src.named_buffers():
                copy_[0].append(ema_buffers[name])
                copy_[1].append(b)
            self._pairs_of, self._pair_lists = src, {"float": avg, "copy": copy_}
        return self._pair_lists

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (same architecture)."""
        unwrap_model(model).load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """Plain state (tensors and numbers): the averaged weights and the update counter."""
        return {
            "module": self.module.state_dict(),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
            "std": self.std,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the decay settings given at construction are kept)."""
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
