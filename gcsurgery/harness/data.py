"""Datasets: Fashion-MNIST (with an embedded offline subset), CIFAR-10 and ImageNet-style folders.

Fashion-MNIST resolves in this order: an explicit ``data_dir``, the Debian package's files
(``apt-get install dataset-fashion-mnist``), torchvision's download when ``download=True``, and
last the small class-balanced subset shipped in ``gcsurgery/assets/`` so that everything runs
offline. The returned :class:`ImageData` says in ``source`` which one was used. Batches come from
`gcsurgery.harness.loader`.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import GCSurgeryError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_PREFIX = "fashion-mnist-subset-"  # files in gcsurgery/assets/
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_SUBSETS = (None, "embedded", "full")


@dataclass(frozen=True, eq=False)
class ImageData:
    """A labelled image dataset held in memory.

    Attributes:
        train_images: uint8 tensor, (N, H, W) for grey images or (N, C, H, W).
        train_labels: int64 tensor (N,).
        test_images: uint8 tensor, same layout as ``train_images``.
        test_labels: int64 tensor.
        source: where the data came from, e.g. ``"debian:/usr/share/datasets/fashion-mnist"``.
        classes: the class names, indexed by label.
        name: the dataset's name.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str
    classes: tuple[str, ...]
    name: str = "Fashion-MNIST"

    def __str__(self) -> str:
        shape = "x".join(str(s) for s in self.train_images.shape[1:])
        return (
            f"{self.name}: {len(self.train_labels)} train / {len(self.test_labels)} test images of {shape}, "
            f"{len(self.classes)} classes, from {self.source}"
        )


# --- IDX files --------------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike, *, ndim: int | None = None) -> torch.Tensor:
    """Reads an IDX file of unsigned bytes (the MNIST format), gzip-compressed or plain.

    Args:
        path: the file; gzip is recognised by its magic bytes, not by the name.
        ndim: the number of dimensions the file must have (3 for images, 1 for labels), or None.

    Returns:
        A uint8 tensor with the file's dimensions.

    Raises:
        GCSurgeryError: the file is missing, not gzip-readable, or not a well-formed IDX file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise GCSurgeryError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise GCSurgeryError(f"{path} is not an IDX file: it must start with two zero bytes, got {raw[:4]!r}")
    if raw[2] != 0x08:
        raise GCSurgeryError(f"{path}: IDX data type 0x{raw[2]:02x} is not supported, only 0x08 (unsigned byte)")
    nd = raw[3]
    if ndim is not None and nd != ndim:
        raise GCSurgeryError(f"{path}: expected an IDX file with {ndim} dimensions, the header says {nd}")
    if len(raw) < 4 + 4 * nd:
        raise GCSurgeryError(f"{path}: IDX header is truncated ({len(raw)} bytes for {nd} dimensions)")
    dims = struct.unpack(f">{nd}I", raw[4 : 4 + 4 * nd])
    expected = math.prod(dims)
    if len(raw) - 4 - 4 * nd != expected:
        raise GCSurgeryError(
            f"{path}: IDX header says dims {dims} ({expected} bytes) but the file holds {len(raw) - 4 - 4 * nd}"
        )
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(dims).copy())


def write_idx(path: str | os.PathLike, data: torch.Tensor | np.ndarray) -> None:
    """Writes a uint8 array as an IDX file, gzip-compressed when ``path`` ends in ``.gz``."""
    arr = np.ascontiguousarray(np.asarray(data))
    if arr.dtype != np.uint8:
        raise GCSurgeryError(f"write_idx writes uint8 data only, got {arr.dtype}")
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0) if path.suffix == ".gz" else raw)


# --- Fashion-MNIST ----------------------------------------------------------------------------------------------


def find_fashion_files(directory: Path, prefix: str = "") -> list[Path] | None:
    """The four IDX files in ``directory``, its ``raw/`` or torchvision's ``FashionMNIST/raw/``; plain or gz."""
    for d in (directory, directory / "raw", directory / "FashionMNIST" / "raw"):
        found = []
        for name in FASHION_FILES:
            hits = [d / f"{prefix}{name}{ext}" for ext in ("", ".gz") if (d / f"{prefix}{name}{ext}").is_file()]
            if not hits:
                break
            found.append(hits[0])
        if len(found) == len(FASHION_FILES):
            return found
    return None


