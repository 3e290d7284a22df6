"""FSDP2 (``fully_shard``) under torchrun, 2 ranks, gloo on CPU: a gcified ResNet-20 trains its GC-ODE branches
sharded, matching a single-process run, and GCOptimizer refuses sharded GC-W sites with a clear error.

A gcified model is a torch.fx GraphModule whose graph calls the leaf modules (convs, norms) directly, never a
stage's own ``forward``; FSDP2 unshards a group's parameters in a pre-forward hook, so a stage is sharded as
one group of its leaf modules, ``fully_shard([leaves of layer1])`` (and the root as usual), as `shard` does
below. Run by pytest, this file launches itself under ``torchrun --nproc_per_node 2``; each rank runs `main`.
"""

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

from gcsurgery import GCOptimizer, GCSurgeryError, cifar_resnet, gcify

STEPS, BATCH = 3, 8  # each rank sees half of each batch


def shard(model: nn.Module, fully_shard) -> None:
    """FSDP2 per stage (each stage's leaf modules as one group) and on the root."""
    for name in ("layer1", "layer2", "layer3"):
        stage = getattr(model, name)
        fully_shard([m for m in stage.modules() if next(m.parameters(recurse=False), None) is not None])
    fully_shard(model)


def build() -> nn.Module:
    torch.manual_seed(0)
    model = gcify(cifar_resnet(20), example_inputs=(1, 3, 16, 16))
    with torch.no_grad():
        for n, p in model.gc.named_parameters():
            if n.endswith("gate"):
                p.fill_(0.1)  # open the gates so the branches change the function from the first step
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # the running statistics of one calibration batch, then fixed: batch statistics
    with torch.no_grad():  # would differ between one process and two half batches
        model(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    for m in bns:
        m.eval()
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(STEPS)
    ]


def train(model, opt, batches, rank=0, world=1):
    losses = []
    for x, y in batches:
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[part]), y[part])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    shard(model, fully_shard)
    try:
        GCOptimizer(model, torch.optim.SGD, lr=0.1)
        refused = ""
    except GCSurgeryError as e:
        refused = str(e)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # the gcode arm: GC-ODE trains
    losses = train(model, opt, data(), rank, world)
    full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    torch.save(full, os.path.join(out_dir, f"params{rank}.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "refused": refused}, f)
    dist.destroy_process_group()


def test_fsdp2_trains_gcode_and_refuses_sharded_gcw(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trained on its own half of the batch ...
    sharded = [torch.load(tmp_path / f"params{r}.pt") for r in (0, 1)]
    for n in sharded[0]:
        assert torch.equal(sharded[0][n], sharded[1][n]), n  # ... and the ranks agree
    for r in ranks:
        assert "sharded (DTensor parameters" in r["refused"] and "layer1.2.conv2.weight" in r["refused"]

    single = build()  # one process on the whole batch: the same training, to float tolerance
    start = {n: p.detach().clone() for n, p in single.named_parameters()}
    train(single, torch.optim.SGD(single.parameters(), lr=0.01, momentum=0.9), data())
    ref = dict(single.named_parameters())
    for n, p in sharded[0].items():
        torch.testing.assert_close(p, ref[n].detach(), rtol=1e-4, atol=1e-5, msg=n)
    moved = [n for n, p in sharded[0].items() if n.startswith("gc.") and not torch.equal(p, start[n])]
    assert moved  # the GC-ODE branches trained


if __name__ == "__main__":
    main(sys.argv[1])
