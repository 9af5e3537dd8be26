"""The denoiser: a network plus its parameterisation, the one interface every sampler calls.

``denoiser(x_t, t, labels) -> DenoiserOutput(eps, x0)`` returns ``E[eps | x_t]`` and
``E[x_0 | x_t]`` (Tweedie's formula links them: ``x_t = alpha x0 + sigma eps``). The network sees
the input scaled by ``c_in(t) = 1 / sqrt(alpha^2 + sigma^2)`` (EDM, Karras et al. 2022, Table 1,
with unit data variance), so its input has roughly unit variance for every process: a no-op for
VP/DDPM, essential for VE where ``sigma`` reaches 50.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from diffusion_core.parameterization import PREDICTIONS, eps_from_x0, eps_x0_from_prediction
from diffusion_core.processes import NoiseProcess, broadcast


class DenoiserOutput(NamedTuple):
    eps: Tensor
    x0: Tensor


class DenoiserLike(Protocol):
    """Anything samplers can call: a :class:`Denoiser`, a guidance wrapper, an analytic model."""

    process: NoiseProcess

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> DenoiserOutput: ...


def input_scale(alpha: Tensor, sigma: Tensor) -> Tensor:
    """``c_in = 1 / sqrt(alpha^2 + sigma^2)``: the inverse std of ``x_t`` for unit-variance data."""
    return torch.rsqrt(alpha**2 + sigma**2)


def time_batch(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample time to shape ``(B,)`` on x's device (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t


class Denoiser(nn.Module):
    """Wraps ``net(x, t, labels)`` predicting ``eps``, ``x0`` or ``v``.

    ``clip_x0`` clamps the ``x_0`` estimate to ``[-clip_value, clip_value]`` (the data range) and
    recomputes ``eps`` from it, as DDPM's reference sampler does ("clip_denoised").
    """

    def __init__(
        self,
        net: nn.Module,
        process: NoiseProcess,
        prediction: str = "eps",
        *,
        clip_x0: bool = False,
        clip_value: float = 1.0,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: choose one of {PREDICTIONS}")
        self.net, self.process, self.prediction = net, process, prediction
        self.clip_x0, self.clip_value = clip_x0, clip_value

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0) or 0)

    @property
    def null_label(self) -> int | None:
        return getattr(self.net, "null_label", None)

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> DenoiserOutput:
        t = time_batch(t, x)
        alpha = broadcast(self.process.alpha(t), x)
        sigma = broadcast(self.process.sigma(t), x)
        out = self.net(x * input_scale(alpha, sigma), t.to(x.dtype), labels)
        eps, x0 = eps_x0_from_prediction(self.prediction, out, x, alpha, sigma)
        if self.clip_x0:
            x0 = x0.clamp(-self.clip_value, self.clip_value)
            eps = eps_from_x0(x, x0, alpha, sigma)
        return DenoiserOutput(eps, x0)
