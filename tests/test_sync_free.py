"""GPU-ready, proven on the CPU: no host syncs in a train step, and one graph for torch.compile.

A `TorchDispatchMode` sees every aten op that a step of gcify + GCOptimizer runs (forward, backward, the
base optimizer and GC-W) and records the ones that make a GPU wait for the host or the host for the GPU:
reading a tensor's value (``_local_scalar_dense``, behind ``.item()``, ``float(t)``, ``bool(t)``), ops whose
output size depends on values (``nonzero``, ``masked_select``, boolean indexing, ``unique``...) and value
comparisons that return Python bools (``equal``, ``is_nonzero``). ``benchmarks/gpu_check.py`` runs the
same step under ``torch.cuda.set_sync_debug_mode("error")`` on a CUDA machine.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gcsurgery import GCOptimizer, GCWOptions, cifar_resnet, gcify

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense,
    aten.item,
    aten.nonzero,
    aten.nonzero_static,
    aten.masked_select,
    aten.is_nonzero,
    aten.equal,
    aten.allclose,
    aten.unique_consecutive,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.bincount,
    aten.histc,
    aten.repeat_interleave,
}


class HostSyncs(TorchDispatchMode):
    """Records every op that would synchronise a GPU with the host."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        bool_index = packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )
        if packet in SYNCING and not (packet is aten.repeat_interleave and kwargs.get("output_size") is not None):
            self.calls.append(str(func))
        elif bool_index:
            self.calls.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def test_the_detector_sees_syncs():
    x = torch.randn(5)
    with HostSyncs() as mode:
        x.sum().item()
        bool(x.max() > 0)
        x[x > 0]
        torch.nonzero(x)
        torch.where(x > 0, x, 0)  # no sync
    assert mode.calls == [
        "aten._local_scalar_dense.default",
        "aten._local_scalar_dense.default",
        "aten.index.Tensor with a boolean mask",
        "aten.nonzero.default",
    ]


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)


def _resnet20():
    return cifar_resnet(20), (2, 3, 16, 16)


@pytest.mark.parametrize("build", [_resnet20, _resnet18], ids=["cifar_resnet20", "torchvision_resnet18"])
def test_a_train_step_of_gcify_and_gcoptimizer_never_syncs(build):
    torch.manual_seed(0)
    net, shape = build()
    model = gcify(net, example_inputs=shape)
    opt = GCOptimizer(model, torch.optim.SGD, gcw=GCWOptions(trust=False), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for i in range(3):  # the first step, then steps that train the corrector and apply corrections
        x, y = torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)
        with HostSyncs() as mode:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert mode.calls == [], (i, mode.calls)
    assert max(s["ratio"] for s in opt.gc_stats().values()) > 0  # GC-W did act in the checked steps


def test_compiling_a_gcified_forward_gives_one_graph():
    torch.manual_seed(0)
    model = gcify(cifar_resnet(20), example_inputs=(2, 3, 16, 16))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    model.train()
    out = compiled(x)
    out.sum().backward()
    assert all(p.grad is not None for p in model.gc.parameters())


def test_gpu_check_refuses_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: run benchmarks/gpu_check.py itself")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs a CUDA device" in done.stderr and "Traceback" not in done.stderr
    assert "usage" in subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout
