"""Stage ``classifier``: train the evaluation classifier, the feature extractor of FID and KID.

Writes ``models/classifier.pt`` (``{"config", "state_dict"}``), ``models/reference_features.pt``
(clean-fid features of the train and test splits, and the indices of the test split's reference
half R and floor half F, ``diffusion_core.evaluation.reference_split`` seeded with ``seed``;
reused by every ``evaluate``) and ``metrics/classifier.json`` (test accuracy). Deterministic for
a given seed on CPU.

A dataset with fewer than two classes (a flat image folder) has no labels to learn from: the stage
then writes the held-out halves alone and a classifier file that says why it is absent (the
checks demand ``evaluate.extractor: inception`` and an unconditional model for such data).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from diffusion_core.checkpoint import load_checkpoint, save_atomic
from diffusion_core.clean_fid_features import CleanFIDFeatureExtractor, extract_features
from diffusion_core.distributed import default_device
from diffusion_core.evaluation import reference_split
from diffusion_core.feature_classifier import (
    FeatureClassifier,
    classification_accuracy,
    train_classifier,
)
from pipeline import paths
from pipeline.config import Params
from pipeline.dataset import dataset_info
from pipeline.errors import StageError
from pipeline.files import file_digest, write_json, write_provenance, write_timing
from pipeline.prepare import load_split


def load_classifier(device: torch.device) -> FeatureClassifier:
    """The classifier written by this stage, in eval mode on ``device``."""
    obj = load_checkpoint(paths.CLASSIFIER, map_location="cpu")
    if obj.get("status") == "skipped":
        raise StageError(f"{paths.CLASSIFIER}: no evaluation classifier: {obj['reason']}")
    model = FeatureClassifier(**obj["config"])
    model.load_state_dict(obj["state_dict"])
    return model.to(device).eval()


def features(
    classifier: FeatureClassifier,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """clean-fid features ``(N, feature_dim)`` (float64) of images in ``[-1, 1]``;
    ``callback(k)`` follows each batch of ``k`` images."""
    extractor = CleanFIDFeatureExtractor(classifier)
    feats = extract_features(extractor, images, batch_size=batch_size, device=device,
                             callback=callback)
    return torch.from_numpy(feats)


def held_out_halves(params: Params, test_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the reference half R and the floor half F of the test split (seeded)."""
    ref, floor = reference_split(test_labels.numpy(), params.seed)
    return torch.from_numpy(ref), torch.from_numpy(floor)


def _skip(params: Params, test_y: torch.Tensor, reason: str) -> dict[str, Any]:
    """Outputs of a dataset without classes: the held-out halves and the reason, no classifier."""
    save_atomic({"status": "skipped", "reason": reason}, paths.CLASSIFIER)
    reference: dict[str, Any] = {"extractor": None}
    reference["reference_index"], reference["floor_index"] = held_out_halves(params, test_y)
    save_atomic(reference, paths.REFERENCE_FEATURES)
    record = {"status": "skipped", "reason": reason}
    write_json(paths.CLASSIFIER_METRICS, record)
    write_provenance("classifier", params)
    print(f"classifier: skipped ({reason})")
    return record


def run(params: Params) -> dict[str, Any]:
    """Train, score on the test split, cache reference features; returns the metrics record."""
    device = default_device()
    cfg = params.classifier
    train_x, train_y = load_split(paths.TRAIN_DATA)
    test_x, test_y = load_split(paths.TEST_DATA)
    num_classes = dataset_info(params).num_classes
    if num_classes < 2:
        return _skip(params, test_y, f"the dataset has {num_classes} classes, so no labels")
    start = time.perf_counter()
    model = train_classifier(
        train_x,
        train_y,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=params.seed,
        device=device,
        feature_dim=cfg.feature_dim,
        num_classes=num_classes,
    )
    train_s = time.perf_counter() - start
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({"config": model.config, "state_dict": state}, paths.CLASSIFIER)
    reference = {
        "extractor": "classifier",
        "classifier_digest": file_digest(paths.CLASSIFIER),
        "train": features(model, train_x, cfg.batch_size, device),
        "test": features(model, test_x, cfg.batch_size, device),
    }
    reference["reference_index"], reference["floor_index"] = held_out_halves(params, test_y)
    save_atomic(reference, paths.REFERENCE_FEATURES)
    record = {
        "test_accuracy": classification_accuracy(model, test_x, test_y, cfg.batch_size, device),
        "train_accuracy": classification_accuracy(model, train_x, train_y, cfg.batch_size, device),
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
        "feature_dim": cfg.feature_dim,
    }
    write_json(paths.CLASSIFIER_METRICS, record)
    write_provenance("classifier", params, classifier_sha256=file_digest(paths.CLASSIFIER))
    write_timing("classifier", train_s=round(train_s, 3), device=str(device))
    print(
        f"classifier: test accuracy {record['test_accuracy']:.4f} "
        f"(train {record['train_accuracy']:.4f}) in {train_s:.1f} s"
    )
    return record
