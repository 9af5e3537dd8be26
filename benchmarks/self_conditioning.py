"""Self-conditioning for the recipe benchmark (an experiment of issue #13, not in the library yet).

Chen, Zhang & Hinton 2022, "Analog Bits: Generating Discrete Data using Diffusion Models with
Self-Conditioning", section 3.2: the network also sees its own previous estimate of the data,
``f(x_t, x0_hat, t)``. Training: for a random half of the batch ``x0_hat = stopgrad(x0 of
f(x_t, 0, t))`` (one extra forward pass on that half), for the other half ``x0_hat = 0``; the
loss is taken on the second pass only. Sampling: each network call gets the ``x_0`` estimate of
the previous call of the same trajectory (0 at its first step), so the number of network
evaluations does not change.

:class:`SelfConditioned` wraps a U-Net built with ``in_channels = 2`` (image and ``x0_hat``) and
keeps the first output channel; it takes the network's usual ``(x_in, t, labels)``, so the
library's training loop, EMA and samplers use it unchanged. The sampling state makes it a
benchmark tool, not a library feature: it assumes a variance-preserving process (``c_in = 1``,
so ``x_in = x_t``), one trajectory batch at a time, times that decrease along a trajectory (a
call at a time not below the previous one starts a new trajectory), and one network call per
time (classifier-free guidance, which calls it twice per step, would mix the two estimates).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_core.denoiser import process_coeffs
from diffusion_core.parameterization import eps_x0_from_prediction
from diffusion_core.processes import NoiseProcess


class SelfConditioned(nn.Module):
    """``f(x_t, x0_hat, t)`` around a U-Net with two input channels (see the module docstring).

    Args:
        net: the U-Net, ``in_channels = 2`` (output: two channels, the first one is used).
        process: the noise process (variance preserving).
        prediction: what ``net`` predicts (``eps``, ``x0`` or ``v``), to form ``x0_hat``.
        p: the share of training samples that get a self-conditioning estimate.
    """

    def __init__(self, net: nn.Module, process: NoiseProcess, prediction: str, p: float = 0.5):
        super().__init__()
        if getattr(net, "in_channels", 2) != 2:
            raise ValueError("self-conditioning needs a U-Net with in_channels = 2")
        self.net, self.process, self.prediction, self.p = net, process, prediction, p
        self.num_classes = getattr(net, "num_classes", 0)
        self.null_label = getattr(net, "null_label", None)
        self._previous: Tensor | None = None
        self._t: float | None = None

    @property
    def config(self) -> dict:
        return {**getattr(self.net, "config", {}), "self_conditioning": self.p}

    def _x0(self, x: Tensor, out: Tensor, t: Tensor) -> Tensor:
        alpha, sigma, _ = process_coeffs(self.process, t.to(torch.float64), x)
        x0 = eps_x0_from_prediction(self.prediction, out.to(x.dtype), x, alpha, sigma)[1]
        return x0.to(x.dtype)

    def _call(self, x: Tensor, x0_hat: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        return self.net(torch.cat([x, x0_hat.to(x.dtype)], 1), t, labels)[:, :1]

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.training:
            x0_hat = torch.zeros_like(x)
            use = torch.rand(x.shape[0], device=x.device) < self.p
            if use.any():  # the first pass on the self-conditioned part of the batch only
                xs, ts = x[use], t[use]
                with torch.no_grad():
                    out = self._call(xs, torch.zeros_like(xs), ts,
                                     labels[use] if labels is not None else None)
                    x0_hat[use] = self._x0(xs, out, ts).to(x.dtype)
            return self._call(x, x0_hat, t, labels)
        t_now = float(t.reshape(-1)[0])
        previous = self._previous
        if previous is None or previous.shape != x.shape or self._t is None or t_now >= self._t:
            previous = torch.zeros_like(x)  # a new trajectory
        out = self._call(x, previous, t, labels)
        self._previous, self._t = self._x0(x, out, t).detach(), t_now
        return out
