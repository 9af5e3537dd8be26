"""Datasets of your own: a folder of image files, read with Pillow into ``[-1, 1]`` tensors.

Two layouts (as ``torchvision.datasets.ImageFolder``, without its silent guesses):

- one subfolder per class, ``root/<class>/**/<image>``: labels ``0..K-1`` follow the sorted
  subfolder names;
- flat, ``root/<image>``: unlabelled (an unconditional dataset, ``labels is None``).

Files whose names start with ``.`` and files without an image suffix (:data:`IMAGE_SUFFIXES`) are
ignored; a folder mixing both layouts, an empty folder or class folder, and a file Pillow cannot
decode are :class:`~diffusion_core.data.DatasetUnavailable` errors naming the path. Every image is
centre-cropped to a square and resized (bicubic) to ``image_size``; ``channels`` 1 or 3 converts
every image to grey (``L``) or ``RGB``, ``None`` keeps the one kind the folder holds and refuses a
mix of grey and colour images.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from diffusion_core.data import DatasetUnavailable, from_levels

__all__ = [
    "IMAGE_SUFFIXES",
    "FolderLayout",
    "ImageFolder",
    "MixedImageModes",
    "folder_channels",
    "load_image_folder",
    "scan_image_folder",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
#: Pillow modes that hold one grey value per pixel (anything else is treated as colour)
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class MixedImageModes(DatasetUnavailable):  # noqa: N818 (a kind of DatasetUnavailable)
    """The folder holds grey and colour images and no channel count was chosen."""


class FolderLayout(NamedTuple):
    """The image files of a folder and their labels, found without decoding any image."""

    files: list[Path]
    labels: list[int] | None  # None: a flat, unlabelled folder
    classes: list[str]  # sorted class-subfolder names; empty when flat


class ImageFolder(NamedTuple):
    """A decoded image folder: images float32 ``(N, C, S, S)`` in ``[-1, 1]``."""

    images: Tensor
    labels: Tensor | None  # int64 (N,); None when the folder is flat
    classes: list[str]


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(root: str | Path) -> FolderLayout:
    """The layout of ``root``: one subfolder per class (labels from sorted names) or flat."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetUnavailable(f"image folder {root} does not exist (or is not a folder)")
    flat = sorted(p for p in root.iterdir() if _is_image(p))
    class_dirs = _visible_dirs(root)
    if flat and class_dirs:
        raise DatasetUnavailable(
            f"image folder {root} mixes images ({flat[0].name}, ...) with subfolders "
            f"({class_dirs[0].name}, ...): put every image in a class subfolder, or none"
        )
    if flat:
        return FolderLayout(flat, None, [])
    if not class_dirs:
        raise DatasetUnavailable(
            f"image folder {root} holds no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(class_dirs):
        found = sorted(
            p for p in folder.rglob("*")
            if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not found:
            raise DatasetUnavailable(f"class folder {folder} holds no images")
        files += found
        labels += [label] * len(found)
    return FolderLayout(files, labels, [d.name for d in class_dirs])


def _unreadable(path: Path, exc: BaseException) -> DatasetUnavailable:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DatasetUnavailable(f"cannot read image {path}: {first}")


def _mode(path: Path) -> str:
    """The Pillow mode of ``path`` from its header (no decoding)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None


def _decode(path: Path, mode: str, image_size: int) -> np.ndarray:
    """``path`` converted to ``mode`` (``L``/``RGB``), centre-cropped and resized: uint8 (S, S, C)."""
    from PIL import Image, ImageOps

    size = (image_size, image_size)
    try:
        with Image.open(path) as image:
            image.load()
            converted = image.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None
    if converted.size != size:
        converted = ImageOps.fit(converted, size, method=Image.Resampling.BICUBIC)
    return np.asarray(converted, dtype=np.uint8).reshape(image_size, image_size, len(mode))


def _kind(mode: str) -> int:
    """1 for grey Pillow modes, 3 for colour ones."""
    return 1 if mode in _GREY_MODES else 3


def folder_channels(layout: FolderLayout) -> int:
    """1 if every image of ``layout`` is grey, 3 if every one is colour (read from the headers);
    a DatasetUnavailable naming one file of each kind if the folder mixes them."""
    kinds: dict[int, tuple[Path, str]] = {}
    for path in layout.files:
        mode = _mode(path)
        kinds.setdefault(_kind(mode), (path, mode))
        if len(kinds) > 1:
            (grey, grey_mode), (colour, colour_mode) = kinds[1], kinds[3]
            raise MixedImageModes(
                f"the image folder mixes grey and colour images ({grey} is {grey_mode}, "
                f"{colour} is {colour_mode}): set channels to 1 or 3 to convert them all"
            )
    return next(iter(kinds))


def load_image_folder(
    root: str | Path, image_size: int, channels: int | None = None
) -> ImageFolder:
    """Decode every image of ``root`` (see the module docstring) to ``(N, C, S, S)`` in [-1, 1].

    Pixels are 8-bit levels ``k`` mapped by ``from_levels(k, 256)``. ``channels=None`` takes the
    channel count from the files and refuses a folder that mixes grey and colour images.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    layout = scan_image_folder(root)
    if channels is None:
        channels = folder_channels(layout)
    mode = "L" if channels == 1 else "RGB"
    levels = np.stack([_decode(path, mode, image_size) for path in layout.files])
    images = from_levels(levels.transpose(0, 3, 1, 2).astype(np.int64), 256).contiguous()
    labels = None if layout.labels is None else torch.tensor(layout.labels, dtype=torch.int64)
    return ImageFolder(images, labels, layout.classes)
