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
    feature_statistics,
    fid_from_features,
    fid_from_statistics,
    inception_extractor,
    inception_weights_path,
    keep_native_size,
    kid_from_features,
    top_probabilities,
    train_classifier,
)


def gaussian(n: int, mean: np.ndarray, std: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, mean.shape[0])) * std + mean


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


# --- FID / KID ------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero() -> None:
    f = gaussian(500, np.zeros(6), 1.0, seed=0)
    assert abs(fid_from_features(f, f)) < 1e-6


def test_fid_between_unit_gaussians_is_the_squared_mean_distance() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([1.0, -1.0, 0.0, 0.5])
    f1, f2 = gaussian(40_000, mu1, 1.0, seed=1), gaussian(40_000, mu2, 1.0, seed=2)
    assert fid_from_features(f1, f2) == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=0.05)


def test_fid_between_isotropic_gaussians_of_different_scale() -> None:
    # Tr(s1^2 I + s2^2 I - 2 s1 s2 I) = d (s1 - s2)^2
    d, s1, s2 = 5, 1.0, 2.0
    f1, f2 = gaussian(40_000, np.zeros(d), s1, seed=3), gaussian(40_000, np.zeros(d), s2, seed=4)
    assert fid_from_features(f1, f2) == pytest.approx(d * (s1 - s2) ** 2, abs=0.1)


def test_fid_is_symmetric_and_matches_statistics_form() -> None:
    f1 = gaussian(300, np.zeros(3), 1.0, seed=5)
    f2 = gaussian(200, np.ones(3), 0.5, seed=6) @ np.array([[1, 0.3, 0], [0, 1, 0], [0, 0.2, 1]])
    fid = fid_from_features(f1, f2)
    assert fid == pytest.approx(fid_from_features(f2, f1), rel=1e-6)
    assert fid == pytest.approx(
        fid_from_statistics(*feature_statistics(f1), *feature_statistics(f2)), rel=1e-12
    )
    mu, sigma = feature_statistics(f1)
    np.testing.assert_allclose(sigma, np.cov(f1, rowvar=False))
    np.testing.assert_allclose(mu, f1.mean(axis=0))


def test_fid_works_with_a_scipy_without_sqrtm_disp(monkeypatch: pytest.MonkeyPatch) -> None:
    """SciPy 1.18 removed ``sqrtm(disp=...)``, which clean-fid 0.1.35 passes."""
    import scipy.linalg

    f1 = gaussian(400, np.zeros(3), 1.0, seed=10)
    f2 = gaussian(300, np.full(3, 0.5), 2.0, seed=11)
    # the Frechet distance written out with NumPy alone (unbiased covariances, symmetric square
    # roots by eigendecomposition): ||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
    m1, m2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False, ddof=1), np.cov(f2, rowvar=False, ddof=1)

    def psd_sqrt(a: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(a)
        return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T

    r1 = psd_sqrt(s1)
    expected = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2)
                     - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1)))
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-9)  # clean-fid's path
    real_sqrtm = scipy.linalg.sqrtm

    def sqrtm_without_disp(a: np.ndarray) -> np.ndarray:
        return real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_without_disp)
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-9)


def test_kid_separates_distributions_and_is_reproducible() -> None:
    a = gaussian(600, np.zeros(4), 1.0, seed=7)
    b = gaussian(600, np.zeros(4), 1.0, seed=8)
    c = gaussian(600, np.full(4, 1.0), 1.0, seed=9)
    same, shifted = kid_from_features(a, b, num_subsets=20), kid_from_features(a, c, num_subsets=20)
    assert abs(same) < 0.1 and shifted > 1.0  # estimator std here is about 0.015
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    assert kid_from_features(a, c, num_subsets=20) == shifted  # seeded
    assert np.random.rand() == expected_next  # the global numpy RNG is restored


def test_feature_shape_errors() -> None:
    with pytest.raises(ValueError, match="equal D"):
        fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=">= 2 samples"):
        kid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))


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
