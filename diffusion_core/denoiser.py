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

    Clipping the ``x_0`` estimate is a sampling option, not a property of the network: see
    :class:`ClipX0` (applied once, outermost, by :func:`diffusion_core.samplers.generate`).
    """

    def __init__(self, net: nn.Module, process: NoiseProcess, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: choose one of {PREDICTIONS}")
        self.net, self.process, self.prediction = net, process, prediction

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
        return DenoiserOutput(*eps_x0_from_prediction(self.prediction, out, x, alpha, sigma))


class ClipX0:
    """``x0 <- clip(x0, -value, value)``, then ``eps <- (x_t - alpha x0) / sigma`` (the pair
    stays consistent with ``x_t = alpha x0 + sigma eps``), around any denoiser.

    Ho et al. 2020's sampler clips ``x_0`` to the data range ("clip_denoised"); diffusers'
    ``clip_sample`` does the same (DDIM re-derives eps only with ``use_clipped_model_output``).
    Wrap the OUTERMOST denoiser (after guidance), so a guided ``x_0`` is clipped exactly once.
    """

    def __init__(self, denoiser: DenoiserLike, value: float = 1.0):
        if value <= 0:
            raise ValueError(f"clip value must be > 0, got {value}")
        self.denoiser, self.value = denoiser, float(value)
        self.process = denoiser.process

    def __call__(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> DenoiserOutput:
        out = self.denoiser(x, t, labels)
        tb = time_batch(t, x)
        alpha = broadcast(self.process.alpha(tb), x)
        sigma = broadcast(self.process.sigma(tb), x)
        x0 = out.x0.clamp(-self.value, self.value)
        return DenoiserOutput(eps_from_x0(x, x0, alpha, sigma), x0)
