"""Images laid out on a grid and written as PNG: the sample grids of the sample stage and of
``diffusion generate``, and every picture of the pictures stage. Pillow only (no torchvision,
whose import costs a second in every process that writes a grid)."""

from __future__ import annotations

import io
import math
from typing import Any

from torch import Tensor

MIN_PIXELS = 32  # images are upscaled (nearest) to at least this size
GRID_PER_ROW = 10


def upscale_factor(images: Tensor, min_pixels: int = MIN_PIXELS) -> int:
    return max(1, math.ceil(min_pixels / images.shape[-1]))


def tile(images: Tensor, rows: int, cols: int, pad: int = 2, min_pixels: int = MIN_PIXELS) -> Any:
    """A PIL image of uint8 ``images`` (N, C, H, W) in ``rows x cols`` cells (row-major),
    upscaled to at least ``min_pixels``, ``pad`` white pixels around each; missing cells stay
    white."""
    from PIL import Image

    s = upscale_factor(images, min_pixels)
    c, h, w = images.shape[1], images.shape[2] * s, images.shape[3] * s
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(mode, (cols * (w + pad) + pad, rows * (h + pad) + pad), color=255 if
                       mode == "L" else (255, 255, 255))
    for k, img in enumerate(images[: rows * cols]):
        arr = img.repeat_interleave(s, 1).repeat_interleave(s, 2).permute(1, 2, 0).numpy()
        cell = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode=mode)
        r, q = divmod(k, cols)
        canvas.paste(cell, (pad + q * (w + pad), pad + r * (h + pad)))
    return canvas


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def array_png(array: Any) -> bytes:
    """One uint8 image ``(H, W, C)`` (C = 1 or 3) as PNG bytes."""
    from PIL import Image

    return png_bytes(Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array))


def grid_png(images: Tensor, limit: int = 100) -> bytes:
    """The first ``limit`` uint8 images ``(N, C, H, W)``, :data:`GRID_PER_ROW` a row, as PNG."""
    images = images[:limit]
    cols = min(GRID_PER_ROW, images.shape[0])
    return png_bytes(tile(images, math.ceil(images.shape[0] / cols), cols))
