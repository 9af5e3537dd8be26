"""Tests of the clean-fid feature path: the tensor path equals clean-fid's own PNG reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.clean_fid_features import (
    CleanFIDFeatureExtractor,
    extract_features,
    keep_native_size,
)
from diffusion_core.data import from_uint8, to_uint8
from diffusion_core.feature_classifier import FeatureClassifier


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
