"""In-memory batches: class-balanced subsets, train/validation splits, and `TensorLoader`.

:class:`TensorLoader` keeps a whole dataset as one uint8 tensor and yields normalised float
batches, shuffled by a seeded generator per epoch (the same seed gives every arm of a benchmark
the same data order), with optional crop/flip augmentation on whole batches and DDP sharding.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import GCSurgeryError

AUGMENTATIONS = ("crop_flip", "crop", "flip")


def balanced_subset(labels: torch.Tensor, *, per_class: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``per_class`` examples of every class, chosen at random with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class:
            raise GCSurgeryError(f"class {c} has {len(idx)} examples, fewer than per_class={per_class}")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks).sort().values


def split_train_val(n: int, *, val_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits ``range(n)`` into disjoint sorted train and validation indices, the same for the same seed.

    The validation part is cut from the training set so that model selection never sees the test set.
    """
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise GCSurgeryError(
            f"val_fraction={val_fraction} of n={n} leaves {n_val} validation and {n - n_val} training examples; "
            "both must be at least 1"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, stream...), stable across runs and platforms."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W) scaled to [0, 1], from histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255
    hist = torch.stack([torch.bincount(images[:, c].flatten(), minlength=256) for c in range(images.shape[1])])
    p = hist.double() / hist.sum(dim=1, keepdim=True)  # (C, 256)
    mean = p @ values
    std = (p @ values**2 - mean**2).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def random_crop_flip(
    x: torch.Tensor, *, generator: torch.Generator, padding: int = 4, crop: bool = True, flip: bool = True
) -> torch.Tensor:
    """Random crops (zero padding on each side) and horizontal flips, one draw per image, on a whole batch.

    Both are one ``gather`` over the padded batch, so they cost about as much as a copy.

    Args:
        x: (B, C, H, W) batch, any dtype; padding adds zeros, so pass raw uint8 images for black borders.
        generator: a CPU generator that draws the offsets and flips.
        padding: the largest shift in pixels.
        crop: apply random crops.
        flip: flip half of the images left-right.
    """
    B, C, H, W = x.shape
    p = padding if crop else 0
    Hp, Wp = H + 2 * p, W + 2 * p
    oy, ox = torch.randint(0, 2 * p + 1, (2, B, 1, 1), generator=generator)  # (B, 1, 1) each
    cols = torch.arange(W).expand(B, 1, W)  # (B, 1, W)
    if flip:
        flipped = torch.rand(B, generator=generator) < 0.5
        cols = torch.where(flipped[:, None, None], W - 1 - cols, cols)
    flat = (oy + torch.arange(H)[:, None]) * Wp + ox + cols  # (B, H, W) indices into the padded image
    flat = flat.to(x.device).reshape(B, 1, H * W).expand(B, C, H * W)
    xp = F.pad(x, (p,) * 4) if p else x  # (B, C, Hp, Wp)
    return xp.reshape(B, C, Hp * Wp).gather(2, flat).reshape(B, C, H, W)


class TensorLoader:
    """Batches from in-memory uint8 images: normalised float (B, C, H, W) and int64 labels (B,).

    Each epoch draws its order from a generator seeded by ``(seed, epoch)``, so every run with the
    same seed sees the same batches. The epoch advances with each iteration; ``set_epoch`` sets it.
    With ``world_size > 1`` each rank gets its own slice of the epoch's permutation (padded by
    wrapping round, as ``DistributedSampler`` does), and ``batch_size`` is per rank.

    Args:
        images: uint8 (N, H, W) or (N, C, H, W).
        labels: (N,) integer labels.
        batch_size: images per batch (per rank).
        shuffle: a new random order each epoch; else the stored order.
        seed: the seed of the order and of the augmentation.
        augment: None or one of ``"crop_flip"``, ``"crop"``, ``"flip"`` (crops shift by up to ``crop_padding``).
        crop_padding: the largest crop shift in pixels.
        pad_to: pad images with zeros (centred) up to this size, e.g. 28 -> 32; larger images are left alone.
        mean: per-channel mean of the pixels scaled to [0, 1]; None computes it from ``images``.
        std: per-channel standard deviation, likewise.
        drop_last: drop the last batch if it is short.
        rank: this process's rank.
        world_size: the number of processes sharing the data.
        device: where to keep the data and yield batches; None keeps them on the CPU.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        augment: str | None = None,
        crop_padding: int = 4,
        pad_to: int | None = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() not in (3, 4):
            raise GCSurgeryError(
                f"TensorLoader takes uint8 images of shape (N, H, W) or (N, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}; convert with (x * 255).round().to(torch.uint8)"
            )
        if len(labels) != len(images):
            raise GCSurgeryError(f"{len(images)} images but {len(labels)} labels")
        if augment not in (None, *AUGMENTATIONS):
            raise GCSurgeryError(f"unknown augment {augment!r}; choose None or one of {list(AUGMENTATIONS)}")
        if batch_size < 1:
            raise GCSurgeryError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise GCSurgeryError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
        images = images[:, None] if images.dim() == 3 else images  # (N, C, H, W)
        C, H, W = images.shape[1:]
        stats = channel_stats(images) if mean is None or std is None else None
        self.mean = tuple(float(m) for m in (mean if mean is not None else stats[0]))
        self.std = tuple(float(s) for s in (std if std is not None else stats[1]))
        if len(self.mean) != C or len(self.std) != C or min(self.std) <= 0:
            raise GCSurgeryError(
                f"mean {self.mean} and std {self.std} need {C} entries each and std > 0 (a constant channel has "
                "std 0: pass mean= and std=)"
            )
        if pad_to is not None and (pad_to > H or pad_to > W):
            top, left = max(pad_to - H, 0) // 2, max(pad_to - W, 0) // 2
            images = F.pad(images, (left, max(pad_to - W, 0) - left, top, max(pad_to - H, 0) - top))
        self.images = images.to(device).contiguous()
        self.labels = labels.to(device=self.images.device, dtype=torch.long)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.augment, self.crop_padding, self.rank, self.world_size = augment, crop_padding, rank, world_size
        self.epoch = 0
        std_t = torch.tensor(self.std, dtype=torch.float32, device=self.images.device)[None, :, None, None]
        self._scale = 1.0 / (255.0 * std_t)  # (1, C, 1, 1)
        self._shift = -torch.tensor(self.mean, device=self.images.device)[None, :, None, None] / std_t

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def _per_rank(self) -> int:
        return math.ceil(len(self.labels) / self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """The example indices this rank sees in ``epoch``, in order."""
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
        else:
            order = torch.arange(n)
        total = self._per_rank() * self.world_size
        order = torch.cat([order, order[: total - n]]) if total > n else order
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = self.indices(epoch).to(self.images.device)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1 + self.rank))
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images.index_select(0, idx)  # (B, C, H, W) uint8
            if self.augment is not None:
                crop, flip = self.augment in ("crop_flip", "crop"), self.augment in ("crop_flip", "flip")
                x = random_crop_flip(x, generator=g, padding=self.crop_padding, crop=crop, flip=flip)
            yield x.float().mul_(self._scale).add_(self._shift), self.labels.index_select(0, idx)
