"""Sample-quality metrics: FID and KID through clean-fid with a pluggable feature extractor.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule"):
``||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` between Gaussians fitted to features.
KID (Binkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD^2 with the cubic polynomial
kernel ``k(x, y) = (x.y / d + 1)^3``. Both are computed by clean-fid (Parmar et al. 2022, "On
Aliased Resizing and Surprising Subtleties in GAN Evaluation"): ``frechet_distance`` and
``kernel_distance``.

The standard Inception-v3 weights cannot be fetched offline, so the default feature extractor is
``FeatureClassifier``, a small CNN trained on the same dataset; its penultimate activations are the
features. clean-fid hands an extractor float batches ``(B, 3, H, W)`` with values in ``0..255``
(``ResizeDataset``: PIL image -> RGB -> ``fn_resize`` -> ``ToTensor() * 255``);
``CleanFIDFeatureExtractor`` adapts the classifier to that convention.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid import fid as cleanfid_fid
from cleanfid.resize import build_resizer
from torch import Tensor, nn

from diffusion_core.data import to_uint8

__all__ = [
    "CleanFIDFeatureExtractor",
    "FeatureClassifier",
    "INCEPTION_URL",
    "classification_accuracy",
    "extract_features",
    "inception_extractor",
    "inception_weights_path",
    "keep_native_size",
    "train_classifier",
]

INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    "inception-2015-12-05.pt"
)
FeatureFn = Callable[[Tensor], Tensor]


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FeatureClassifier(nn.Module):
    """Small CNN classifier; ``features(x)`` (penultimate SiLU activations) feeds FID/KID.

    Two stride-2 stages (8 -> 4 -> 2, 28 -> 14 -> 7), a linear feature layer of ``feature_dim``
    units and a linear classification head. Input: float images in ``[-1, 1]``.
    """

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, feature_dim: int = 64
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("feature_dim", feature_dim),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self._config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "num_classes": int(num_classes),
            "feature_dim": int(feature_dim),
        }
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
        )
        reduced = (image_size + 3) // 4  # two stride-2 convs with padding 1: ceil(ceil(s/2)/2)
        self.feature_layer = nn.Linear(64 * reduced * reduced, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def config(self) -> dict[str, Any]:
        """Plain constructor arguments: ``FeatureClassifier(**clf.config)`` rebuilds it."""
        return dict(self._config)

    def _check(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"FeatureClassifier expects (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}"
            )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``(B, feature_dim)`` of images in ``[-1, 1]``."""
        self._check(x)
        return F.silu(self.feature_layer(self.body(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.features(x))


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by an integer offset in ``[-max_shift, max_shift]^2`` (fill -1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def train_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device | str | None = None,
    feature_dim: int = 64,
    max_shift: int = 0,
    num_classes: int | None = None,
) -> FeatureClassifier:
    """Train a ``FeatureClassifier`` (Adam, cross-entropy); returned in eval mode on ``device``.

    Deterministic for a given ``seed`` on CPU: the initial weights come from ``torch.manual_seed``
    inside a forked RNG (the global RNG is left untouched) and shuffling and random shifts
    (augmentation by up to ``max_shift`` pixels; 0 disables it) from an own ``torch.Generator``.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (N, C, S, S), got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}"
        )
    device = _default_device(device)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(images.shape[1], images.shape[-1], num_classes, feature_dim)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(int(seed))
    n = images.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = images[idx].to(device, torch.float32)
            if max_shift > 0:
                x = _random_shift(x, max_shift, generator)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def top_probabilities(
    classifier: nn.Module,
    images: Tensor,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> Tensor:
    """The classifier's largest softmax probability for each image: how sure it is of its own
    label. A share of images below a threshold (e.g. 0.9) counts the ambiguous or malformed ones,
    on samples as on real images (an Inception-score-like view, per image)."""
    device = _default_device(device)
    was_training = classifier.training
    classifier.to(device).eval()
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = classifier(images[start : start + batch_size].to(device, torch.float32))
            out.append(logits.float().softmax(1).amax(1).cpu())
    classifier.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def classification_accuracy(
    classifier: nn.Module,
    images: Tensor,
    labels: Tensor,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> float:
    """Fraction of ``images`` whose arg-max logit equals the label."""
    if images.shape[0] == 0 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"need matching non-empty images/labels, got {images.shape[0]}/{labels.shape[0]}"
        )
    device = _default_device(device)
    was_training = classifier.training
    classifier.to(device).eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = classifier(images[start : start + batch_size].to(device, torch.float32))
        correct += int((logits.argmax(1).cpu() == labels[start : start + batch_size].cpu()).sum())
    classifier.train(was_training)
    return correct / images.shape[0]


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
    clean-fid's PIL-bicubic 299x299 resize (for ``inception_extractor``). Runs on ``device``.
    ``callback(k)`` follows each batch of ``k`` images (for progress).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _default_device(device)
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


def inception_weights_path() -> Path:
    """Where clean-fid looks for (and downloads) its TorchScript Inception weights."""
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / "inception-2015-12-05.pt"


def inception_extractor(
    device: torch.device | str | None = None, *, download: bool = False, timeout_s: float = 60.0
) -> FeatureFn:
    """clean-fid's standard Inception-v3 (mode "clean"), no DataParallel; use ``resize="clean"``.

    Raises a one-line RuntimeError when the weights are missing (and not downloadable).
    """
    device = _default_device(device)
    path = inception_weights_path()
    if not path.is_file():
        if not download:
            raise RuntimeError(
                f"clean-fid Inception weights missing: place {INCEPTION_URL} at {path} "
                "(or call with download=True where a network is available)"
            )
        from cleanfid.downloads_helper import check_download_inception

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout_s)
        try:
            check_download_inception(fpath=str(path.parent))
        except Exception as exc:
            if path.is_file():
                os.remove(path)  # clean-fid writes in place; never leave a truncated file
            raise RuntimeError(
                f"could not download clean-fid Inception weights ({type(exc).__name__}); "
                f"place {INCEPTION_URL} at {path}"
            ) from exc
        finally:
            socket.setdefaulttimeout(previous)
    from cleanfid.features import build_feature_extractor

    return build_feature_extractor("clean", device=device, use_dataparallel=False)
