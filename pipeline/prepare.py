"""Stage ``prepare``: load the dataset, split it by class, write ``data/prepared/``.

``train.pt`` and ``test.pt`` hold ``{"images": float32 (N, C, H, W) in [-1, 1], "labels": int64}``;
``info.json`` the shapes, class counts and content digests (provenance: ``provenance/prepare.json``),
the pixel levels, the ``data`` keys that chose the images (``source``) and, for an image folder,
its class names (``classes``; empty when flat: every label is 0 and the dataset is unlabelled).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from diffusion_core.checkpoint import load_checkpoint, save_atomic
from diffusion_core.data import train_test_split
from pipeline import paths
from pipeline.config import Params, ParamsError, dataset_errors
from pipeline.dataset import load, source
from pipeline.files import write_json, write_provenance


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 over the dtype, shape and bytes of tensors (independent of the file format)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_split(path: Any) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of a split written by this stage."""
    obj = load_checkpoint(path, map_location="cpu")
    return obj["images"], obj["labels"]


def _class_counts(labels: Tensor) -> dict[str, int]:
    values, counts = torch.unique(labels, return_counts=True)
    return {str(v): int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}


def run(params: Params) -> dict[str, Any]:
    """Write ``data/prepared/{train,test}.pt`` and ``info.json``; returns the info record."""
    images, labels, facts, classes = load(params)
    errors = dataset_errors(params, facts)  # a folder's facts are known only now
    if errors:
        raise ParamsError(errors[0])
    train_x, train_y, test_x, test_y = train_test_split(
        images, labels, params.data.test_fraction, params.seed
    )
    save_atomic({"images": train_x, "labels": train_y}, paths.TRAIN_DATA)
    save_atomic({"images": test_x, "labels": test_y}, paths.TEST_DATA)
    info = {
        "dataset": params.data.dataset,
        "image_shape": list(images.shape[1:]),
        "num_classes": facts.num_classes,
        "pixel_levels": facts.pixel_levels,
        "source": source(params.data),
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
        "train_classes": _class_counts(train_y),
        "test_classes": _class_counts(test_y),
        "train_digest": tensor_digest(train_x, train_y),
        "test_digest": tensor_digest(test_x, test_y),
    }
    if classes is not None:
        info["classes"] = classes
    write_json(paths.DATA_INFO, info)
    write_provenance("prepare", params)
    print(
        f"prepared {params.data.dataset}: {info['n_train']} train / {info['n_test']} test images "
        f"of shape {tuple(info['image_shape'])}"
    )
    return info
