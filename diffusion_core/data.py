"""Datasets as in-memory tensors: images float32 ``(N, C, H, W)`` in ``[-1, 1]``, labels int64.

Datasets are registered in ``DATASETS`` (name -> loader ``(root, download) -> (images, labels)``):

- ``"digits"``: scikit-learn's bundled UCI handwritten digits (1797 images, 8x8, values 0..16);
  offline, no files needed.
- ``"mnist"``: LeCun et al. 1998 MNIST read from the raw idx files in ``root`` (train and/or
  t10k, gzipped or not); optionally downloaded with ``torchvision.datasets.MNIST``.
- ``"fashion_mnist"``: Xiao et al. 2017 Fashion-MNIST, the same idx layout (also in torchvision's
  ``root/FashionMNIST/raw``); optionally downloaded with ``torchvision.datasets.FashionMNIST``.
- ``"cifar10"``: Krizhevsky 2009 CIFAR-10, 32x32 RGB, from the python batches of
  ``cifar-10-python.tar.gz`` (``root/cifar-10-batches-py`` or ``root``), read with an unpickler
  that accepts numpy arrays and nothing else; optionally downloaded with
  ``torchvision.datasets.CIFAR10``.

Downloads happen only when ``download=True`` and the files are missing; without them every loader
raises one ``DatasetUnavailable`` line saying which files to put where. Image folders of your own
(one subfolder per class, or flat) are read by :func:`diffusion_core.image_folder.load_image_folder`.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DatasetUnavailable",
    "from_levels",
    "from_uint8",
    "load_dataset",
    "read_cifar_batch",
    "read_idx",
    "to_levels",
    "to_uint8",
    "train_test_split",
]

Loader = Callable[[Path | None, bool], tuple[Tensor, Tensor]]

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MNIST_SPLITS = ("train", "t10k")


class DatasetUnavailable(ValueError):  # noqa: N818 (name fixed by the API contract)
    """The dataset's files are not on disk and could not be downloaded."""


def to_uint8(images: Tensor) -> Tensor:
    """Map ``[-1, 1]`` to ``0..255``: ``round((clamp(x, -1, 1) + 1) * 127.5)`` as uint8."""
    return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def from_uint8(images: Tensor) -> Tensor:
    """Map ``0..255`` to ``[-1, 1]``: ``x / 127.5 - 1`` as float32 (inverse of ``to_uint8``)."""
    return images.to(torch.float32) / 127.5 - 1.0


def from_levels(levels: Tensor | np.ndarray, num_levels: int) -> Tensor:
    """Map integer pixel levels ``k in 0..L-1`` to ``[-1, 1]``: ``x = 2 k / (L - 1) - 1``.

    The one map between a dataset's grey levels and the model's scale: data loading uses it
    (digits: ``L = 17``, ``x = k / 8 - 1``; MNIST: ``L = 256``, ``x = k / 127.5 - 1``) and so does
    ``likelihood.bits_per_dim`` (dequantisation bins of width ``2 / (L - 1)`` centred on ``x``).
    """
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    k = torch.as_tensor(np.asarray(levels) if isinstance(levels, np.ndarray) else levels)
    return k.to(torch.float32) / ((num_levels - 1) / 2.0) - 1.0


