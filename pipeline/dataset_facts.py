"""What the checks know about a dataset before loading it: its size, shape, classes and pixel
levels (:class:`DatasetInfo`), fixed for the registered datasets (:data:`DATASETS`) and read from
the files for an image folder (:func:`pipeline.dataset.dataset_info`), and the parameter values
that do not fit them (:func:`dataset_errors`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pipeline.config import DataParams, Params


class DatasetInfo(NamedTuple):
    """Facts about a dataset that the checks need before it is loaded."""

    size: int  # number of images
    image_size: int
    channels: int
    num_classes: int  # 0: unlabelled (a flat image folder)
    pixel_levels: int  # distinct pixel values (bits/dim are reported on this scale)


#: the registered datasets of fixed shape (``diffusion_core.data.DATASETS``); ``folder`` is not
#: here: its facts come from the files (:func:`pipeline.dataset.dataset_info`)
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(size=1797, image_size=8, channels=1, num_classes=10, pixel_levels=17),
    "mnist": DatasetInfo(size=70000, image_size=28, channels=1, num_classes=10, pixel_levels=256),
    "fashion_mnist": DatasetInfo(
        size=70000, image_size=28, channels=1, num_classes=10, pixel_levels=256
    ),
    "cifar10": DatasetInfo(size=60000, image_size=32, channels=3, num_classes=10, pixel_levels=256),
}
FOLDER = "folder"
#: the pixel levels of image files read with Pillow (8 bits per channel)
FOLDER_PIXEL_LEVELS = 256


def held_out_size(info: DatasetInfo, test_fraction: float) -> int:
    """A lower bound on the test split of ``info.size`` images (stratified rounding per class)."""
    return int(info.size * test_fraction - max(info.num_classes, 1) / 2)


def data_errors(data: DataParams, info: DatasetInfo | None) -> list[str]:
    """``data`` keys that do not fit the dataset (``info`` is None for a folder)."""
    if info is None:
        errors = []
        if data.root is None:
            errors.append("data.root: the folder dataset needs root: <folder of images> (got None)")
        if data.image_size is None:
            errors.append(
                "data.image_size: the folder dataset needs the size images are resized to "
                "(got None)"
            )
        return errors
    errors = []
    if data.image_size not in (None, info.image_size):
        errors.append(
            f"data.image_size: {data.dataset} images are {info.image_size}x{info.image_size}; set "
            f"null or {info.image_size} (got {data.image_size})"
        )
    if data.channels not in (None, info.channels):
        errors.append(
            f"data.channels: {data.dataset} images have {info.channels} channel(s); set null or "
            f"{info.channels} (got {data.channels})"
        )
    return errors


def dataset_errors(p: Params, info: DatasetInfo) -> list[str]:
    """Messages for values that do not fit the dataset's size, classes or labels.

    Checked at validation for the registered datasets; for a folder (whose facts come from its
    files) by ``diffusion check-params`` and again by ``prepare``.
    """
    errors: list[str] = []
    what = f"the image folder {p.data.root}" if p.data.dataset == FOLDER else p.data.dataset
    strata = max(info.num_classes, 1)  # the split rounds each class's share (one if unlabelled)
    train_size = info.size - int(info.size * p.data.test_fraction + strata / 2) - 1
    if p.train.batch_size > train_size:
        errors.append(
            f"train.batch_size: must not exceed the {train_size} training images "
            f"(got {p.train.batch_size})"
        )
    test_size = held_out_size(info, p.data.test_fraction)
    if p.evaluate.bpd_images > test_size:
        errors.append(
            f"evaluate.bpd_images: must not exceed the {test_size} test images "
            f"(got {p.evaluate.bpd_images})"
        )
    if info.num_classes == 0 and p.model.conditional:
        errors.append(
            f"model.conditional: {what} is flat (no class subfolders), so it has no labels; set "
            "model.conditional: false or sort the images into one subfolder per class (got True)"
        )
    if info.num_classes < 2 and p.evaluate.extractor == "classifier":
        errors.append(
            f"evaluate.extractor: the classifier extractor learns from class labels and {what} "
            f"has {info.num_classes} classes; use inception or two or more class subfolders "
            "(got 'classifier')"
        )
    for name, m in p.methods.items():
        bad = [c for c in m.classes or [] if c >= info.num_classes]
        if bad:
            errors.append(
                f"methods.{name}.classes: labels must be below {info.num_classes} "
                f"(got {m.classes})"
            )
    return errors
