"""A small fixed nonlinear network of (x, t) for agreement tests against diffusers: the same
weights (seed 0) and the same outputs in every run, ``skip * x + bias + 0.3 * conv(silu(...))``."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, skip: float, bias: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)
        self.w = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.skip, self.bias = skip, bias

    def forward(self, x, t, labels=None):
        h = torch.nn.functional.silu(self.c1(x) + self.w * t.reshape(-1, 1, 1, 1))
        return self.skip * x + self.bias + 0.3 * self.c2(h)
