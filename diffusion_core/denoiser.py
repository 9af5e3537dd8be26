"""The denoiser: a network plus its parameterisation, the one interface every sampler calls.

``denoiser(x_t, t, labels) -> DenoiserOutput(eps, x0)`` returns ``E[eps | x_t]`` and
``E[x_0 | x_t]`` (Tweedie's formula links them: ``x_t = alpha x0 + sigma eps``). The network sees
the input scaled by ``c_in(t) = 1 / sqrt(alpha^2 + sigma^2)`` (EDM, Karras et al. 2022, Table 1,
with unit data variance), so its input has roughly unit variance for every process: a no-op for
VP/DDPM, essential for VE where ``sigma`` reaches 50.
"""

from __future__ import annotations

import math
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


def input_scale(alpha: Tensor | float, sigma: Tensor | float) -> Tensor | float:
    """``c_in = 1 / sqrt(alpha^2 + sigma^2)``: the inverse std of ``x_t`` for unit-variance data."""
    if isinstance(alpha, float) and isinstance(sigma, float):
        return 1.0 / math.sqrt(alpha**2 + sigma**2)
    return torch.rsqrt(torch.as_tensor(alpha**2 + sigma**2))


def time_batch(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample time to shape ``(B,)`` on x's device (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t


def scalar_time(t: Tensor | float) -> float | None:
    """``t`` as a Python float when it is ONE time held on the host, else ``None``.

    Samplers step on host-side grids, so every coefficient of a step can be computed on the
    host and passed to the device as a kernel argument: no host-to-device copy, hence no
    synchronisation, inside the sampling loop (on CUDA the host then queues work ahead of the
    GPU). A time already on an accelerator is never read back (that would synchronise)."""
    if isinstance(t, int | float):
        return float(t)
    if isinstance(t, Tensor) and t.dim() == 0 and t.device.type == "cpu":
        return float(t)
    return None


def process_coeffs(process: NoiseProcess, t: Tensor | float, x: Tensor
                   ) -> tuple[Tensor | float, Tensor | float, Tensor]:
    """``(alpha(t), sigma(t), t_batch)`` for ``x``: Python floats for one host-side time
    (:func:`scalar_time`), otherwise per-sample tensors broadcast against ``x``; ``t_batch`` is
    the ``(B,)`` float64 time batch on x's device either way."""
    ts = scalar_time(t)
    if ts is not None:
        t64 = torch.tensor(ts, dtype=torch.float64)
        alpha, sigma = float(process.alpha(t64)), float(process.sigma(t64))
        return alpha, sigma, torch.full((x.shape[0],), ts, dtype=torch.float64, device=x.device)
    tb = time_batch(t, x)
    return broadcast(process.alpha(tb), x), broadcast(process.sigma(tb), x), tb


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
        alpha, sigma, tb = process_coeffs(self.process, t, x)
        out = self.net(x * input_scale(alpha, sigma), tb.to(x.dtype), labels)
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
        alpha, sigma, _ = process_coeffs(self.process, t, x)
        x0 = out.x0.clamp(-self.value, self.value)
        return DenoiserOutput(eps_from_x0(x, x0, alpha, sigma), x0)