def _read_fashion(files: Sequence[Path], source: str) -> ImageData:
    tensors = []
    for images_path, labels_path in (files[:2], files[2:]):
        images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise GCSurgeryError(
                f"{images_path} holds images of shape {tuple(images.shape)} and {labels_path} {len(labels)} labels; "
                "Fashion-MNIST needs (N, 28, 28) images and N labels"
            )
        if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise GCSurgeryError(f"{labels_path} holds label {int(labels.max())}; Fashion-MNIST labels are 0..9")
        tensors += [images, labels.long()]
    return ImageData(*tensors, source=source, classes=FASHION_MNIST_CLASSES)


def _embedded_fashion() -> ImageData:
    with resources.as_file(resources.files("gcsurgery") / "assets") as assets:
        files = find_fashion_files(assets, prefix=EMBEDDED_PREFIX)
        if files is None:
            raise GCSurgeryError(f"the embedded Fashion-MNIST subset is missing from {assets}; reinstall gcsurgery")
        data = _read_fashion(files, source="")
    source = f"embedded subset ({len(data.train_labels)}/{len(data.test_labels)})"
    return ImageData(data.train_images, data.train_labels, data.test_images, data.test_labels, source, data.classes)


def _download_fashion(root: Path) -> list[Path]:
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as e:  # torchvision raises URLError, RuntimeError, OSError... depending on what failed
        raise GCSurgeryError(
            f"downloading Fashion-MNIST into {root} failed ({type(e).__name__}: {e}); without a network, "
            "pass data_dir= with the IDX files, install dataset-fashion-mnist, or leave download=False to use "
            "the embedded subset"
        ) from e
    files = find_fashion_files(root)
    assert files is not None, f"torchvision downloaded Fashion-MNIST but {root}/FashionMNIST/raw lacks the IDX files"
    return files


def load_fashion_mnist(
    *, data_dir: str | os.PathLike | None = None, download: bool = False, subset: str | None = None
) -> ImageData:
    """Loads Fashion-MNIST from the first place that has it.

    Order: ``data_dir`` (IDX files in it, in ``raw/`` or in torchvision's ``FashionMNIST/raw/``), then
    ``/usr/share/datasets/fashion-mnist`` (Debian), then torchvision's download if ``download`` is true,
    then the embedded subset (6000 train / 1000 test images, 10% per class).

    Args:
        data_dir: a directory that must hold the data; with ``download=True`` it is downloaded there if absent.
        download: allow torchvision to download the data (needs a network).
        subset: None (the order above), ``"embedded"`` (always the embedded subset) or ``"full"`` (the
            embedded subset is not acceptable: raise if the full data cannot be found).

    Returns:
        The data, with ``source`` saying where it came from.

    Raises:
        GCSurgeryError: a bad ``subset``; ``data_dir`` lacks the files; a download failed; a malformed file.
    """
    if subset not in _SUBSETS:
        raise GCSurgeryError(f"unknown subset {subset!r}; choose one of {list(_SUBSETS)}")
    if subset == "embedded":
        return _embedded_fashion()
    if data_dir is not None:
        data_dir = Path(data_dir)
        files = find_fashion_files(data_dir)
        if files is None and download:
            files = _download_fashion(data_dir)
        if files is None:
            raise GCSurgeryError(
                f"no Fashion-MNIST in {data_dir}: expected {', '.join(FASHION_FILES)} (each plain or .gz) in it, "
                "in its raw/, or in FashionMNIST/raw/ (torchvision's layout); pass download=True to fetch them there"
            )
        return _read_fashion(files, source=f"data_dir:{data_dir}")
    files = find_fashion_files(DEBIAN_FASHION_MNIST)
    if files is not None:
        return _read_fashion(files, source=f"debian:{DEBIAN_FASHION_MNIST}")
    if download:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gcsurgery"
        return _read_fashion(_download_fashion(root), source=f"torchvision download:{root}")
    if subset == "full":
        raise GCSurgeryError(
            f"the full Fashion-MNIST was not found (no data_dir given, nothing in {DEBIAN_FASHION_MNIST}); pass "
            "data_dir=, apt-get install dataset-fashion-mnist, or download=True where a network exists"
        )
    return _embedded_fashion()


