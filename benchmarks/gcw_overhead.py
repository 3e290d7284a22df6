"""Train-step time of GC-W vs its base optimizer, measured interleaved in one run.

    python benchmarks/gcw_overhead.py [--steps 40] [--threads 1] [--json out.json]

CIFAR ResNet-20, batch 128, 32×32, SGD(lr 0.1, momentum 0.9, wd 5e-4); GC-W on the three stage-end
convs. Each round times one plain step and one GC-W step (order alternating); prints the median
ratio of the per-round times and the median of each arm.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from gcsurgery.harness.models import cifar_resnet
from gcsurgery.optim import GCOptimizer

SITES = ["layer1.2.conv2.weight", "layer2.2.conv2.weight", "layer3.2.conv2.weight"]


def make_step(gcw: bool):
    torch.manual_seed(0)
    model = cifar_resnet(20)
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, **kw) if gcw else torch.optim.SGD(model.parameters(), **kw)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arms = {"plain": make_step(False), "gcw": make_step(True)}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    times = {k: [] for k in arms}
    for i in range(args.warmup + args.steps):
        order = ["plain", "gcw"] if i % 2 == 0 else ["gcw", "plain"]
        for k in order:
            t0 = time.perf_counter()
            arms[k](x, y)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[k].append(dt)
    ratios = [a / b for a, b in zip(times["gcw"], times["plain"], strict=True)]
    out = {
        "plain_ms": 1e3 * statistics.median(times["plain"]),
        "gcw_ms": 1e3 * statistics.median(times["gcw"]),
        "median_ratio": statistics.median(ratios),
        "steps": args.steps,
        "threads": args.threads,
        "batch": args.batch,
    }
    print(
        f"plain {out['plain_ms']:.1f} ms  gcw {out['gcw_ms']:.1f} ms  "
        f"median ratio {out['median_ratio']:.4f} ({args.steps} interleaved steps, {args.threads} thread(s))"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
