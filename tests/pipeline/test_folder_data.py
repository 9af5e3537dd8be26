"""An image folder as the pipeline's dataset: checks before anything runs, prepare, an unlabelled
(flat) folder through the classifier and train stages, and one-line errors through the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _pipeline_helpers import tiny_raw, write_params
from PIL import Image
from typer.testing import CliRunner

from diffusion_core.checkpoint import load_checkpoint
from pipeline import classifier, paths, prepare, train
from pipeline.checks import check_buildable
from pipeline.classifier import load_classifier
from pipeline.cli import app
from pipeline.config import ParamsError, validate_params
from pipeline.dataset import dataset_info
from pipeline.errors import StageError


def make_images(folder: Path, n: int, mode: str = "L", size: int = 10, seed: int = 0) -> None:
    """``n`` random ``size x size`` PNGs (grey ``L`` or ``RGB``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def folder_raw(root: Path, conditional: bool = True, **data: Any) -> dict[str, Any]:
    """tiny params on an image folder of 8x8 images (resized from the 10x10 files)."""
    raw = tiny_raw()
    raw["data"].update(dataset="folder", root=str(root), image_size=8, test_fraction=0.5, **data)
    raw["train"].update(batch_size=4, steps=2, checkpoint_every=2, log_every=1)
    raw["model"]["conditional"] = conditional
    return raw


@pytest.fixture
def classes(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    make_images(root / "circles", 6, seed=1)
    make_images(root / "squares", 10, seed=2)
    return root


def test_class_folders_are_prepared_with_their_names(
    classes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    params = validate_params(folder_raw(classes))
    check_buildable(params)  # scans the folder: 16 images, 2 classes
    before = dataset_info(params)
    assert (before.size, before.num_classes, before.channels) == (16, 2, 1)
    info = prepare.run(params)
    assert info["classes"] == ["circles", "squares"] and info["num_classes"] == 2
    assert info["image_shape"] == [1, 8, 8] and info["pixel_levels"] == 256
    assert info["test_classes"] == {"0": 3, "1": 5} and info["n_train"] == 8
    assert dataset_info(params) == before  # now read from what prepare recorded


def test_flat_folder_refuses_a_conditional_model_and_the_classifier_extractor(
    tmp_path: Path,
) -> None:
    make_images(tmp_path / "flat", 12)
    params = validate_params(folder_raw(tmp_path / "flat"))
    with pytest.raises(ParamsError, match="model.conditional: the image folder .* is flat"):
        check_buildable(params)
    params = validate_params(folder_raw(tmp_path / "flat", conditional=False))
    with pytest.raises(ParamsError, match="evaluate.extractor: the classifier extractor learns"):
        check_buildable(params)


def test_flat_folder_skips_the_classifier_and_trains_unconditionally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_images(tmp_path / "flat", 12, mode="RGB")
    raw = folder_raw(tmp_path / "flat", conditional=False)
    raw["evaluate"]["extractor"] = "inception"
    params = validate_params(raw)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    info = prepare.run(params)
    assert info["classes"] == [] and info["num_classes"] == 0
    assert info["image_shape"] == [3, 8, 8] and info["n_train"] == 6
    record = classifier.run(params)
    assert record["status"] == "skipped"
    halves = load_checkpoint(paths.REFERENCE_FEATURES)
    assert sorted(halves["reference_index"].tolist() + halves["floor_index"].tolist()) == list(
        range(6)
    )
    with pytest.raises(StageError, match="no evaluation classifier: the dataset has 0 classes"):
        load_classifier(torch.device("cpu"))
    train.run(params)
    config = load_checkpoint(paths.MODEL)["model_config"]
    assert config["num_classes"] == 0 and config["in_channels"] == 3
    assert config["image_size"] == 8


def test_mixed_modes_need_channels(tmp_path: Path) -> None:
    make_images(tmp_path / "mixed" / "a", 6, mode="L")
    make_images(tmp_path / "mixed" / "b", 6, mode="RGB")
    params = validate_params(folder_raw(tmp_path / "mixed"))
    with pytest.raises(ParamsError, match="data.channels: the image folder mixes grey and colour"):
        check_buildable(params)
    check_buildable(validate_params(folder_raw(tmp_path / "mixed", channels=3)))


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_cli_missing_root_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", folder_raw(tmp_path / "nowhere"))
    result = cli("check-params", "--params", str(path))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "data.root: image folder" in result.stderr and "does not exist" in result.stderr


def test_cli_corrupt_file_is_named_and_exits_1(
    classes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (classes / "squares" / "bad.png").write_bytes(b"not a png at all")
    path = write_params(tmp_path / "params.yaml", folder_raw(classes))
    monkeypatch.chdir(tmp_path)
    result = cli("prepare", "--params", str(path))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "cannot read image" in result.stderr and "bad.png" in result.stderr


def test_prepare_rejects_a_batch_larger_than_the_folder(
    classes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = folder_raw(classes)
    raw["train"]["batch_size"] = 12
    path = write_params(tmp_path / "params.yaml", raw)
    monkeypatch.chdir(tmp_path)
    result = cli("prepare", "--params", str(path))
    assert result.exit_code == 2
    assert "train.batch_size: must not exceed the" in result.stderr
    assert not (tmp_path / paths.DATA_INFO).exists()
