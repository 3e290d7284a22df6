"""Subsets, splits and `TensorLoader`: order, augmentation, sharding, normalisation and bad input."""

import pytest
import torch

from gcsurgery.errors import GCSurgeryError
from gcsurgery.harness.loader import TensorLoader, balanced_subset, channel_stats, random_crop_flip, split_train_val


def test_split_train_val():
    tr, va = split_train_val(1000, val_fraction=0.2, seed=3)
    assert len(tr) == 800 and len(va) == 200
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(1000))
    tr2, va2 = split_train_val(1000, val_fraction=0.2, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, split_train_val(1000, val_fraction=0.2, seed=4)[1])
    with pytest.raises(GCSurgeryError, match="at least 1"):
        split_train_val(5, val_fraction=0.01)


def test_balanced_subset():
    labels = torch.arange(100) % 4
    keep = balanced_subset(labels, per_class=5, seed=1)
    assert labels[keep].bincount().tolist() == [5] * 4 and torch.equal(keep, keep.sort().values)
    assert torch.equal(keep, balanced_subset(labels, per_class=5, seed=1))
    with pytest.raises(GCSurgeryError, match="fewer than per_class=30"):
        balanced_subset(labels, per_class=30)


def toy(n=50, c=None):
    g = torch.Generator().manual_seed(0)
    shape = (n, 28, 28) if c is None else (n, c, 28, 28)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g), torch.arange(n) % 10


def labels_of(loader):
    return torch.cat([y for _, y in loader])


def test_loader_batches_and_normalisation():
    images, labels = toy()
    loader = TensorLoader(images, labels, batch_size=16)
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(labels_of(loader), labels)  # no shuffle: stored order
    inner = torch.cat([x for x, _ in batches])[:, :, 2:30, 2:30]  # 28 -> 32 pads 2 pixels each side
    assert abs(inner.mean()) < 1e-4 and abs(inner.std() - 1) < 1e-3  # stats of these images by default
    assert torch.allclose(batches[0][0][:, :, 0, 0], torch.tensor(-loader.mean[0] / loader.std[0]))
    assert len(TensorLoader(images, labels, batch_size=16, drop_last=True)) == 3
    assert next(iter(TensorLoader(images, labels, batch_size=4, pad_to=None)))[0].shape == (4, 1, 28, 28)


def test_loader_same_seed_same_order_epochs_differ():
    images, labels = toy()
    a = TensorLoader(images, labels, batch_size=8, shuffle=True, seed=7, augment="crop_flip")
    b = TensorLoader(images, labels, batch_size=8, shuffle=True, seed=7, augment="crop_flip")
    a0, a1 = [torch.cat([x for x, _ in a]) for _ in range(2)]
    b0 = torch.cat([x for x, _ in b])
    assert torch.equal(a0, b0)  # same seed: same order and same augmentation
    assert not torch.equal(a0, a1)
    a.set_epoch(1)
    assert torch.equal(torch.cat([x for x, _ in a]), a1)
    plain = TensorLoader(images, labels, batch_size=8, shuffle=True, seed=7)
    assert torch.equal(plain.indices(0), a.indices(0))  # augmentation does not change the data order
    assert sorted(plain.indices(0).tolist()) == list(range(50))
    assert not torch.equal(plain.indices(0), TensorLoader(images, labels, batch_size=8, shuffle=True).indices(0))


@pytest.mark.parametrize("world_size", [2, 3])
def test_loader_shards_are_disjoint(world_size):
    images, labels = toy(n=48)
    shards = [
        TensorLoader(images, labels, batch_size=5, shuffle=True, seed=1, rank=r, world_size=world_size).indices(2)
        for r in range(world_size)
    ]
    assert len({len(s) for s in shards}) == 1
    seen = torch.cat(shards).tolist()
    assert sorted(seen) == list(range(48))  # 48 splits evenly: every example exactly once
    odd = [TensorLoader(images[:47], labels[:47], batch_size=5, rank=r, world_size=2).indices(0) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 24 and set(torch.cat(odd).tolist()) == set(range(47))
    with pytest.raises(GCSurgeryError, match="rank must be in"):
        TensorLoader(images, labels, batch_size=5, rank=2, world_size=2)


@pytest.mark.parametrize("augment", ["crop_flip", "crop", "flip"])
def test_augmentation_shapes(augment):
    images, labels = toy(n=64, c=3)
    loader = TensorLoader(images, labels, batch_size=32, augment=augment, mean=(0.5,) * 3, std=(0.25,) * 3)
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 32, 32) and torch.isfinite(x).all()
    plain = next(iter(TensorLoader(images, labels, batch_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)))[0]
    assert not torch.equal(x, plain)


def test_random_crop_flip_moves_pixels_as_expected():
    x = torch.arange(6 * 2 * 4 * 4, dtype=torch.uint8).reshape(6, 2, 4, 4)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    g = torch.Generator().manual_seed(0)
    for crop, flip in ((False, True), (True, False), (True, True)):
        out = random_crop_flip(x, generator=g, padding=1, crop=crop, flip=flip)
        for i in range(6):  # each image is shifted by at most one pixel, zeros coming in, maybe mirrored
            shifts = [padded[i, :, dy : dy + 4, dx : dx + 4] for dy in range(3) for dx in range(3)] if crop else [x[i]]
            allowed = shifts + [s.flip(-1) for s in shifts] if flip else shifts
            assert any(torch.equal(out[i], s) for s in allowed)
        assert not torch.equal(out, x)


def test_channel_stats():
    images = torch.randint(0, 256, (10, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(images)
    scaled = images.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), scaled.mean(dim=(0, 2, 3)))
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), scaled.std(dim=(0, 2, 3), correction=0))


def test_loader_rejects_bad_input():
    images, labels = toy()
    with pytest.raises(GCSurgeryError, match="uint8"):
        TensorLoader(images.float(), labels, batch_size=4)
    with pytest.raises(GCSurgeryError, match=r"choose None or one of \['crop_flip', 'crop', 'flip'\]"):
        TensorLoader(images, labels, batch_size=4, augment="mixup")
    with pytest.raises(GCSurgeryError, match="need 1 entries"):
        TensorLoader(images, labels, batch_size=4, mean=(0.1, 0.2), std=(1.0, 1.0))
    with pytest.raises(GCSurgeryError, match="constant channel has std 0: pass mean= and std="):
        TensorLoader(torch.zeros_like(images), labels, batch_size=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_loader_on_gpu_matches_cpu():
    images, labels = toy(n=40, c=3)
    kwargs = dict(batch_size=16, shuffle=True, seed=2, augment="crop_flip")
    cpu, gpu = TensorLoader(images, labels, **kwargs), TensorLoader(images, labels, device="cuda", **kwargs)
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and yg.is_cuda
        assert torch.allclose(xc, xg.cpu()) and torch.equal(yc, yg.cpu())
