"""The evaluation classifier: a small CNN trained on the dataset, whose penultimate activations
are the features of FID and KID where the standard Inception-v3 weights cannot be fetched (they
need a network), and whose predictions give the class accuracy and the confidence of samples.

Importing this module does not import clean-fid or torchvision (about a second per process);
the clean-fid adapter is :mod:`diffusion_core.clean_fid_features`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_core.distributed import default_device

__all__ = [
    "FeatureClassifier",
    "classification_accuracy",
    "top_probabilities",
    "train_classifier",
]


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
    device = torch.device(device) if device is not None else default_device()
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
    device = torch.device(device) if device is not None else default_device()
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
    device = torch.device(device) if device is not None else default_device()
    was_training = classifier.training
    classifier.to(device).eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = classifier(images[start : start + batch_size].to(device, torch.float32))
        correct += int((logits.argmax(1).cpu() == labels[start : start + batch_size].cpu()).sum())
    classifier.train(was_training)
    return correct / images.shape[0]
