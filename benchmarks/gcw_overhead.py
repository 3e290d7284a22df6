"""Train-step time of GC-W vs its base optimizer, measured interleaved in one run.

    python benchmarks/gcw_overhead.py [--steps 40] [--threads 1] [--json out.json]
    python benchmarks/gcw_overhead.py --imagenet resnet18 resnet50     # CPU time of GC-W's part of a step

CIFAR ResNet-20, batch 128, 32×32, SGD(lr 0.1, momentum 0.9, wd 5e-4); GC-W on the three stage-end
convs. Each round times one plain step and one GC-W step (order alternating); prints the median
ratio of the per-round times and the median of each arm.

``--imagenet``: torchvision models at batch 32, 224 px, GC-W on the plan's sites. A step there takes
seconds, too long to time end to end on a shared machine, so this measures CPU time (``process_time``,
one thread: insensitive to other jobs) of one forward+backward and, interleaved over 12 rounds, of
``opt.step()`` with SGD and with GC-W on the same gradients; GC-W's cost is the difference, as a share
of the train step.
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


def imagenet_step_cost(name: str, rounds: int = 12) -> dict:
    import torchvision

    from gcsurgery.plans import plan

    torch.manual_seed(0)
    m = getattr(torchvision.models, name)()
    sites = [s.param for s in plan(m, torch.zeros(2, 3, 64, 64)).gcw_sites]
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    sgd, gc = torch.optim.SGD(m.parameters(), **kw), GCOptimizer(m, torch.optim.SGD, sites=sites, **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 224, 224, generator=g), torch.randint(0, 1000, (32,), generator=g)
    c0 = time.process_time()
    F.cross_entropy(m(x), y).backward()
    fwd_bwd = time.process_time() - c0
    grads = [p.grad.clone() for p in m.parameters()]

    def one(opt) -> float:
        for p, gr in zip(m.parameters(), grads, strict=True):
            p.grad = gr.clone()
        c = time.process_time()
        opt.step()
        return time.process_time() - c

    for opt in (sgd, gc, sgd, gc):  # warm-up (GC-W's first steps build its caches)
        one(opt)
    ts = {"sgd": [], "gcw": []}
    for i in range(rounds):
        for k in ("sgd", "gcw") if i % 2 == 0 else ("gcw", "sgd"):
            ts[k].append(one(sgd if k == "sgd" else gc))
    med = {k: statistics.median(v) for k, v in ts.items()}
    params = dict(m.named_parameters())
    return {
        "model": name,
        "sites": sites,
        "site_weights": sum(params[s].numel() for s in sites),
        "fwd_bwd_cpu_s": fwd_bwd,
        "sgd_step_cpu_ms": 1e3 * med["sgd"],
        "gcw_step_cpu_ms": 1e3 * med["gcw"],
        "share_of_train_step": (med["gcw"] - med["sgd"]) / (fwd_bwd + med["sgd"]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--imagenet", nargs="+", default=None, metavar="MODEL", help="torchvision models, see above")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.imagenet:
        rows = [imagenet_step_cost(name) for name in args.imagenet]
        for r in rows:
            print(
                f"{r['model']}: {len(r['sites'])} sites, {r['site_weights']} weights; fwd+bwd CPU "
                f"{r['fwd_bwd_cpu_s']:.2f} s; opt.step CPU (median of 12): SGD {r['sgd_step_cpu_ms']:.0f} ms, "
                f"GC-W {r['gcw_step_cpu_ms']:.0f} ms; GC-W adds {r['share_of_train_step']:.2%} to a train step"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return
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
