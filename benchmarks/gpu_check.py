"""GPU check of gcify + GCOptimizer on a CUDA machine: exactness, no host syncs, step time and memory of every arm.

    python benchmarks/gpu_check.py                        # resnet18 and resnet50, 224 px, batch 32
    python benchmarks/gpu_check.py --models resnet18 --rounds 5 --json gpu_check.json

1. Exactness (float32, cuDNN deterministic): ``gcify(model)(x)`` against ``model(x)`` in eval and train mode,
   and GCOptimizer's first step against SGD's (the parameters after one step).
2. Host syncs: three train steps of gcify + GCOptimizer (bf16 autocast, channels_last) under
   ``torch.cuda.set_sync_debug_mode("error")``: any synchronising CUDA call raises.
3. Cost: each arm (``baseline``, ``gcw``, ``gcode``, ``gcgd``, as in `gcsurgery.harness.arms`; SGD lr 0.1, momentum
   0.9, wd 5e-4) on torchvision resnet18 and resnet50 at 224 px, bf16 autocast, channels_last. Peak memory:
   ``torch.cuda.max_memory_allocated`` over a few steps, each arm alone on the device. Step time: CUDA events,
   the arms interleaved in rotating order for ``--rounds`` rounds of ``--steps`` steps; the time ratio is the
   median over rounds of (arm's median step / baseline's median step in that round).

Prints one table; ``--json`` writes the numbers. Without a CUDA device it says so and exits with status 2.
"""

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

ARMS = ("baseline", "gcw", "gcode", "gcgd")
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"], help="torchvision model names")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per arm and round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per arm first")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def build(name: str, arm: str, args, device):
    import torchvision

    from gcsurgery.harness.arms import build_arm, build_optimizer

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000)
    model, sites = build_arm(model, arm, example_inputs=torch.zeros(2, 3, args.size, args.size))
    model = model.to(device, memory_format=torch.channels_last)
    return model, build_optimizer(model, sites=sites, **SGD)


def batch(args, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device, memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (args.batch,), generator=g).to(device)


def train_step(model, opt, x, y, *, autocast=True) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def check_exactness(name: str, args, device) -> dict:
    import torchvision

    from gcsurgery import GCOptimizer, gcify

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    plain = getattr(torchvision.models, name)(num_classes=1000)
    gm = gcify(plain, example_inputs=torch.zeros(2, 3, args.size, args.size)).to(device)
    plain = plain.to(device)
    x, y = batch(args, device, seed=1)
    out = {}
    with torch.no_grad():
        for mode in ("eval", "train"):
            plain.train(mode == "train")
            gm.train(mode == "train")
            a, b = plain(x), gm(x)
            out[f"{mode}_max_abs_diff"] = float((a - b).abs().max())
            out[f"{mode}_bit_equal"] = bool(torch.equal(a, b))
    torch.manual_seed(0)
    m1 = getattr(torchvision.models, name)(num_classes=1000).to(device)
    torch.manual_seed(0)
    m2 = getattr(torchvision.models, name)(num_classes=1000).to(device)
    sites = [s.param for s in gm.gc_plan.gcw_sites]
    o1, o2 = torch.optim.SGD(m1.parameters(), **SGD), GCOptimizer(m2, torch.optim.SGD, sites=sites, **SGD)
    for m, o in ((m1, o1), (m2, o2)):
        train_step(m, o, x, y, autocast=False)
    out["first_step_bit_equal"] = all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    return out


def check_syncs(name: str, args, device) -> str:
    model, opt = build(name, "gcgd", args, device)
    x, y = batch(args, device)
    train_step(model, opt, x, y)  # lazily built state (first step) is set up outside the checked steps
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_step(model, opt, x, y)
    except RuntimeError as e:
        return f"SYNC: {e}".splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return "none"


def peak_memory(name: str, arm: str, args, device) -> int:
    torch.cuda.empty_cache()
    model, opt = build(name, arm, args, device)
    x, y = batch(args, device)
    for _ in range(2):
        train_step(model, opt, x, y)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):
        train_step(model, opt, x, y)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, opt
    torch.cuda.empty_cache()
    return peak


def step_times(name: str, args, device) -> dict[str, list[list[float]]]:
    arms = {arm: build(name, arm, args, device) for arm in ARMS}
    x, y = batch(args, device)
    for arm in ARMS:
        for _ in range(args.warmup):
            train_step(*arms[arm], x, y)
    times = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
            ts = []
            for _ in range(args.steps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                train_step(*arms[arm], x, y)
                end.record()
                end.synchronize()
                ts.append(start.elapsed_time(end))
            times[arm].append(ts)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "error: benchmarks/gpu_check.py needs a CUDA device and this machine has none "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine.",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    results = []
    for name in args.models:
        print(f"{name}: exactness, syncs, memory, timing", flush=True)
        exact = check_exactness(name, args, device)
        syncs = check_syncs(name, args, device)
        peaks = {arm: peak_memory(name, arm, args, device) for arm in ARMS}
        times = step_times(name, args, device)
        base_round = [statistics.median(ts) for ts in times["baseline"]]
        arms = {}
        for arm in ARMS:
            per_round = [statistics.median(ts) for ts in times[arm]]
            arms[arm] = {
                "step_ms": statistics.median([t for ts in times[arm] for t in ts]),
                "time_ratio": statistics.median([a / b for a, b in zip(per_round, base_round, strict=True)]),
                "peak_mb": peaks[arm] / 2**20,
                "peak_ratio": peaks[arm] / peaks["baseline"],
            }
        results.append({"model": name, "exactness": exact, "syncs": syncs, "arms": arms})
    head = f"{'model':10} {'arm':9} {'step ms':>8} {'time ratio':>10} {'peak MB':>9} {'mem ratio':>9}"
    print(f"\n{head}\n{'-' * len(head)}")
    for res in results:
        label = res["model"]
        for arm, r in res["arms"].items():
            print(
                f"{label:10} {arm:9} {r['step_ms']:8.1f} {r['time_ratio']:10.3f} {r['peak_mb']:9.0f} "
                f"{r['peak_ratio']:9.3f}"
            )
            label = ""
    for res in results:
        print(f"{res['model']}: exactness {res['exactness']}; host syncs in a gcgd step: {res['syncs']}")
    print(
        f"\n{torch.cuda.get_device_name(device)}, torch {torch.__version__}, batch {args.batch}, {args.size} px, "
        f"bf16 autocast, channels_last, {args.rounds} rounds x {args.steps} steps"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "device": torch.cuda.get_device_name(device), "results": results}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
