import io

import pytest
import torch
from conftest import TinyResNet

import gcsurgery as gcs
from gcsurgery.checkpoint import checkpoint, restore


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_save_restore_continue_is_bit_identical():
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    straight = gcs.gcify(TinyResNet(), example_inputs=x)
    opt = torch.optim.SGD(straight.parameters(), lr=0.1, momentum=0.9)
    _steps(straight, opt, 2, seed=1)
    buf = io.BytesIO()
    torch.save(checkpoint(straight, opt, epoch=1), buf)
    _steps(straight, opt, 2, seed=2)

    torch.manual_seed(123)  # a fresh model with other initial weights
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    resumed = restore(TinyResNet(), ckpt)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    assert ckpt["epoch"] == 1 and resumed.gc_plan == straight.gc_plan
    _steps(resumed, opt2, 2, seed=2)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_errors(tiny_resnet):
    with pytest.raises(gcs.GCSurgeryError, match="needs a module returned by gcsurgery.gcify"):
        checkpoint(tiny_resnet)
    with pytest.raises(gcs.GCSurgeryError, match="not a gcsurgery checkpoint"):
        restore(tiny_resnet, {"model": {}})
    gm = gcs.gcify(tiny_resnet, example_inputs=(2, 3, 32, 32))
    with pytest.raises(gcs.GCSurgeryError, match="reserved"):
        checkpoint(gm, model=1)
