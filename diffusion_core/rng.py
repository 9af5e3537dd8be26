"""Per-image random streams from a counter-based generator.

Image ``i`` of a run draws all its noise from its own stream, keyed by ``seeds[i]``, so it is
identical whatever the batch size, batch composition or process count (the promise of EDM's
``StackedRandomGenerator``, Karras et al. 2022). Unlike one ``torch.Generator`` per image, the
streams are computed for the whole batch at once: draw number ``c`` of image ``i``, element
``j`` is a pure function of ``(seeds[i], c, j)``,

    key_ic = mix(seed_i * G1 + mix(c * G2))        element_j = mix(key_ic + (j + 1) * G3)

with ``mix`` the SplitMix64 finaliser (Steele, Lea & Flood 2014, the output function of
``java.util.SplittableRandom``), so a draw costs a fixed number of tensor operations however
many images are in the batch: no per-image kernel launches, no host work per image
(Salmon et al. 2011 argue the same for counter-based generators on GPUs). Normals come from
Box-Muller on the two 24-bit uniforms of each 64-bit word
(a word gives two normals).

The streams are the same on CPU and CUDA (integer arithmetic wraps the same way on both), so
a seed gives the same image on either device up to floating-point rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


G1 = 0x9E3779B97F4A7C15  # odd multipliers: SplitMix64's golden-ratio gamma and two others
G2 = 0xD1B54A32D192ED03
G3 = _signed(0xBF58476D1CE4E5B9 ^ 0x9E3779B97F4A7C15)
M1 = _signed(0xBF58476D1CE4E5B9)
M2 = _signed(0x94D049BB133111EB)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64_int(x: int) -> int:
    """:func:`mix64` on one Python integer (host arithmetic modulo 2^64), as a signed int64."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * (M1 & _MASK64)) & _MASK64
    x = ((x ^ (x >> 27)) * (M2 & _MASK64)) & _MASK64
    return _signed(x ^ (x >> 31))


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = (x ^ _shr(x, 30)) * M1
    x = (x ^ _shr(x, 27)) * M2
    return x ^ _shr(x, 31)


class StackedRNG:
    """Per-image counter-based streams; ``randn(shape)`` returns ``(len(seeds), *shape)``.

    ``draws`` counts the batched draws made so far: every call is one draw for the whole batch.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        keys = [_signed(s * G1) for s in self.seeds]
        self._keys = torch.tensor(keys, dtype=torch.int64, device=self.device)
        self.draws = 0
        self._offsets: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def _words(self, shape: Sequence[int]) -> Tensor:
        """One 64-bit word per element of ``(len(self), *shape)`` for the next draw."""
        self.draws += 1
        count = math.prod(shape)
        # the draw's counter is host arithmetic passed as a kernel argument: no device copy
        counter = mix64_int(self.draws * G2)
        stream = mix64(self._keys + counter)  # one key per image
        j = self._offsets.get(count)
        if j is None:  # (j + 1) * G3 for the elements, made once per shape
            j = torch.arange(1, count + 1, device=self.device, dtype=torch.int64) * G3
            self._offsets[count] = j
        words = mix64(stream[:, None] + j[None, :])
        return words.view(len(self), *shape)

    @staticmethod
    def _uniform(bits24: Tensor, dtype: torch.dtype) -> Tensor:
        """``(k + 0.5) / 2^24`` for 24-bit integers ``k``: uniform on (0, 1), never 0 or 1."""
        return (bits24.to(torch.float64 if dtype == torch.float64 else torch.float32) + 0.5) * (
            1.0 / (1 << 24)
        )

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        words = self._words(tuple(shape))
        return self._uniform(_shr(words, 40), dtype).to(dtype)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Box-Muller: each word's two 24-bit uniforms give two normals (cos and sin)."""
        count = math.prod(shape)
        words = self._words(((count + 1) // 2,))
        u1 = self._uniform(_shr(words, 40), dtype)
        u2 = self._uniform(_shr(words, 16) & ((1 << 24) - 1), dtype)
        radius, angle = torch.sqrt(-2.0 * torch.log(u1)), (2.0 * math.pi) * u2
        normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
        return normals[:, :count].reshape(len(self), *shape).to(dtype)

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
