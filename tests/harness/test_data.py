import gzip
import pickle
import struct
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gcsurgery.harness.data as data
from gcsurgery.errors import GCSurgeryError
from gcsurgery.harness.data import (
    FASHION_FILES,
    imagenet_folders,
    load_cifar10,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from gcsurgery.harness.loader import TensorLoader, balanced_subset

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not all((DEBIAN / f"{n}.gz").is_file() for n in FASHION_FILES), reason="dataset-fashion-mnist not installed"
)


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX format written out by hand: 0, 0, type 0x08, ndim, big-endian int32 dims, then the bytes."""
    return bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape) + arr.tobytes()


def fake_fashion(directory: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    """Tiny Fashion-MNIST IDX files: image i is filled with i, label i % 10."""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28)).copy()
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            raw = idx_bytes(arr)
            (directory / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)


# --- IDX reader -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_plain_and_gzip(tmp_path, gz):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = tmp_path / "x-idx3-ubyte"  # gzip is recognised by content, not by the name
    path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    out = read_idx(path, ndim=3)
    assert out.dtype == torch.uint8 and out.shape == (5, 28, 28)
    assert np.array_equal(out.numpy(), arr)


def test_write_idx_round_trip(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "a", arr)
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == idx_bytes(arr) == (tmp_path / "a").read_bytes()
    assert np.array_equal(read_idx(tmp_path / "a.gz").numpy(), arr)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x00\x00\x08", "not an IDX file"),
        (b"\x01\x00\x08\x01" + struct.pack(">i", 1) + b"\x00", "two zero bytes"),
        (b"\x00\x00\x0d\x01" + struct.pack(">i", 1) + b"\x00\x00\x00\x00", "0x0d is not supported"),
        (b"\x00\x00\x08\x03" + struct.pack(">i", 1), "header is truncated"),
        (
            b"\x00\x00\x08\x03" + struct.pack(">3i", 1, 1, 5) + b"\x00\x00",
            r"dims \(1, 1, 5\) \(5 bytes\) but the file holds 2",
        ),
        (b"\x00\x00\x08\x01" + struct.pack(">i", 1) + b"\x00", "expected an IDX file with 3 dimensions"),
        (gzip.compress(idx_bytes(np.zeros((2, 2, 2), np.uint8)), mtime=0)[:-12], "cannot read IDX file"),
    ],
)
def test_read_idx_malformed(tmp_path, raw, match):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(raw)
    with pytest.raises(GCSurgeryError, match=match) as info:
        read_idx(path, ndim=3)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(GCSurgeryError, match="nope"):
        read_idx(tmp_path / "nope")


# --- Fashion-MNIST resolution -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["", "raw", "FashionMNIST/raw"])
@pytest.mark.parametrize("gz", [True, False])
def test_data_dir_layouts(tmp_path, layout, gz):
    fake_fashion(tmp_path / layout, gz=gz)
    d = load_fashion_mnist(data_dir=tmp_path)
    assert d.source == f"data_dir:{tmp_path}"
    assert d.train_images.shape == (20, 28, 28) and d.test_images.shape == (10, 28, 28)
    assert d.train_labels.dtype == torch.int64 and d.train_labels.tolist() == [i % 10 for i in range(20)]
    assert int(d.train_images[7, 3, 3]) == 7


def test_data_dir_missing_files_is_an_error(tmp_path):
    with pytest.raises(GCSurgeryError, match="FashionMNIST/raw"):
        load_fashion_mnist(data_dir=tmp_path)


def test_data_dir_bad_labels(tmp_path):
    fake_fashion(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(10, 12, np.uint8)))
    with pytest.raises(GCSurgeryError, match="label 12"):
        load_fashion_mnist(data_dir=tmp_path)


def test_download_goes_through_torchvision_into_data_dir(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            fake_fashion(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    d = load_fashion_mnist(data_dir=tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert d.source == f"data_dir:{tmp_path}" and len(d.train_labels) == 20


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(GCSurgeryError, match="download=False to use the embedded subset"):
        load_fashion_mnist(data_dir=tmp_path, download=True)


def test_falls_back_to_embedded_without_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    assert load_fashion_mnist().source == "embedded subset (6000/1000)"
    with pytest.raises(GCSurgeryError, match="full Fashion-MNIST was not found"):
        load_fashion_mnist(subset="full")
    fake_fashion(tmp_path / "absent")
    assert load_fashion_mnist().source == f"debian:{tmp_path / 'absent'}"


def test_unknown_subset():
    with pytest.raises(GCSurgeryError, match=r"choose one of \[None, 'embedded', 'full'\]"):
        load_fashion_mnist(subset="tiny")


def test_embedded_subset():
    d = load_fashion_mnist(subset="embedded")
    assert d.source == "embedded subset (6000/1000)"
    assert d.train_images.shape == (6000, 28, 28) and d.test_images.shape == (1000, 28, 28)
    assert d.train_images.dtype == torch.uint8 and d.train_labels.dtype == torch.int64
    assert d.train_labels.bincount().tolist() == [600] * 10 and d.test_labels.bincount().tolist() == [100] * 10
    assert len(d.classes) == 10 and d.classes[9] == "Ankle boot"
    assert 0.2 < d.train_images.float().mean() / 255 < 0.4  # real clothes on black, not blank
    licence = (resources.files("gcsurgery") / "assets" / "FASHION-MNIST-LICENSE.txt").read_text()
    assert "Zalando SE" in licence and "Permission is hereby granted" in licence
    assert "6000 train / 1000 test images of 28x28" in str(d)


@needs_debian
def test_debian_full_data_and_embedded_subset_is_a_real_subset():
    full = load_fashion_mnist()
    assert full.source == f"debian:{DEBIAN}"
    assert full.train_images.shape == (60000, 28, 28) and full.test_images.shape == (10000, 28, 28)
    emb = load_fashion_mnist(subset="embedded")
    for images, labels, n in ((full.train_images, full.train_labels, 600), (full.test_images, full.test_labels, 100)):
        keep = balanced_subset(labels, per_class=n, seed=0)  # how benchmarks/make_fashion_subset.py chose them
        sub_images = emb.train_images if n == 600 else emb.test_images
        sub_labels = emb.train_labels if n == 600 else emb.test_labels
        assert torch.equal(images[keep], sub_images) and torch.equal(labels[keep], sub_labels)


# --- CIFAR-10 and image folders ---------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as the official CIFAR-10 files, pickled by Python 2, do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n))
        self.write(obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def fake_cifar10(root: Path, per_batch: int = 4) -> Path:
    """cifar-10-batches-py/ in the real format: Python 2 pickles of dicts with keys b"data" (uint8 (N, 3072) rows,
    CHW order) and b"labels", and batches.meta with b"label_names"."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        rows = ((np.arange(3072) + b + np.arange(per_batch)[:, None]) % 256).astype(np.uint8)  # (N, 3072)
        entry = {b"batch_label": name.encode(), b"labels": [(b + i) % 10 for i in range(per_batch)], b"data": rows}
        with open(folder / name, "wb") as f:
            Py2Pickler(f, protocol=2).dump(entry)
    meta = {b"label_names": [c.encode() for c in data.CIFAR10_CLASSES], b"num_vis": 3072, b"num_cases_per_batch": 4}
    with open(folder / "batches.meta", "wb") as f:
        Py2Pickler(f, protocol=2).dump(meta)
    with open(folder / "test_batch", "rb") as f:  # as the real files: bytes keys raw, str keys under latin1
        assert b"data" in pickle.load(f, encoding="bytes")
    return folder


