"""Tests of the datasets: digits, the idx reader (MNIST, Fashion-MNIST), CIFAR-10 batches, the
stratified split, uint8 conversion."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_core import data
from diffusion_core.data import (
    DatasetUnavailable,
    from_uint8,
    load_dataset,
    read_cifar_batch,
    read_idx,
    to_uint8,
    train_test_split,
)

# real MNIST idx files: $DIFFUSION_MNIST_ROOT, else the shared data folder beside the checkout
# (the project's test machines and CI have it there)
REAL_MNIST = Path(os.environ.get("DIFFUSION_MNIST_ROOT",
                                 Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"))


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write a uint8 array in the idx format (magic 0x0000 08 <ndim>, big-endian sizes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def fake_mnist(folder: Path, split: str, n: int, seed: int, compress: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, compress)
    write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)
    return images


def test_digits_shape_range_and_scaling() -> None:
    from sklearn.datasets import load_digits

    images, labels = load_dataset("digits")
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))
    raw = load_digits()
    torch.testing.assert_close(images[5, 0], torch.from_numpy(raw.images[5] / 8.0 - 1.0).float())


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(ValueError, match="digits.*mnist"):
        load_dataset("cifar100")
    assert {"digits", "mnist", "fashion_mnist", "cifar10"} <= set(data.DATASETS)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.idx", array, compress)
    out = read_idx(tmp_path / "x.idx")
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    good = np.zeros((4, 2), dtype=np.uint8)
    write_idx(tmp_path / "short", good)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="bytes"):
        read_idx(tmp_path / "short")


def test_mnist_reads_train_and_t10k_in_order(tmp_path: Path) -> None:
    train = fake_mnist(tmp_path, "train", 6, seed=0, compress=True)
    test = fake_mnist(tmp_path, "t10k", 4, seed=1, compress=False)
    images, labels = load_dataset("mnist", root=tmp_path)
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    expected = np.concatenate([train, test]).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(images[:, 0].numpy(), expected, rtol=0, atol=1e-6)
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_mnist_reads_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    fake_mnist(raw, "t10k", 3, seed=2, compress=False)
    images, labels = load_dataset("mnist", root=tmp_path)
    assert images.shape == (3, 1, 28, 28) and labels.tolist() == [0, 1, 2]


def test_mnist_missing_raises_dataset_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="t10k-images-idx3-ubyte") as info:
        load_dataset("mnist", root=tmp_path)
    assert isinstance(info.value, ValueError)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DatasetUnavailable):
        load_dataset("mnist", root=None)


def test_mnist_failed_download_raises_dataset_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DatasetUnavailable, match="download"):
        load_dataset("mnist", root=tmp_path, download=True)


def test_fashion_mnist_reads_its_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    train = fake_mnist(raw, "train", 5, seed=3, compress=True)
    images, labels = load_dataset("fashion_mnist", root=tmp_path)
    assert images.shape == (5, 1, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(images[:, 0].numpy(), train / 127.5 - 1.0, rtol=0, atol=1e-6)


def fake_cifar(folder: Path, n: int = 2) -> np.ndarray:
    """Six pickled python batches of ``n`` images each, as in cifar-10-python.tar.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    everything = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "labels": [(i + j) % 10 for j in range(n)], "data": images}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        everything.append(images)
    return np.concatenate(everything).reshape(-1, 3, 32, 32)


def test_cifar10_reads_the_python_batches_in_order(tmp_path: Path) -> None:
    expected = fake_cifar(tmp_path / "cifar-10-batches-py")
    images, labels = load_dataset("cifar10", root=tmp_path)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    np.testing.assert_allclose(images.numpy(), expected / 127.5 - 1.0, rtol=0, atol=1e-6)


def test_cifar10_batch_reader_runs_no_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    (tmp_path / "evil").write_bytes(pickle.dumps({"data": Payload(), "labels": []}))
    with pytest.raises(DatasetUnavailable, match="refusing to load builtins.print"):
        read_cifar_batch(tmp_path / "evil")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_offline_missing_files_say_where_to_put_what(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    import torchvision.datasets

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("download=False must not touch the network")

    for cls in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(torchvision.datasets, cls, no_network)
    expected = {
        "mnist": ["t10k-images-idx3-ubyte", str(tmp_path / "MNIST" / "raw")],
        "fashion_mnist": ["train-labels-idx1-ubyte", str(tmp_path / "FashionMNIST" / "raw")],
        "cifar10": ["data_batch_1", "test_batch", str(tmp_path / "cifar-10-batches-py"),
                    "cifar-10-python.tar.gz"],
    }[name]
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset(name, root=tmp_path)
    message = str(info.value)
    assert all(part in message for part in expected) and "\n" not in message
    assert "download" in message


def test_cifar10_names_the_missing_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    fake_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetUnavailable, match="; missing data_batch_3;"):
        load_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize(("name", "cls"), [("fashion_mnist", "FashionMNIST"), ("cifar10", "CIFAR10")])
def test_failed_download_raises_dataset_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, cls: str
) -> None:
    import torchvision.datasets

    calls = []

    def offline(*args: object, **kwargs: object) -> None:
        calls.append(kwargs)
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, cls, offline)
    with pytest.raises(DatasetUnavailable, match=f"{name} download into .* failed .*no network"):
        load_dataset(name, root=tmp_path, download=True)
    assert calls and calls[0]["download"] is True


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="real MNIST test set not available")
def test_real_mnist_t10k() -> None:
    images, labels = load_dataset("mnist", root=REAL_MNIST)
    assert images.shape == (10000, 1, 28, 28)
    assert images.min() == -1.0 and images.max() == 1.0
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 10000 and (counts > 800).all()


def test_train_test_split_is_stratified_disjoint_and_deterministic() -> None:
    n = 103
    labels = torch.tensor([i % 3 if i < 90 else 3 for i in range(n)])
    images = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)  # image value = index
    tr_x, tr_y, te_x, te_y = train_test_split(images, labels, 0.2, seed=7)
    ids_train, ids_test = tr_x.flatten().long(), te_x.flatten().long()
    assert set(ids_train.tolist()).isdisjoint(ids_test.tolist())
    assert sorted(ids_train.tolist() + ids_test.tolist()) == list(range(n))
    assert torch.equal(labels[ids_train], tr_y) and torch.equal(labels[ids_test], te_y)
    for cls in range(4):
        n_cls = int((labels == cls).sum())
        assert int((te_y == cls).sum()) == round(n_cls * 0.2)
    again = train_test_split(images, labels, 0.2, seed=7)
    assert torch.equal(again[2], te_x)
    other = train_test_split(images, labels, 0.2, seed=8)
    assert not torch.equal(other[2], te_x)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_train_test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), fraction, 0)


def test_uint8_conversion() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(x).dtype == torch.uint8
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(every)), every)
    torch.testing.assert_close(
        from_uint8(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0])
    )