def to_levels(images: Tensor, num_levels: int) -> Tensor:
    """Inverse of ``from_levels``: ``k = round((clamp(x, -1, 1) + 1) (L - 1) / 2)`` as int64."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    top = num_levels - 1
    return ((images.clamp(-1.0, 1.0) + 1.0) * (top / 2.0)).round().long().clamp(0, top)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format; gzip-compressed or not) into a numpy array.

    Format (LeCun et al.): two zero bytes, a type byte (0x08 = uint8, ...), a byte with the
    number of dimensions ``d``, ``d`` big-endian int32 sizes, then the data in C order.
    """
    path = Path(path)
    with path.open("rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {data[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(data[4:header], dtype=">i4"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: idx header says shape {shape} ({expected} bytes), "
            f"but the file holds {len(data) - header} bytes"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _load_digits(root: Path | None, download: bool) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits: ``from_levels(k, 17)`` maps 0..16 to [-1, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = from_levels(bunch.images.astype(np.int64), 17).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images.contiguous(), labels


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_files(root: Path, raw: str) -> list[tuple[Path, Path]]:
    """(images, labels) idx file pairs present in ``root`` or torchvision's ``root/<raw>/raw``."""
    pairs = []
    for folder in (root, root / raw / "raw"):
        for split in _MNIST_SPLITS:
            img = _find_idx(folder, f"{split}-images-idx3-ubyte")
            lab = _find_idx(folder, f"{split}-labels-idx1-ubyte")
            if img is not None and lab is not None:
                pairs.append((img, lab))
        if pairs:
            return pairs
    return pairs


def _download(name: str, root: Path, make: Callable[[bool], object], source: str) -> None:
    """Fetch ``name`` into ``root`` with ``make(train)`` (a torchvision dataset, download=True)."""
    try:
        for train in (True, False):
            make(train)
    except Exception as exc:  # any network / IO failure becomes one clear error
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DatasetUnavailable(
            f"{name} download into {root} failed ({type(exc).__name__}: {first}); place the "
            f"files there by hand (from {source})"
        ) from exc


def _load_idx_dataset(
    name: str, raw: str, source: str, root: Path | None, download: bool
) -> tuple[Tensor, Tensor]:
    """An MNIST-format dataset from raw idx files; ``from_levels(k, 256)`` maps 0..255 to [-1, 1].

    ``raw`` is torchvision's folder name (``MNIST``, ``FashionMNIST``): its download lands in
    ``root/<raw>/raw``, which is searched after ``root`` itself.
    """
    wanted = ", ".join(
        f"{split}-{kind}-ubyte[.gz]" for split in _MNIST_SPLITS for kind in ("images-idx3", "labels-idx1")
    )
    if root is None:
        raise DatasetUnavailable(f"{name} needs root=<folder> holding {wanted}")
    pairs = _idx_files(root, raw)
    if not pairs and download:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, raw)
        _download(name, root, lambda train: cls(str(root), train=train, download=True), source)
        pairs = _idx_files(root, raw)
    if not pairs:
        raise DatasetUnavailable(
            f"{name} idx files not found: looked for {wanted} in {root} and "
            f"{root / raw / 'raw'}; copy them there (from {source}) or allow the download "
            "(download=True; needs a network)"
        )
    images, labels = [], []
    for img_path, lab_path in pairs:
        img, lab = read_idx(img_path), read_idx(lab_path)
        if img.ndim != 3 or lab.ndim != 1 or img.shape[0] != lab.shape[0]:
            raise ValueError(
                f"{name} files disagree: {img_path.name} has shape {img.shape}, "
                f"{lab_path.name} has shape {lab.shape}"
            )
        images.append(from_levels(img.astype(np.int64), 256))
        labels.append(torch.from_numpy(lab.astype(np.int64)))
    return torch.cat(images).unsqueeze(1).contiguous(), torch.cat(labels)


def _load_mnist(root: Path | None, download: bool) -> tuple[Tensor, Tensor]:
    """MNIST (LeCun et al. 1998), 28x28 grey digits, from raw idx files."""
    return _load_idx_dataset(
        "mnist", "MNIST", "https://yann.lecun.com/exdb/mnist/ or a mirror", root, download
    )


def _load_fashion_mnist(root: Path | None, download: bool) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST (Xiao et al. 2017), 28x28 grey clothing images, from raw idx files."""
    return _load_idx_dataset(
        "fashion_mnist", "FashionMNIST", "https://github.com/zalandoresearch/fashion-mnist",
        root, download,
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (no code runs)."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how protocol 2 stores bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``.

    The batch is a pickled dict with ``data`` (``N x 3072`` uint8, channel-major) and ``labels``;
    it is read with an unpickler that only rebuilds numpy arrays.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DatasetUnavailable(
            f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise DatasetUnavailable(
            f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _cifar_folder(root: Path) -> Path | None:
    for folder in (root / _CIFAR_FOLDER, root):
        if all((folder / name).is_file() for name in _CIFAR_BATCHES):
            return folder
    return None


def _load_cifar10(root: Path | None, download: bool) -> tuple[Tensor, Tensor]:
    """CIFAR-10 (Krizhevsky 2009): 50000 train then 10000 test 32x32 RGB images, 10 classes."""
    wanted = f"{', '.join(_CIFAR_BATCHES)} (unpacked from {_CIFAR_URL})"
    if root is None:
        raise DatasetUnavailable(f"cifar10 needs root=<folder> holding {_CIFAR_FOLDER}/{{{wanted}}}")
    folder = _cifar_folder(root)
    if folder is None and download:
        from torchvision.datasets import CIFAR10

        _download(
            "cifar10", root, lambda train: CIFAR10(str(root), train=train, download=True),
            _CIFAR_URL,
        )
        folder = _cifar_folder(root)
    if folder is None:
        have = root / _CIFAR_FOLDER if (root / _CIFAR_FOLDER).is_dir() else root
        missing = [n for n in _CIFAR_BATCHES if not (have / n).is_file()]
        raise DatasetUnavailable(
            f"cifar10 batches not found: {root / _CIFAR_FOLDER} (or {root}) must hold {wanted}; "
            f"missing {', '.join(missing)}; unpack the archive into {root} or allow the download "
            "(download=True; needs a network)"
        )
    images, labels = zip(*(read_cifar_batch(folder / name) for name in _CIFAR_BATCHES), strict=True)
    x = from_levels(np.concatenate(images).astype(np.int64), 256)
    return x.contiguous(), torch.from_numpy(np.concatenate(labels))


DATASETS: dict[str, Loader] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
}


def load_dataset(
    name: str, root: str | Path | None = None, download: bool = False
) -> tuple[Tensor, Tensor]:
    """Load a registered dataset: images float32 (N, C, H, W) in [-1, 1], labels int64 (N,).

    Raises ValueError for an unknown name and ``DatasetUnavailable`` when files are missing.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](None if root is None else Path(root), download)


def train_test_split(
    images: Tensor, labels: Tensor, test_fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Deterministic stratified split: ``round(n_c * test_fraction)`` of each class go to test.

    Within each class the examples are permuted by a ``torch.Generator`` seeded with ``seed``; both
    parts keep the original dataset order. Returns ``(train_x, train_y, test_x, test_y)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if images.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise ValueError(
            f"images ({images.shape[0]}) and labels {tuple(labels.shape)} must have the same length"
        )
    generator = torch.Generator().manual_seed(int(seed))
    is_test = torch.zeros(labels.shape[0], dtype=torch.bool)
    labels_cpu = labels.cpu()
    for cls in torch.unique(labels_cpu).tolist():
        idx = torch.nonzero(labels_cpu == cls).flatten()
        n_test = int(round(idx.numel() * test_fraction))
        is_test[idx[torch.randperm(idx.numel(), generator=generator)[:n_test]]] = True
    is_test = is_test.to(labels.device)
    train, test = ~is_test, is_test
    return (
        images[train.to(images.device)],
        labels[train],
        images[test.to(images.device)],
        labels[test],
    )