def load_cifar10(data_dir: str | os.PathLike, *, check_md5: bool = False) -> ImageData:
    """Loads CIFAR-10 from torchvision's on-disk format (``cifar-10-batches-py/``, the python version).

    torchvision's ``CIFAR10`` checks every file's md5 even with ``download=False``; that is done here
    only with ``check_md5=True``, so other files in the same format (e.g. a prepared subset) load too.

    Args:
        data_dir: the directory holding ``cifar-10-batches-py/``, or that directory itself.
        check_md5: verify the files against the official checksums.

    Returns:
        The data, images as uint8 (N, 3, 32, 32); use `gcsurgery.harness.loader.TensorLoader` with
        ``augment="crop_flip"`` for the standard training transforms.

    Raises:
        GCSurgeryError: a missing, incomplete or malformed directory, or failed checksums.
    """
    from torchvision.datasets import CIFAR10

    data_dir = Path(data_dir)
    root = data_dir.parent if data_dir.name == CIFAR10.base_folder else data_dir
    folder = root / CIFAR10.base_folder
    names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise GCSurgeryError(
            f"CIFAR-10 not found: expected {folder}/ holding {', '.join(names)} (cifar-10-python.tar.gz "
            f"extracted into {root}); missing: {', '.join(missing)}"
        )
    cls = CIFAR10 if check_md5 else _cifar10_unverified()
    try:
        train, test = cls(str(root), train=True), cls(str(root), train=False)
    except RuntimeError as e:
        raise GCSurgeryError(f"CIFAR-10 in {folder} failed its md5 check ({e}); re-extract the archive") from e
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
        raise GCSurgeryError(f"CIFAR-10 in {folder} is malformed ({type(e).__name__}: {e})") from e

    def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        return images, torch.tensor(ds.targets, dtype=torch.long)

    classes = tuple(train.classes)
    return ImageData(*tensors(train), *tensors(test), source=f"data_dir:{folder}", classes=classes, name="CIFAR-10")


def _cifar10_unverified() -> type:
    from torchvision.datasets import CIFAR10  # imported here: torchvision is needed only for CIFAR-10 and folders

    class CIFAR10Unverified(CIFAR10):
        """CIFAR10 that checks that the files exist but not their md5 (None skips torchvision's check)."""

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return CIFAR10Unverified


def imagenet_folders(
    data_dir: str | os.PathLike, *, image_size: int = 224, resize_size: int | None = None
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """ImageNet-style ``train/`` and ``val/`` folders (one subfolder per class) with the standard transforms.

    Training: random resized crop to ``image_size``, horizontal flip; validation: resize to ``resize_size``
    (default ``image_size / 0.875``) and centre crop; both normalised with the ImageNet mean and std.

    Args:
        data_dir: the directory holding ``train/`` and ``val/``.
        image_size: the side of the images the model sees.
        resize_size: the side validation images are resized to before the centre crop.

    Returns:
        ``(train, val)`` torchvision ``ImageFolder`` datasets with the same classes; wrap them in a
        ``DataLoader`` (with a ``DistributedSampler`` under DDP).

    Raises:
        GCSurgeryError: a missing folder, no class subfolders or images, or different classes in train and val.
    """
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    data_dir = Path(data_dir)
    layout = "data_dir/train/<class>/*.jpg and data_dir/val/<class>/*.jpg, the same class folders in both"
    for split in ("train", "val"):
        if not (data_dir / split).is_dir():
            raise GCSurgeryError(f"no folder {data_dir / split}; expected {layout}")
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    resize = resize_size or round(image_size / 0.875)
    val_tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize])
    try:
        train = ImageFolder(str(data_dir / "train"), transform=train_tf)
        val = ImageFolder(str(data_dir / "val"), transform=val_tf)
    except (FileNotFoundError, ValueError) as e:
        raise GCSurgeryError(f"{e} Expected {layout} (a flat val/ must first be sorted into class folders)") from e
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise GCSurgeryError(
            f"train/ and val/ in {data_dir} have different classes: only in train {only_train[:5]}, "
            f"only in val {only_val[:5]}; expected {layout}"
        )
    return train, val
