"""Per-image random streams (as in EDM's ``StackedRandomGenerator``, Karras et al. 2022).

Image ``i`` of a run draws all its noise from its own ``torch.Generator`` seeded with
``seeds[i]``, so it is identical whatever the batch size, batch composition or process count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class StackedRNG:
    """One generator per image; ``randn(shape)`` returns ``(len(seeds), *shape)``."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
             for g in self.generators])

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.stack(
            [torch.rand(tuple(shape), generator=g, device=self.device, dtype=dtype)
             for g in self.generators])

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} images but {len(self)} generators")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    def rademacher_like(self, x: Tensor) -> Tensor:
        """Random signs, for Hutchinson's trace estimator."""
        u = self.rand(x.shape[1:], dtype=x.dtype).to(x.device)
        return torch.where(u < 0.5, -torch.ones_like(u), torch.ones_like(u))


def randn(shape: Sequence[int], rng: StackedRNG | torch.Generator | None, device=None) -> Tensor:
    """Standard normal noise of ``shape`` (batch first) from ``rng`` (stacked, a generator, or global)."""
    if isinstance(rng, StackedRNG):
        if shape[0] != len(rng):
            raise ValueError(f"batch of {shape[0]} images but {len(rng)} generators")
        out = rng.randn(shape[1:])
        return out.to(device) if device is not None else out
    if isinstance(rng, torch.Generator):
        return torch.randn(tuple(shape), generator=rng, device=rng.device).to(device or rng.device)
    return torch.randn(tuple(shape), device=device)


def randn_like(x: Tensor, rng: StackedRNG | torch.Generator | None) -> Tensor:
    return randn(x.shape, rng, device=x.device).to(x.dtype)
