"""Tests of the evaluation metrics: FID/KID math, the classifier, the clean-fid feature path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.data import from_uint8, load_dataset, to_uint8, train_test_split
from diffusion_core.metrics import (
    CleanFIDFeatureExtractor,
    FeatureClassifier,
    classification_accuracy,
    extract_features,
    inception_extractor,
    inception_weights_path,
    keep_native_size,
    top_probabilities,
    train_classifier,
)


@pytest.fixture(scope="module")
def digits_split() -> tuple[torch.Tensor, ...]:
    images, labels = load_dataset("digits")
    return train_test_split(images, labels, 0.2, seed=0)


@pytest.fixture(scope="module")
def digits_classifier(digits_split: tuple[torch.Tensor, ...]) -> FeatureClassifier:
    train_x, train_y, _, _ = digits_split
    return train_classifier(
        train_x, train_y, epochs=12, batch_size=64, lr=2e-3, seed=0, device="cpu"
    )


# --- classifier -------------------------------------------------------------------------------


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


# --- the clean-fid feature path ---------------------------------------------------------------


def test_extractor_through_cleanfid_matches_direct_features(
    digits_split: tuple[torch.Tensor, ...], digits_classifier: FeatureClassifier
) -> None:
    images = digits_split[2][:100]
    extractor = CleanFIDFeatureExtractor(digits_classifier)
    feats = extract_features(extractor, images, batch_size=32, device="cpu")
    assert feats.shape == (100, digits_classifier.feature_dim)
    with torch.no_grad():
        direct = digits_classifier.features(from_uint8(to_uint8(images))).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-5)


def test_extract_features_reports_each_batch() -> None:
    images = torch.linspace(-1, 1, 10 * 64).reshape(10, 1, 8, 8)
    seen: list[int] = []
    feats = extract_features(lambda batch: batch.flatten(1), images, batch_size=4, device="cpu",
                             callback=seen.append)
    assert seen == [4, 4, 2]
    assert feats.shape == (10, 3 * 64)  # grey images reach clean-fid's extractors as RGB


def test_tensor_path_matches_clean_fids_own_reading_of_png_files(
    tmp_path: Path,
    digits_split: tuple[torch.Tensor, ...],
    digits_classifier: FeatureClassifier,
) -> None:
    """The images, saved as 8-bit PNGs and read by clean-fid itself, give the same features as
    ``extract_features`` gives the tensors."""
    from cleanfid.fid import get_folder_features

    images = digits_split[2][:12]
    for i, img in enumerate(to_uint8(images)[:, 0].numpy()):
        Image.fromarray(img, mode="L").save(tmp_path / f"{i:04d}.png")
    extractor = CleanFIDFeatureExtractor(digits_classifier)
    extractor.eval()
    from_folder = get_folder_features(str(tmp_path), model=extractor, num_workers=0,
                                      batch_size=5, device=torch.device("cpu"), mode="clean",
                                      custom_fn_resize=keep_native_size, verbose=False)
    from_tensor = extract_features(extractor, images, batch_size=5, device="cpu")
    np.testing.assert_allclose(from_folder, from_tensor, rtol=1e-5, atol=1e-5)


def test_extractor_rejects_resized_inputs(digits_classifier: FeatureClassifier) -> None:
    extractor = CleanFIDFeatureExtractor(digits_classifier)
    with pytest.raises(ValueError, match="keep_native_size"):
        extract_features(
            extractor, torch.zeros(1, 1, 8, 8), batch_size=1, device="cpu", resize="clean"
        )
    with pytest.raises(ValueError, match="resize"):
        extract_features(extractor, torch.zeros(1, 1, 8, 8), batch_size=1, device="cpu", resize="x")


@pytest.mark.skipif(inception_weights_path().is_file(), reason="Inception weights are present")
def test_inception_extractor_offline_error_names_the_file() -> None:
    with pytest.raises(RuntimeError, match="inception-2015-12-05.pt") as info:
        inception_extractor("cpu")
    assert str(inception_weights_path()) in str(info.value) and "\n" not in str(info.value)


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