def test_cifar10_from_generated_batches(tmp_path):
    folder = fake_cifar10(tmp_path)
    for where in (tmp_path, folder):
        d = load_cifar10(where)
        assert d.train_images.shape == (20, 3, 32, 32) and d.test_images.shape == (4, 3, 32, 32)
        assert d.train_images.dtype == torch.uint8 and d.train_labels.dtype == torch.int64
        assert d.train_labels[:4].tolist() == [0, 1, 2, 3] and d.test_labels.tolist() == [5, 6, 7, 8]
        assert int(d.train_images[4, 0, 0, 0]) == 1 and int(d.train_images[4, 1, 5, 5]) == (1024 + 5 * 32 + 5 + 1) % 256
        assert d.classes == data.CIFAR10_CLASSES and d.name == "CIFAR-10" and str(folder) in d.source
    x, _ = next(iter(TensorLoader(d.train_images, d.train_labels, batch_size=8, augment="crop_flip")))
    assert x.shape == (8, 3, 32, 32)


def test_cifar10_md5_and_missing_files(tmp_path):
    folder = fake_cifar10(tmp_path)
    with pytest.raises(GCSurgeryError, match="md5"):  # generated files are not the official ones
        load_cifar10(tmp_path, check_md5=True)
    (folder / "data_batch_3").unlink()
    with pytest.raises(GCSurgeryError, match="missing: data_batch_3"):
        load_cifar10(tmp_path)
    with pytest.raises(GCSurgeryError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path / "elsewhere")


def test_cifar10_malformed(tmp_path):
    folder = fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(GCSurgeryError, match="malformed"):
        load_cifar10(tmp_path)


def fake_folders(root: Path, classes=("cat", "dog"), val_classes=None) -> None:
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i, ext in enumerate(("png", "jpg")):
                Image.new("RGB", (40, 48), (60 * c, 20 * i, 90)).save(root / split / name / f"{i}.{ext}")


def test_imagenet_folders(tmp_path):
    fake_folders(tmp_path)
    train, val = imagenet_folders(tmp_path, image_size=32)
    assert train.classes == val.classes == ["cat", "dog"] and len(train) == len(val) == 4
    for ds in (train, val):
        x, y = ds[3]
        assert x.shape == (3, 32, 32) and y == 1 and torch.isfinite(x).all()
    assert torch.allclose(val[0][0][2], torch.full((32, 32), (90 / 255 - 0.406) / 0.225), atol=0.02)


def test_imagenet_folders_errors(tmp_path):
    with pytest.raises(GCSurgeryError, match="no folder .*train; expected"):
        imagenet_folders(tmp_path)
    fake_folders(tmp_path / "a", val_classes=("cat", "cow"))
    with pytest.raises(GCSurgeryError, match=r"only in train \['dog'\], only in val \['cow'\]"):
        imagenet_folders(tmp_path / "a")
    (tmp_path / "b" / "train").mkdir(parents=True)
    (tmp_path / "b" / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "val" / "flat.jpg")
    with pytest.raises(GCSurgeryError, match="sorted into class folders"):
        imagenet_folders(tmp_path / "b")
