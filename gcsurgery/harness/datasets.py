"""The loaders of one run: dataset → train / validation / test split → loaders with the training split's statistics.

Tensor datasets (Fashion-MNIST, CIFAR-10): the validation split is cut from the training images (the same
split for every seed and arm), optionally narrowed to class-balanced subsets; the test set is the
dataset's own. Image folders: ``train/`` trains, ``val/`` validates (picks the best epoch), and a
``test/`` folder, when there is one, is the test set; without it the run reports no test accuracy.
"""

import dataclasses
import typing
from pathlib import Path

import torch

from ..errors import GCSurgeryError
from .config import RunConfig
from .data import imagenet_folders, load_cifar10, load_fashion_mnist
from .loader import TensorLoader, balanced_subset, split_train_val

__all__ = ["Data", "build_data"]


@dataclasses.dataclass
class Data:
    """The loaders of one dataset and what the model needs to know about it.

    Attributes:
        train: the training loader (shuffled per epoch; ``set_epoch`` on it or on its sampler).
        val: the validation loader, which picks the best epoch.
        test: the test loader, evaluated once at the end; None when the data has no test set.
        input_shape: (C, H, W) of one input.
        num_classes: the number of classes.
        description: one line saying what the splits are and where they came from.
    """

    train: typing.Any
    val: typing.Any
    test: typing.Any
    input_shape: tuple[int, int, int]
    num_classes: int
    description: str


def build_data(cfg: RunConfig, *, rank: int = 0, world_size: int = 1, device=None) -> Data:
    """The train / validation / test loaders; validation and test are sharded over DDP ranks without padding."""
    if cfg.dataset != "fashion_mnist" and cfg.data_dir is None:
        raise GCSurgeryError(f"dataset {cfg.dataset!r} needs --data-dir DIR (only fashion_mnist has a default)")
    if cfg.dataset == "folders":
        return _folder_data(cfg, rank=rank, world_size=world_size)
    if cfg.dataset == "cifar10":
        d = load_cifar10(cfg.data_dir)
    else:
        d = load_fashion_mnist(data_dir=cfg.data_dir, subset=cfg.subset)
    tr, va = split_train_val(len(d.train_labels), val_fraction=cfg.val_fraction, seed=0)
    n = len(d.classes)
    for name, size, idx in (("train_size", cfg.train_size, tr), ("val_size", cfg.val_size, va)):
        if size is not None and not n <= size <= len(idx):
            raise GCSurgeryError(f"--{name.replace('_', '-')} must be in {n}..{len(idx)} for {d.source}, got {size}")
    if cfg.train_size is not None:
        tr = tr[balanced_subset(d.train_labels[tr], per_class=cfg.train_size // n, seed=0)]
    if cfg.val_size is not None:
        va = va[balanced_subset(d.train_labels[va], per_class=cfg.val_size // n, seed=0)]
    te = torch.arange(len(d.test_labels) if cfg.test_size is None else min(cfg.test_size, len(d.test_labels)))
    common = {"pad_to": cfg.image_size or 32, "device": device}
    augment = "crop_flip" if cfg.augment else None
    x, y = d.train_images, d.train_labels
    train = TensorLoader(x[tr], y[tr], batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment,
                         rank=rank, world_size=world_size, **common)  # fmt: skip
    evals = {"batch_size": cfg.eval_batch_size or cfg.batch_size, "mean": train.mean, "std": train.std, **common}
    val = TensorLoader(x[va][rank::world_size], y[va][rank::world_size], **evals)
    test = TensorLoader(d.test_images[te][rank::world_size], d.test_labels[te][rank::world_size], **evals)
    description = (
        f"{d.name} from {d.source}: {len(tr)} train / {len(va)} val (cut from train) / {len(te)} test images, "
        f"{n} classes"
    )
    return Data(train, val, test, tuple(train.images.shape[1:]), n, description)


def _folder_data(cfg: RunConfig, *, rank: int, world_size: int) -> Data:
    from torch.utils.data import DataLoader, DistributedSampler, Subset
    from torchvision.datasets import ImageFolder

    size = cfg.image_size or 224
    train_ds, val_ds = imagenet_folders(cfg.data_dir, image_size=size)
    if not cfg.augment:
        train_ds.transform = val_ds.transform
    test_dir = Path(cfg.data_dir) / "test"
    test_ds = ImageFolder(str(test_dir), transform=val_ds.transform) if test_dir.is_dir() else None
    if test_ds is not None and test_ds.classes != train_ds.classes:
        raise GCSurgeryError(f"{test_dir} has other classes than train/; give it the same class folders")
    sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    kw = {"num_workers": cfg.workers, "pin_memory": torch.cuda.is_available()}
    eval_kw = {"batch_size": cfg.eval_batch_size or cfg.batch_size, **kw}

    def shard(ds):
        return DataLoader(Subset(ds, range(rank, len(ds), world_size)), **eval_kw)

    test_note = f"{len(test_ds)} test images (test/)" if test_ds is not None else "no test set (no test/ folder)"
    return Data(
        DataLoader(train_ds, sampler=sampler, drop_last=True, batch_size=cfg.batch_size, **kw),
        shard(val_ds),
        None if test_ds is None else shard(test_ds),
        (3, size, size),
        len(train_ds.classes),
        f"folders {cfg.data_dir}: {len(train_ds)} train / {len(val_ds)} val (val/) images, {test_note}, "
        f"{len(train_ds.classes)} classes",
    )
