"""Tests of the evaluation classifier: shapes, accuracy, determinism, confidence, import cost."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diffusion_core.feature_classifier import (
    FeatureClassifier,
    classification_accuracy,
    top_probabilities,
    train_classifier,
)


def test_classifier_shapes_and_config_round_trip() -> None:
    for size in (8, 28):
        clf = FeatureClassifier(1, size, 10, feature_dim=16)
        x = torch.rand(3, 1, size, size) * 2 - 1
        assert clf(x).shape == (3, 10) and clf.features(x).shape == (3, 16)
        clone = FeatureClassifier(**clf.config)
        clone.load_state_dict(clf.state_dict())
        torch.testing.assert_close(clone.features(x), clf.features(x))
    with pytest.raises(ValueError, match="expects"):
        clf(torch.zeros(2, 1, 8, 8))


def test_train_classifier_reaches_high_accuracy_on_digits(
    digits_split: tuple[torch.Tensor, ...], digits_classifier: FeatureClassifier
) -> None:
    _, _, test_x, test_y = digits_split
    assert not digits_classifier.training
    acc = classification_accuracy(digits_classifier, test_x, test_y, batch_size=128, device="cpu")
    assert acc >= 0.95


def test_train_classifier_is_deterministic(digits_split: tuple[torch.Tensor, ...]) -> None:
    train_x, train_y = digits_split[0][:256], digits_split[1][:256]
    kwargs = dict(epochs=1, batch_size=32, lr=1e-3, device="cpu", max_shift=1)
    state = torch.get_rng_state()
    a = train_classifier(train_x, train_y, seed=3, **kwargs).state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not consumed
    b = train_classifier(train_x, train_y, seed=3, **kwargs).state_dict()
    c = train_classifier(train_x, train_y, seed=4, **kwargs).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_top_probabilities_are_the_softmax_maximum():
    """A 'classifier' whose logits are the mean pixel times (1, 0, -1): softmax by hand."""

    class Fixed(torch.nn.Module):
        def forward(self, x):
            m = x.flatten(1).mean(1, keepdim=True)
            return m * torch.tensor([1.0, 0.0, -1.0])

    images = torch.tensor([0.0, 2.0, -3.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
    top = top_probabilities(Fixed(), images, batch_size=2)
    expected = torch.stack([torch.tensor([m, 0.0, -m]).softmax(0).max() for m in (0.0, 2.0, -3.0)])
    assert torch.allclose(top, expected) and top[0] == pytest.approx(1 / 3)


def test_importing_the_feature_modules_loads_neither_cleanfid_nor_torchvision() -> None:
    """clean-fid and torchvision cost about a second per process: only the functions that use
    clean-fid import it."""
    modules = ", ".join(f"diffusion_core.{m}"
                        for m in ("feature_classifier", "clean_fid_features", "inception"))
    code = (f"import sys, {modules}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'cleanfid', 'torchvision'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
