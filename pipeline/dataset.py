"""The configured dataset: its facts (size, shape, classes) and its images for ``prepare``.

The registered datasets have fixed facts (:data:`pipeline.dataset_facts.DATASETS`). An image folder's
come from its files: once ``prepare`` has run, from what it recorded in
``data/prepared/info.json`` (what every later stage trained and scored on), before that from a
scan of the folder (file names only, plus the image headers when ``data.channels`` is null).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from diffusion_core.data import DatasetUnavailable, load_dataset
from diffusion_core.image_folder import (
    MixedImageModes,
    folder_channels,
    load_image_folder,
    scan_image_folder,
)
from pipeline import paths
from pipeline.config import DataParams, Params, ParamsError
from pipeline.dataset_facts import DATASETS, FOLDER, FOLDER_PIXEL_LEVELS, DatasetInfo
from pipeline.errors import StageError
from pipeline.files import read_json


class Loaded(NamedTuple):
    """A dataset as ``prepare`` splits it."""

    images: Tensor  # float32 (N, C, H, W) in [-1, 1]
    labels: Tensor  # int64 (N,); all 0 for an unlabelled folder
    info: DatasetInfo
    classes: list[str] | None  # a folder's class-subfolder names ([] when flat)


def source(data: DataParams) -> dict[str, Any]:
    """The ``data`` keys that decide which images are loaded (recorded in ``info.json``)."""
    return data.model_dump(mode="json", include={"dataset", "root", "image_size", "channels"})


def dataset_info(params: Params) -> DatasetInfo:
    """Facts of ``params.data``'s dataset (a ParamsError naming the key if the folder is unusable)."""
    static = DATASETS.get(params.data.dataset)
    if static is not None:
        return static
    recorded = _prepared_info(params.data)
    if recorded is not None:
        return recorded
    return _scan(params.data.root, params.data.image_size, params.data.channels)


def _prepared_info(data: DataParams) -> DatasetInfo | None:
    if not paths.DATA_INFO.is_file():
        return None
    info = read_json(paths.DATA_INFO)
    if info.get("source") != source(data):
        return None
    channels, size, _ = info["image_shape"]
    return DatasetInfo(
        size=info["n_train"] + info["n_test"],
        image_size=size,
        channels=channels,
        num_classes=info["num_classes"],
        pixel_levels=info["pixel_levels"],
    )


def _scan(root: str | None, image_size: int | None, channels: int | None) -> DatasetInfo:
    if root is None or image_size is None:  # refused by validation; kept for type narrowing
        raise ParamsError("data: the folder dataset needs root and image_size")
    try:
        layout = scan_image_folder(root)
        found = channels if channels is not None else folder_channels(layout)
    except MixedImageModes as exc:
        raise ParamsError(f"data.channels: {exc} (got None)") from None
    except DatasetUnavailable as exc:
        raise ParamsError(f"data.root: {exc} (got {root!r})") from None
    return DatasetInfo(
        size=len(layout.files),
        image_size=image_size,
        channels=found,
        num_classes=len(layout.classes),
        pixel_levels=FOLDER_PIXEL_LEVELS,
    )


def load(params: Params) -> Loaded:
    """The images and labels of ``params.data`` (a StageError if the files are unusable)."""
    data = params.data
    try:
        if data.dataset != FOLDER:
            images, labels = load_dataset(data.dataset, root=data.root, download=data.download)
            facts = DATASETS[data.dataset]._replace(size=int(images.shape[0]))
            return Loaded(images, labels, facts, None)
        assert data.root is not None and data.image_size is not None  # validated
        folder = load_image_folder(data.root, data.image_size, data.channels)
    except DatasetUnavailable as exc:
        raise StageError(f"dataset {data.dataset!r} unavailable: {exc}") from None
    n = folder.images.shape[0]
    labels = folder.labels if folder.labels is not None else torch.zeros(n, dtype=torch.int64)
    info = DatasetInfo(
        size=n,
        image_size=data.image_size,
        channels=int(folder.images.shape[1]),
        num_classes=len(folder.classes),
        pixel_levels=FOLDER_PIXEL_LEVELS,
    )
    return Loaded(folder.images, labels, info, folder.classes)
