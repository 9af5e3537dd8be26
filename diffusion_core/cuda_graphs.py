"""Replay the network's forward pass as a CUDA graph, for fixed-shape sampling.

A sampler calls the same network on the same batch shape tens to thousands of times. On a GPU
each eager call launches every kernel of the network from Python; a CUDA graph records those
launches once and replays them with one call (``torch.cuda.CUDAGraph``), so the host no longer
limits a small network. :class:`CUDAGraphNet` wraps ``net(x, t, labels)``: the first call for a
new input signature (shapes and dtypes) warms up on a side stream and captures a graph over
static input buffers; every later call copies its inputs into those buffers, replays, and returns
a copy of the output (samplers keep earlier outputs, which the next replay would overwrite).

It is used only on CUDA, without autograd (sampling); otherwise it calls ``net`` as is. Graphs
hold their own memory pools: one per signature (a guided batch is twice the plain one).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["CUDAGraphNet"]


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    x: Tensor
    t: Tensor
    labels: Tensor | None
    out: Tensor


class CUDAGraphNet(nn.Module):
    """``net(x, t, labels)`` replayed from one CUDA graph per input signature."""

    def __init__(self, net: nn.Module, warmup: int = 2):
        super().__init__()
        self.net, self.warmup = net, int(warmup)
        self._graphs: dict[tuple, _Graph] = {}

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0) or 0)

    @property
    def null_label(self) -> int | None:
        return getattr(self.net, "null_label", None)

    @property
    def config(self) -> dict | None:
        return getattr(self.net, "config", None)

    @property
    def captured(self) -> int:
        """How many graphs (input signatures) have been captured."""
        return len(self._graphs)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if x.device.type != "cuda" or torch.is_grad_enabled():
            return self.net(x, t, labels)
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype,
               None if labels is None else (tuple(labels.shape), labels.dtype))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x, t, labels)
        entry.x.copy_(x)
        entry.t.copy_(t)
        if labels is not None:
            entry.labels.copy_(labels)  # type: ignore[union-attr]
        entry.graph.replay()
        return entry.out.clone()

    def _capture(self, x: Tensor, t: Tensor, labels: Tensor | None) -> _Graph:
        sx, st = x.clone(), t.clone()
        sl = labels.clone() if labels is not None else None
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up: cuDNN/cuBLAS choose their kernels here
            for _ in range(self.warmup):
                self.net(sx, st, sl)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.net(sx, st, sl)
        return _Graph(graph, sx, st, sl, out)
