"""``gcsurgery demo``: the baseline and GCGD side by side on Fashion-MNIST, offline, on a CPU.

Both arms start from the same weights of a CIFAR-style ResNet with one input channel, see the same
batches in the same order and follow the same SGD + cosine schedule; they train in turns, one epoch
each, so the table grows epoch by epoch. Model selection figures use a validation split cut from the
training images; the test set is evaluated once, after the last epoch.

The default (ResNet-20 on the embedded subset: 5400 training and 600 validation images at 28x28,
batch 128, 5 epochs per arm, no augmentation) takes about five minutes on two CPU cores.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from .data import load_fashion_mnist
from .errors import GCSurgeryError
from .loader import TensorLoader, split_train_val
from .models import cifar_resnet
from .training import build_arm, build_optimizer, cosine_schedule, evaluate, plot_val_acc, seed_epoch, train_one_epoch

__all__ = ["add_arguments", "run"]

ARMS = ("baseline", "gcgd")
LABELS = {"baseline": "baseline", "gcgd": "GCGD"}
QUICK = {"train_size": 64, "val_size": 32, "test_size": 32, "batch_size": 16, "limit_batches": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the demo's options to ``parser``."""
    parser.add_argument("--epochs", type=int, default=None, help="epochs per arm (default 5; 2 with --quick)")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth: 20, 32, 44, 56 or 110")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (momentum 0.9, cosine decay)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--train-size", type=int, default=None, help="use this many training images (default all)")
    parser.add_argument("--augment", action="store_true", help="random crops and flips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="a directory with the Fashion-MNIST IDX files")
    parser.add_argument(
        "--full", action="store_true", help="the full 60000/10000 images (data-dir or Debian package), not the subset"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run (a few batches) to check that it works")
    parser.add_argument("--out", default="gcsurgery-demo", help="directory for demo.png and demo.json")


def _data(args):
    if args.data_dir is not None or args.full:
        data = load_fashion_mnist(data_dir=args.data_dir, subset="full" if args.full else None)
    else:
        data = load_fashion_mnist(subset="embedded")
    tr, va = split_train_val(len(data.train_labels), val_fraction=0.1, seed=0)
    train_size = QUICK["train_size"] if args.quick else args.train_size
    if train_size is not None:
        if not 1 <= train_size <= len(tr):
            raise GCSurgeryError(f"--train-size must be in 1..{len(tr)} for {data.source}, got {train_size}")
        pick = torch.randperm(len(tr), generator=torch.Generator().manual_seed(args.seed))[:train_size]
        tr = tr[pick.sort().values]
    n_test = len(data.test_labels)
    if args.quick:
        va, n_test = va[: QUICK["val_size"]], QUICK["test_size"]
    batch = QUICK["batch_size"] if args.quick else args.batch_size
    augment = "crop_flip" if args.augment else None
    x, y = data.train_images, data.train_labels
    train = TensorLoader(x[tr], y[tr], batch_size=batch, shuffle=True, seed=args.seed, augment=augment, pad_to=None)
    stats = {"batch_size": 256, "pad_to": None, "mean": train.mean, "std": train.std}
    val = TensorLoader(x[va], y[va], **stats)
    test = TensorLoader(data.test_images[:n_test], data.test_labels[:n_test], **stats)
    return data, train, val, test


def run(args: argparse.Namespace) -> int:
    """Runs the demo; returns the exit status."""
    start = time.perf_counter()
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 5)
    if epochs < 1:
        raise GCSurgeryError(f"--epochs must be at least 1, got {epochs}")
    data, train, val, test = _data(args)
    limit = QUICK["limit_batches"] if args.quick else None
    steps = len(train) if limit is None else min(limit, len(train))
    torch.manual_seed(args.seed)
    base = cifar_resnet(args.depth, num_classes=len(data.classes), in_chans=1)
    example = torch.zeros(2, *train.images.shape[1:])  # (2, 1, 28, 28)
    models, opts, scheds = {}, {}, {}
    for arm in ARMS:  # the same initial weights for both: gcify copies the model and seeds its branches itself
        models[arm], sites = build_arm(copy.deepcopy(base), arm, example_inputs=example)
        opts[arm] = build_optimizer(models[arm], sites=sites, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
        scheds[arm] = cosine_schedule(opts[arm], total_steps=epochs * steps)
    n_train = steps * train.batch_size if limit else len(train.labels)
    print(
        f"{data}\ntraining on {n_train} images, validating on {len(val.labels)}; cifar_resnet{args.depth} "
        f"(1 input channel), SGD lr {args.lr} momentum 0.9, cosine over {epochs} epochs, batch {train.batch_size}"
    )
    print(f"GCGD: {len(models['gcgd'].gc_plan.ode_pairs)} GC-ODE branches, GC-W on {list(opts['gcgd'].sites)}\n")
    header = "epoch | val acc baseline | val acc GCGD | step time GCGD/baseline"
    print(f"{header}\n{'-' * len(header)}", flush=True)
    hist = {arm: [] for arm in ARMS}
    device = torch.device("cpu")
    for epoch in range(epochs):
        for arm in ARMS:
            seed_epoch(args.seed, epoch)
            train.set_epoch(epoch)
            bar = {"progress": sys.stderr.isatty(), "desc": f"{LABELS[arm]}, epoch {epoch + 1}"}
            tr = train_one_epoch(
                models[arm], train, opts[arm], scheduler=scheds[arm], device=device, limit_batches=limit, **bar
            )
            va = evaluate(models[arm], val, device=device)
            prev = hist[arm][-1]["train_time"] if hist[arm] else 0.0
            hist[arm].append(
                {
                    "epoch": epoch + 1,
                    "val_acc": va["acc"],
                    "val_loss": va["loss"],
                    "train_loss": tr["loss"],
                    "step_time": tr["step_time"],
                    "train_time": prev + tr["seconds"],
                }
            )
        b, g = hist["baseline"][-1], hist["gcgd"][-1]
        ratio = g["step_time"] / b["step_time"]
        print(
            f"{epoch + 1:5d} | {100 * b['val_acc']:15.2f}% | {100 * g['val_acc']:11.2f}% | {ratio:22.2f}x", flush=True
        )
    return _report(args, hist, models, test, epochs, start)


def _report(args, hist, models, test, epochs: int, start: float) -> int:
    b_final, g_final = hist["baseline"][-1], hist["gcgd"][-1]
    target = b_final["val_acc"]
    reached = next((row for row in hist["gcgd"] if row["val_acc"] >= target), None)
    tests = {arm: evaluate(models[arm], test, device=torch.device("cpu"))["acc"] for arm in ARMS}
    print(
        f"\nfinal val acc: baseline {100 * target:.2f}%, GCGD {100 * g_final['val_acc']:.2f}% "
        f"({100 * (g_final['val_acc'] - target):+.2f} points)"
    )
    if reached is None:
        print(f"GCGD did not reach the baseline's final val acc ({100 * target:.2f}%) in {epochs} epochs: not reached")
    else:
        print(
            f"GCGD reached the baseline's final val acc ({100 * target:.2f}%) at epoch {reached['epoch']} of {epochs} "
            f"after {reached['train_time']:.1f}s of training (baseline: {b_final['train_time']:.1f}s for {epochs}): "
            f"{reached['epoch'] / epochs:.2f}x the epochs, {reached['train_time'] / b_final['train_time']:.2f}x "
            "the wall time"
        )
    print(f"test acc after the last epoch: baseline {100 * tests['baseline']:.2f}%, GCGD {100 * tests['gcgd']:.2f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {LABELS[arm]: [row["val_acc"] for row in hist[arm]] for arm in ARMS}
    plot_val_acc(curves, out / "demo.png", title=f"Fashion-MNIST, cifar_resnet{args.depth}: baseline vs GCGD")
    summary = {
        "history": hist,
        "test_acc": tests,
        "target_val_acc": target,
        "gcgd_epochs_to_target": reached and reached["epoch"],
        "gcgd_time_to_target": reached and reached["train_time"],
        "baseline_train_time": b_final["train_time"],
        "args": vars(args),
    }
    summary["wall_time"] = time.perf_counter() - start
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote {out / 'demo.png'} and {out / 'demo.json'}; total wall time {summary['wall_time']:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gcsurgery demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
