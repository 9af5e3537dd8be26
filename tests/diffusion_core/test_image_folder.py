"""Tests of image-folder datasets: layouts, labels, resizing, channel conversion and the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.data import DatasetUnavailable
from diffusion_core.image_folder import load_image_folder, scan_image_folder


def save(path: Path, value: int | tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> None:
    """A uniform image: grey (``L``) for an int value, RGB for a triple."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if isinstance(value, int) else "RGB"
    Image.new(mode, size, value).save(path)


def test_class_subfolders_give_sorted_labels_and_levels(tmp_path: Path) -> None:
    save(tmp_path / "zebra" / "a.png", 255)
    save(tmp_path / "ant" / "b.png", 0)
    save(tmp_path / "ant" / "nested" / "c.png", 51)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    save(tmp_path / "ant" / ".hidden.png", 9)
    out = load_image_folder(tmp_path, image_size=4)
    assert out.classes == ["ant", "zebra"]
    assert out.labels is not None and out.labels.tolist() == [0, 0, 1]
    assert out.images.shape == (3, 1, 4, 4) and out.images.dtype == torch.float32
    # 0 -> -1, 51 -> 51 / 127.5 - 1, 255 -> 1 (from_levels(k, 256))
    assert out.images[:, 0, 0, 0].tolist() == pytest.approx([-1.0, 51 / 127.5 - 1.0, 1.0])


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    save(tmp_path / "x.png", 10)
    save(tmp_path / "y.jpg", 200)
    out = load_image_folder(tmp_path, image_size=4)
    assert out.labels is None and out.classes == []
    assert out.images.shape == (2, 1, 4, 4)


def test_images_are_cropped_and_resized(tmp_path: Path) -> None:
    image = np.zeros((6, 20), dtype=np.uint8)
    image[:, 3:17] = 255  # the centre is white (beyond the bicubic filter's reach), the sides black
    Image.fromarray(image).save(tmp_path / "wide.png")
    out = load_image_folder(tmp_path, image_size=3)
    assert out.images.shape == (1, 1, 3, 3)
    torch.testing.assert_close(out.images, torch.ones(1, 1, 3, 3))


def test_channels_convert_grey_and_colour(tmp_path: Path) -> None:
    save(tmp_path / "grey.png", 100)
    save(tmp_path / "red.png", (255, 0, 0))
    rgb = load_image_folder(tmp_path, image_size=4, channels=3)
    assert rgb.images.shape == (2, 3, 4, 4)
    grey = 100 / 127.5 - 1.0
    assert rgb.images[0, :, 0, 0].tolist() == pytest.approx([grey] * 3)
    assert rgb.images[1, :, 0, 0].tolist() == pytest.approx([1.0, -1.0, -1.0])
    one = load_image_folder(tmp_path, image_size=4, channels=1)
    assert one.images.shape == (2, 1, 4, 4)
    assert one.images[0, 0, 0, 0].item() == pytest.approx(grey)
    luma = round(255 * 299 / 1000)  # Pillow's ITU-R 601-2 luma of pure red
    assert one.images[1, 0, 0, 0].item() == pytest.approx(luma / 127.5 - 1.0)


def test_colour_folder_keeps_three_channels(tmp_path: Path) -> None:
    save(tmp_path / "a.png", (0, 128, 255))
    out = load_image_folder(tmp_path, image_size=4)
    assert out.images.shape == (1, 3, 4, 4)


def test_mixed_modes_without_channels_name_both_files(tmp_path: Path) -> None:
    save(tmp_path / "grey.png", 100)
    save(tmp_path / "red.png", (255, 0, 0))
    with pytest.raises(DatasetUnavailable, match="grey and colour") as info:
        load_image_folder(tmp_path, image_size=4)
    message = str(info.value)
    assert "grey.png" in message and "red.png" in message and "\n" not in message


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    save(tmp_path / "cats" / "good.png", 1)
    (tmp_path / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetUnavailable, match="broken.png") as info:
        load_image_folder(tmp_path, image_size=4, channels=1)
    assert "\n" not in str(info.value)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    save(tmp_path / "big.png", 7, size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(
        tmp_path / "noisy.png"
    )
    data = (tmp_path / "noisy.png").read_bytes()
    (tmp_path / "noisy.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetUnavailable, match="noisy.png"):
        load_image_folder(tmp_path, image_size=8, channels=1)


def test_missing_root_empty_folders_and_mixed_layouts(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="does not exist"):
        scan_image_folder(tmp_path / "nowhere")
    with pytest.raises(DatasetUnavailable, match="holds no images"):
        scan_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    save(tmp_path / "full_class" / "a.png", 3)
    with pytest.raises(DatasetUnavailable, match="empty_class holds no images"):
        scan_image_folder(tmp_path)
    save(tmp_path / "empty_class" / "b.png", 3)
    save(tmp_path / "stray.png", 3)
    with pytest.raises(DatasetUnavailable, match="mixes images"):
        scan_image_folder(tmp_path)


def test_bad_arguments(tmp_path: Path) -> None:
    save(tmp_path / "a.png", 3)
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(tmp_path, image_size=4, channels=2)
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(tmp_path, image_size=0)
