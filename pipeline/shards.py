"""Sampling shared out over ``torchrun`` ranks, as EDM's ``generate.py`` does it; the sample stage
and ``diffusion generate`` both draw through here.

Rank ``r`` of ``W`` draws images ``r, r + W, r + 2W, ...`` (:func:`share`) in batches, image ``i``
from seed ``first_seed + i`` with label ``labels[i]`` (:func:`draw`), and :func:`gather` puts
every rank's images back in order. An image depends on its seed and label only, not on the batch
it was drawn in, so ``W`` processes give the images of one process, bit for bit (on one kind of
device). In a single process :func:`share` is every image and :func:`gather` costs one copy::

    mine = draw(denoiser, process, "ddim", indices=share(n, rank, world), first_seed=0,
                labels=None, shape=(1, 8, 8), batch_size=64, device=device, desc="ddim", steps=50)
    everything = gather(mine, n)  # on every rank; rank 0 writes the files
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from diffusion_core.data import to_uint8
from diffusion_core.distributed import all_gather_object
from diffusion_core.samplers import generate
from pipeline.progress import Progress

#: samplers with at least this many steps also show a bar per step within each batch
STEP_BAR_MIN = 100


class Drawn(NamedTuple):
    """Images ``indices`` as uint8 ``(k, C, H, W)`` and the denoiser evaluations ``(k,)`` of the
    batch each was drawn in."""

    indices: list[int]
    images: Tensor
    nfe: Tensor


def share(n: int, rank: int, world: int) -> list[int]:
    """The images rank ``rank`` of ``world`` draws: ``rank, rank + world, ...`` below ``n``."""
    return list(range(rank, n, world))


def step_progress(desc: str, steps: int | None) -> Progress:
    """A per-step bar for long samplers (``steps >= STEP_BAR_MIN``), else a silent one."""
    long = steps is not None and steps >= STEP_BAR_MIN
    return Progress(steps or 0, f"{desc} steps", unit="step", leave=False, enabled=long)


def draw(
    denoiser: Any,
    process: Any,
    sampler: str,
    *,
    indices: Sequence[int],
    first_seed: int,
    labels: Tensor | None,
    shape: Sequence[int],
    batch_size: int,
    device: torch.device,
    desc: str,
    on_batch: Callable[[list[int], Tensor], None] | None = None,
    **settings: Any,
) -> Drawn:
    """Draw images ``indices`` (seed ``first_seed + i``, label ``labels[i]`` of all the labels,
    None for the null label) in batches of ``batch_size``, with a progress bar ``desc`` counting
    images (rank 0). ``settings`` (``steps``, ``spacing``, ``eta``, ...) go to
    :func:`diffusion_core.samplers.generate`; ``on_batch(indices, images)`` sees each batch's
    uint8 images as soon as they are drawn."""
    steps = None if sampler == "ode_rk45" else settings.get("steps")
    chunks = [torch.zeros((0, *shape), dtype=torch.uint8)]
    nfe = [torch.zeros(0, dtype=torch.int64)]
    bar = Progress(len(indices), desc, unit="img", every=batch_size)
    with torch.no_grad(), bar:
        for lo in range(0, len(indices), batch_size):
            idx = list(indices[lo : lo + batch_size])
            with step_progress(desc, steps) as step_bar:
                out = generate(
                    denoiser, process, sampler, shape=shape,
                    seeds=[first_seed + i for i in idx],
                    labels=None if labels is None else labels[idx],
                    device=device,
                    callback=step_bar.callback() if step_bar.enabled else None,
                    **settings,
                )
            images = to_uint8(out.x.cpu())
            if on_batch is not None:
                on_batch(idx, images)
            chunks.append(images)
            nfe.append(torch.full((len(idx),), out.nfe, dtype=torch.int64))
            bar.update(len(idx), nfe=out.nfe)
    return Drawn(list(indices), torch.cat(chunks), torch.cat(nfe))


def gather(drawn: Drawn, n: int) -> Drawn:
    """Images ``0..n-1`` from the :class:`Drawn` of every rank, in order, on every rank (a
    collective: every rank calls it). Raises ``ValueError`` if the ranks did not draw each image
    exactly once."""
    parts = all_gather_object((drawn.indices, drawn.images, drawn.nfe))
    covered = sorted(i for indices, _, _ in parts for i in indices)
    if covered != list(range(n)):
        raise ValueError(f"the ranks drew {len(covered)} images, not each of 0..{n - 1} once")
    images = torch.empty((n, *drawn.images.shape[1:]), dtype=torch.uint8)
    nfe = torch.empty(n, dtype=torch.int64)
    for indices, part_images, part_nfe in parts:
        images[indices] = part_images
        nfe[indices] = part_nfe
    return Drawn(list(range(n)), images, nfe)
