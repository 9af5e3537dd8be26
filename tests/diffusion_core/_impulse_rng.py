"""A noise source for reading off a sampler's law, shared by the sampler and guidance tests."""

from __future__ import annotations

import torch

from diffusion_core.rng import StackedRNG


class ImpulseRNG(StackedRNG):
    """Noise that reads off an affine sampler's law: on its k-th draw, image k + 2 gets ones and
    every other image zeros."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __len__(self) -> int:
        return self.n

    def randn(self, shape, dtype=torch.float32):
        out = torch.zeros(self.n, *shape, dtype=torch.float64)
        if self.calls + 2 < self.n:
            out[self.calls + 2] = 1.0
        self.calls += 1
        return out
