"""``gcsurgery demo``: the baseline and GCGD side by side on Fashion-MNIST, offline, on a CPU, with an honest verdict.

Both arms start from the same weights of a CIFAR-style ResNet with one input channel, see the same
batches in the same order and follow the same SGD + cosine schedule; they train in turns, one epoch
each (the order alternating), so the table grows epoch by epoch. Model selection figures use a
validation split cut from the training images; the test set is evaluated once, at the best epoch.

One seed cannot tell a gain from noise, so the verdict compares the paired difference with the spread
that the benchmark measured over five seeds (``docs/results/tta-fashion-mnist-10k/five-seeds/``) and with
the sampling noise of the demo's small validation set, and says "within noise" when it is. Step-time
ratios are per-process CPU time, which other jobs on a shared machine do not inflate as they do wall time.

The default (ResNet-20 on the embedded subset: 5400 training and 600 validation images at 28x28,
batch 128, 5 epochs per arm, no augmentation) takes about five minutes on two CPU cores.
"""

import argparse
import json
import math
import sys
import time
from importlib import resources
from pathlib import Path

from ..errors import GCSurgeryError

__all__ = ["add_arguments", "noise_sd", "reference", "run", "verdict_lines"]

ARMS = ("baseline", "gcgd")
LABELS = {"baseline": "baseline", "gcgd": "GCGD"}
QUICK = {"train_size": 60, "val_size": 30, "test_size": 32, "batch_size": 16, "limit_batches": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the demo's options to ``parser``."""
    parser.add_argument("--epochs", type=int, default=None, help="epochs per arm (default 5; 2 with --quick)")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth: 20, 32, 44, 56 or 110")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (momentum 0.9, cosine decay)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--train-size", type=int, default=None, help="a class-balanced subset of the training images")
    parser.add_argument("--augment", action="store_true", help="random crops and flips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="a directory with the Fashion-MNIST IDX files")
    parser.add_argument(
        "--full", action="store_true", help="the full 60000/10000 images (data-dir or Debian package), not the subset"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run (a few batches) to check that it works")
    parser.add_argument("--out", default="gcsurgery-demo", help="directory for demo.png and demo.json")


def reference() -> dict:
    """The benchmark's measured GCGD-vs-SGD paired differences (five seeds), shipped with the package."""
    with resources.as_file(resources.files("gcsurgery") / "assets" / "demo_reference.json") as path:
        return json.loads(Path(path).read_text())


def noise_sd(*, seed_sd: float, acc: float, n_val: int) -> float:
    """The standard deviation of one paired difference of final val accuracies, as fractions.

    The larger of the seed-to-seed spread measured by the benchmark (``seed_sd``) and the sampling noise of
    the difference of two accuracies near ``acc`` on ``n_val`` images (``sqrt(2 p (1 - p) / n)``, an upper
    bound: the pairing makes the two arms' errors correlated).
    """
    return max(seed_sd, math.sqrt(2 * acc * (1 - acc) / max(n_val, 1)))


def verdict_lines(*, base: float, gcgd: float, n_val: int, ref: dict) -> list[str]:
    """The demo's last lines: the paired difference, its noise, the verdict and where the real measurement is."""
    from .report import paired_verdict

    seed_sd = ref["final_val_diff"]["std"]
    sd = noise_sd(seed_sd=seed_sd, acc=(base + gcgd) / 2, n_val=n_val)
    v = paired_verdict([gcgd - base], seed_sd=sd)
    verdict = {"within noise": "within noise", "ahead": "GCGD ahead", "behind": "GCGD behind"}[v["verdict"]]
    bench = ref["final_val_diff"]
    sampling = math.sqrt(2 * ((base + gcgd) / 2) * (1 - (base + gcgd) / 2) / max(n_val, 1))
    return [
        f"final val acc: baseline {100 * base:.2f}%, GCGD {100 * gcgd:.2f}% ({100 * (gcgd - base):+.2f} points; "
        f"one seed, {n_val} validation images)",
        f"noise of one paired difference: ±{100 * v['half_width']:.2f} points (2 sd; sd {100 * sd:.2f} = the larger "
        f"of the seed spread the benchmark measured, {100 * seed_sd:.2f}, and the sampling noise of {n_val} images, "
        f"{100 * sampling:.2f})",
        f"verdict: {verdict}. Measured with {len(ref['seeds'])} paired seeds ({ref['train_size']} training / "
        f"{ref['val_size']} validation images, {ref['epochs']} epochs), GCGD vs SGD is "
        f"{100 * bench['mean']:+.2f} ± {100 * bench['std']:.2f} val points: within noise, not a gain "
        f"({ref['source']}; README, 'Does it pay?').",
    ]


def _config(args, arm: str, epochs: int):
    from .config import RunConfig

    quick = QUICK if args.quick else {}
    full = args.data_dir is not None or args.full
    return RunConfig(
        model=f"cifar_resnet{args.depth}",
        dataset="fashion_mnist",
        data_dir=args.data_dir,
        subset=("full" if args.full else None) if full else "embedded",
        image_size=28,  # no padding: the 28x28 images as they are
        train_size=quick.get("train_size", args.train_size),
        val_size=quick.get("val_size"),
        test_size=quick.get("test_size"),
        epochs=epochs,
        batch_size=quick.get("batch_size", args.batch_size),
        eval_batch_size=256,
        lr=args.lr,
        weight_decay=args.weight_decay,
        augment=args.augment,
        arm=arm,
        seed=args.seed,
        limit_train_batches=quick.get("limit_batches"),
        device="cpu",
        quiet=True,
    )


def run(args: argparse.Namespace) -> int:
    """Runs the demo; returns the exit status."""
    from .datasets import build_data
    from .run import Run

    start = time.perf_counter()
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 5)
    if epochs < 1:
        raise GCSurgeryError(f"--epochs must be at least 1, got {epochs}")
    cfgs = {arm: _config(args, arm, epochs) for arm in ARMS}
    data = build_data(cfgs["baseline"])
    runs = {arm: Run(cfg, data) for arm, cfg in cfgs.items()}
    base_cfg, gcgd = cfgs["baseline"], runs["gcgd"]
    n_train = runs["baseline"].steps_per_epoch * base_cfg.batch_size if args.quick else len(data.train.labels)
    print(
        f"{data.description}\ntraining on {min(n_train, len(data.train.labels))} images, validating on "
        f"{len(data.val.labels)}; {base_cfg.model} (1 input channel), SGD lr {args.lr} momentum 0.9, cosine over "
        f"{epochs} epochs, batch {base_cfg.batch_size}"
    )
    print(f"GCGD: {len(gcgd.model.gc_plan.ode_pairs)} GC-ODE branches, GC-W on {list(gcgd.sites)}\n")
    header = "epoch | val acc baseline | val acc GCGD | CPU time per step GCGD/baseline"
    print(f"{header}\n{'-' * len(header)}", flush=True)
    ratios = []
    for epoch in range(epochs):
        order = ARMS if epoch % 2 == 0 else ARMS[::-1]  # alternate, so load drift hits both arms alike
        rows = {arm: runs[arm].train_epoch(progress=sys.stderr.isatty()) for arm in order}
        ratios.append(rows["gcgd"]["cpu_step_time"] / rows["baseline"]["cpu_step_time"])
        b, g = rows["baseline"]["val_acc"], rows["gcgd"]["val_acc"]
        print(f"{epoch + 1:5d} | {100 * b:15.2f}% | {100 * g:11.2f}% | {ratios[-1]:30.2f}x", flush=True)
    return _report(args, runs, ratios, n_val=len(data.val.labels), start=start)


def _report(args, runs: dict, ratios: list[float], *, n_val: int, start: float) -> int:
    from statistics import median

    from .report import plot_curves

    summaries = {arm: r.finish() for arm, r in runs.items()}  # the test set once, at each arm's best epoch
    finals = {arm: s["final_val_acc"] for arm, s in summaries.items()}
    ref = reference()
    lines = verdict_lines(base=finals["baseline"], gcgd=finals["gcgd"], n_val=n_val, ref=ref)
    print("\n" + "\n".join(lines))
    print(
        f"step time GCGD/baseline: {median(ratios):.2f}x (median over the epochs of per-process CPU time per step; "
        f"the benchmark measured {ref['step_time_ratio']['median']:.2f}x)"
    )
    tests = {arm: s["test_acc"] for arm, s in summaries.items()}
    print(f"test acc at the best val epoch: baseline {100 * tests['baseline']:.2f}%, GCGD {100 * tests['gcgd']:.2f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sd = noise_sd(seed_sd=ref["final_val_diff"]["std"], acc=finals["baseline"], n_val=n_val)
    curves = {f"{LABELS[arm]}": [r["val_acc"] for r in runs[arm].history] for arm in ARMS}
    bands = {"baseline": [2 * sd] * len(curves["baseline"])}
    model = runs["baseline"].cfg.model
    title = f"Fashion-MNIST, {model}, one seed\nband: baseline ± noise of a paired difference (2 sd)"
    plot_curves(curves, out / "demo.png", title=title, bands=bands)
    result = {
        "history": {arm: r.history for arm, r in runs.items()},
        "test_acc": tests,
        "final_val_acc": finals,
        "verdict": lines,
        "noise_sd": sd,
        "cpu_step_time_ratio": {"per_epoch": ratios, "median": median(ratios)},
        "reference": ref,
        "args": vars(args),
        "wall_time": time.perf_counter() - start,
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out / 'demo.png'} and {out / 'demo.json'}; total wall time {result['wall_time']:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gcsurgery demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
