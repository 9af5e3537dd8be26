"""Sampling shared out over ``torchrun`` ranks, as EDM's ``generate.py`` does it; the sample stage
and ``diffusion generate`` both draw through here, and it samples through
:func:`pipeline.sampling.sample_images`.

Rank ``r`` of ``W`` draws images ``r, r + W, r + 2W, ...`` (:func:`share`) in batches, image ``i``
from seed ``first_seed + i`` with label ``labels[i]`` (:func:`draw`), and :func:`gather` puts
every rank's images back in order. An image depends on its seed and label only, not on the batch
it was drawn in, so ``W`` processes give the images of one process, bit for bit (on one kind of
device). In a single process :func:`share` is every image and :func:`gather` costs one copy::

    mine = draw(model, guided, recipe, indices=share(n, rank, world), first_seed=0,
                labels=None, batch_size=64, device=device, desc="ddim")
    everything = gather(mine, n)  # on every rank; rank 0 writes the files
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from diffusion_core.distributed import all_gather_object
from pipeline.sampling import Model, Recipe, sample_images


class Drawn(NamedTuple):
    """Images ``indices`` as uint8 ``(k, C, H, W)`` and the denoiser evaluations ``(k,)`` of the
    batch each was drawn in."""

    indices: list[int]
    images: Tensor
    nfe: Tensor


def share(n: int, rank: int, world: int) -> list[int]:
    """The images rank ``rank`` of ``world`` draws: ``rank, rank + world, ...`` below ``n``."""
    return list(range(rank, n, world))


def draw(
    model: Model,
    guided: Any,
    recipe: Recipe,
    *,
    indices: Sequence[int],
    first_seed: int,
    labels: Tensor | None,
    batch_size: int,
    device: torch.device,
    desc: str,
    on_batch: Callable[[list[int], Tensor], None] | None = None,
) -> Drawn:
    """Draw images ``indices`` (seed ``first_seed + i``, label ``labels[i]`` of all the labels,
    None for the null label) with :func:`~pipeline.sampling.sample_images` in batches of
    ``batch_size``, with a progress bar ``desc`` counting images (rank 0);
    ``on_batch(indices, images)`` sees each batch's uint8 images as soon as they are drawn."""
    indices = list(indices)

    def seen(positions: list[int], images: Tensor) -> None:
        assert on_batch is not None
        on_batch([indices[k] for k in positions], images)

    out = sample_images(
        model, guided, recipe, seeds=[first_seed + i for i in indices],
        labels=None if labels is None else labels[indices], device=device,
        batch_size=batch_size, desc=desc, on_batch=seen if on_batch is not None else None,
    )
    return Drawn(indices, out.images, out.calls)


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
