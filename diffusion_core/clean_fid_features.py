"""Image features through clean-fid (Parmar et al. 2022, "On Aliased Resizing and Surprising
Subtleties in GAN Evaluation"), with a pluggable feature extractor.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule") and KID (Binkowski et
al. 2018, "Demystifying MMD GANs") compare features of images; :mod:`diffusion_core.evaluation`
computes them from the arrays this module returns. clean-fid hands an extractor float batches
``(B, 3, H, W)`` with values in ``0..255`` (``ResizeDataset``: PIL image -> RGB -> ``fn_resize``
-> ``ToTensor() * 255``); :func:`extract_features` presents tensors in ``[-1, 1]`` exactly so, and
:class:`CleanFIDFeatureExtractor` adapts the evaluation classifier
(:class:`~diffusion_core.feature_classifier.FeatureClassifier`) to that convention. clean-fid is
imported where it is used, not with this module.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from diffusion_core.data import to_uint8
from diffusion_core.distributed import default_device
from diffusion_core.feature_classifier import FeatureClassifier

__all__ = ["CleanFIDFeatureExtractor", "FeatureFn", "extract_features", "keep_native_size"]

FeatureFn = Callable[[Tensor], Tensor]


class CleanFIDFeatureExtractor(nn.Module):
    """Adapts a ``FeatureClassifier`` to clean-fid's calling convention.

    clean-fid calls ``model(batch)`` with float ``(B, 3, H, W)`` batches in ``0..255`` (grey
    PNGs are converted to RGB). This maps them to ``[-1, 1]`` (``x / 127.5 - 1``), averages RGB
    back to one channel for a grey-scale classifier, and returns ``classifier.features``.
    """

    def __init__(self, classifier: FeatureClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, batch: Tensor) -> Tensor:
        x = batch.to(torch.float32) / 127.5 - 1.0
        want = self.classifier.in_channels
        if x.shape[1] != want:
            if want == 1 and x.shape[1] == 3:
                x = x.mean(dim=1, keepdim=True)
            elif want == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
        size = self.classifier.image_size
        if tuple(x.shape[-2:]) != (size, size):
            raise ValueError(
                f"feature extractor expects {size}x{size} images, got "
                f"{x.shape[-2]}x{x.shape[-1]}: pass custom_fn_resize=keep_native_size to clean-fid"
            )
        return self.classifier.features(x)


def keep_native_size(image: np.ndarray) -> np.ndarray:
    """clean-fid ``custom_fn_resize`` that keeps the native resolution (HWC array in, same out)."""
    return np.asarray(image)


def _cleanfid_batch(images: Tensor, resize: Callable[[np.ndarray], np.ndarray] | None) -> Tensor:
    """What clean-fid's ``ResizeDataset`` yields for these images saved as 8-bit PNGs.

    ``[-1, 1]`` -> uint8 -> RGB (grey replicated) -> ``resize`` -> float ``(B, 3, H', W')`` in
    0..255; a uint8 result is scaled as clean-fid does it, ``ToTensor()(img) * 255``.
    """
    x = to_uint8(images.detach().cpu())
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if resize is None:
        return x.to(torch.float32).div(255) * 255
    out = []
    for img in x.permute(0, 2, 3, 1).contiguous().numpy():
        r = np.asarray(resize(img))
        t = torch.from_numpy(np.ascontiguousarray(r.transpose(2, 0, 1))).to(torch.float32)
        out.append(t.div(255) * 255 if r.dtype == np.uint8 else t)
    return torch.stack(out)


def _resizer(resize: str) -> Callable[[np.ndarray], np.ndarray] | None:
    if resize == "native":
        return None
    if resize == "clean":
        from cleanfid.resize import build_resizer

        return build_resizer("clean")
    raise ValueError(f"resize must be 'native' or 'clean', got {resize!r}")


def _prepare(extractor: FeatureFn, device: torch.device) -> None:
    if isinstance(extractor, nn.Module):
        extractor.to(device).eval()


def extract_features(
    extractor: FeatureFn,
    images: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    resize: str = "native",
    callback: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features ``(N, D)`` of ``images`` in ``[-1, 1]`` via ``cleanfid.fid.get_batch_features``.

    Images are quantised to 8 bits and presented as clean-fid presents images read from PNG files.
    ``resize="native"`` keeps the size (for ``CleanFIDFeatureExtractor``); ``"clean"`` applies
    clean-fid's PIL-bicubic 299x299 resize (for
    :func:`~diffusion_core.inception.inception_extractor`). Runs on ``device``.
    ``callback(k)`` follows each batch of ``k`` images (for progress).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from cleanfid import fid as cleanfid_fid

    device = torch.device(device) if device is not None else default_device()
    fn_resize = _resizer(resize)
    _prepare(extractor, device)
    feats = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        feats.append(
            cleanfid_fid.get_batch_features(_cleanfid_batch(batch, fn_resize), extractor, device)
        )
        if callback is not None:
            callback(batch.shape[0])
    return np.concatenate(feats).astype(np.float64)
