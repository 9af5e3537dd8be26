"""Stage ``evaluate --method M``: sample quality of one method against the training split.

* ``fid_<extractor>``: FID (Heusel et al. 2017) between the samples' features and the train
  split's, through clean-fid with the evaluation classifier (``extractor: classifier``, features
  cached by the classifier stage) or clean-fid's Inception-v3 (``extractor: inception``, needs
  its weights on disk).
* ``fid_floor_<extractor>``: the same FID for ``n`` held-out test images, the value a perfect
  model would reach with ``n = sample.n_images`` images (FID is biased upwards for small n).
* ``kid_<extractor>`` and ``kid_floor_<extractor>``: KID (Binkowski et al. 2018), unbiased.
* ``class_accuracy``: for samples drawn with class labels (a conditional model, not an
  ``unconditional`` method), the fraction the evaluation classifier assigns to the class they
  were asked for.
* ``bpd``: for ``ode_rk45`` methods when ``evaluate.bpd_images > 0``, the negative
  log-likelihood in bits/dim of that many test images under the probability-flow ODE with the
  method's tolerances (Song et al. 2021, Sec. 4.3), unconditional (null label), uniformly
  dequantised on the dataset's pixel levels; image ``i`` uses seed ``seed + i``.

Writes ``metrics/eval/M.json`` and logs ``<metric>/M`` to the training run in MLflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.data import from_uint8, to_levels
from diffusion_core.distributed import default_device
from diffusion_core.likelihood import bits_per_dim
from diffusion_core.metrics import (
    classification_accuracy,
    extract_features,
    fid_from_features,
    inception_extractor,
    kid_from_features,
)
from pipeline import paths
from pipeline.classifier import features, load_classifier
from pipeline.config import Params, ParamsError, RK45Method
from pipeline.errors import StageError
from pipeline.files import provenance, read_json, write_json
from pipeline.prepare import load_split
from pipeline.sample import load_model
from pipeline.tracking import Tracker


def _load_samples(method: str) -> dict[str, Any]:
    path = paths.samples_dir(method) / "samples.pt"
    try:
        return load_checkpoint(path, map_location="cpu")
    except FileNotFoundError:
        raise StageError(f"{path} is missing: run `diffusion sample -m {method}` first") from None


def _reference(params: Params, n: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Train features and the first ``n`` test features for ``evaluate.extractor``."""
    if params.evaluate.extractor == "classifier":
        ref = load_checkpoint(paths.REFERENCE_FEATURES, map_location="cpu")
        train, test = ref["train"].numpy(), ref["test"].numpy()
    else:
        train_x, _ = load_split(paths.TRAIN_DATA)
        test_x, _ = load_split(paths.TEST_DATA)
        train = _inception(train_x, params, device)
        test = _inception(test_x[:n], params, device)
    if test.shape[0] < n:
        raise ParamsError(
            f"sample.n_images: the FID floor needs as many test images, there are "
            f"{test.shape[0]} (got {n})"
        )
    return train, test[:n]


def _inception(images: torch.Tensor, params: Params, device: torch.device) -> np.ndarray:
    try:
        extractor = inception_extractor(device)
    except RuntimeError as exc:
        raise StageError(f"evaluate.extractor=inception: {exc}") from None
    return extract_features(
        extractor, images, batch_size=params.evaluate.batch_size, device=device, resize="clean"
    )


def _bits_per_dim(params: Params, method: str, device: torch.device) -> dict[str, float]:
    """Mean and spread of bits/dim of the first ``evaluate.bpd_images`` test images."""
    m = params.methods[method]
    count = params.evaluate.bpd_images
    if count == 0 or not isinstance(m, RK45Method):
        return {}
    denoiser, process, _ = load_model(device)
    test_x, _ = load_split(paths.TEST_DATA)
    num_levels = params.dataset.pixel_levels
    levels = to_levels(test_x[:count], num_levels)
    values, nfe = [], 0
    for lo in range(0, levels.shape[0], params.evaluate.batch_size):
        chunk = levels[lo : lo + params.evaluate.batch_size].to(device)
        seeds = [params.seed + i for i in range(lo, lo + chunk.shape[0])]
        bpd, used = bits_per_dim(
            denoiser, process, chunk, num_levels, seeds=seeds, rtol=m.rtol, atol=m.atol
        )
        values.append(bpd.detach().double().cpu())
        nfe = max(nfe, used)
    bpd = torch.cat(values)
    spread = float(bpd.std()) if bpd.numel() > 1 else 0.0
    return {"bpd": float(bpd.mean()), "bpd_std": spread, "bpd_nfe": float(nfe)}


def _skipped(params: Params, method: str, sample_record: dict[str, Any]) -> dict[str, Any]:
    record = {
        "status": "skipped",
        "reason": sample_record.get("reason", "sampling was skipped"),
        "method": method,
        "provenance": provenance(params),
    }
    write_json(paths.eval_metrics(method), record)
    print(f"skipped {method}: {record['reason']}")
    return record


def run(params: Params, method: str) -> dict[str, Any]:
    """Score one method's samples; returns the metrics record."""
    params.method(method)  # a clear error for an unknown name
    sample_record = read_json(paths.sample_metrics(method))
    if sample_record.get("status") == "skipped":
        return _skipped(params, method, sample_record)
    device = default_device()
    samples = _load_samples(method)
    images = from_uint8(samples["images"])
    n = images.shape[0]
    name = params.evaluate.extractor
    batch = params.evaluate.batch_size
    train_f, test_f = _reference(params, n, device)
    classifier = load_classifier(device)
    if name == "classifier":
        sample_f = features(classifier, images, batch, device).numpy()
    else:
        sample_f = _inception(images, params, device)
    metrics: dict[str, float] = {
        f"fid_{name}": fid_from_features(sample_f, train_f),
        f"fid_floor_{name}": fid_from_features(test_f, train_f),
        f"kid_{name}": kid_from_features(sample_f, train_f, seed=params.seed),
        f"kid_floor_{name}": kid_from_features(test_f, train_f, seed=params.seed),
    }
    metrics.update(_bits_per_dim(params, method, device))
    labels = samples.get("labels")
    if labels is not None:
        metrics["class_accuracy"] = classification_accuracy(
            classifier, images, labels, batch, device
        )
    record = {
        "status": "ok",
        "method": method,
        "extractor": name,
        **metrics,
        "nfe": sample_record.get("nfe"),
        "n_images": n,
        "n_reference": int(train_f.shape[0]),
        "provenance": provenance(params),
    }
    write_json(paths.eval_metrics(method), record)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"{method}: {shown}")
    tracker = Tracker.reopen(paths.MLFLOW_RUN)
    if tracker is not None:
        tracker.log_metrics({f"{k}/{method}": v for k, v in metrics.items()})
    return record
