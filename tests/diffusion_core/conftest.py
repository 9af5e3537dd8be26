"""Fixtures shared by the tests of the evaluation classifier and the clean-fid feature path."""

from __future__ import annotations

import pytest
import torch

from diffusion_core.data import load_dataset, train_test_split
from diffusion_core.feature_classifier import FeatureClassifier, train_classifier


@pytest.fixture(scope="session")
def digits_split() -> tuple[torch.Tensor, ...]:
    images, labels = load_dataset("digits")
    return train_test_split(images, labels, 0.2, seed=0)


@pytest.fixture(scope="session")
def digits_classifier(digits_split: tuple[torch.Tensor, ...]) -> FeatureClassifier:
    train_x, train_y, _, _ = digits_split
    return train_classifier(
        train_x, train_y, epochs=12, batch_size=64, lr=2e-3, seed=0, device="cpu"
    )
