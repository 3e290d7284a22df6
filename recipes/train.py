"""One training loop for every recipe: the baseline, GC-W, GC-ODE or GCGD arm of any model on any dataset.

    python recipes/train.py --model cifar_resnet20 --dataset cifar10 --data-dir ~/data --arm gcgd
    torchrun --nproc-per-node 4 recipes/train.py ...       # DDP: gloo on CPU, nccl on CUDA

The recipes next to this file set the defaults for one model family and call `main`; every option
can still be overridden on the command line. Written to ``--out-dir``:

- ``metrics.jsonl``: one JSON object per epoch (losses, accuracies, lr, times, GC-W statistics);
- ``checkpoint.pt`` every epoch (``--resume`` it: training continues bit-identically) and ``best.pt``,
  the weights of the best validation epoch;
- ``summary.json`` and ``val_acc.png``.

The validation split is cut from the training set (the same split for every seed and arm) and picks
the best epoch; the test set is evaluated once, at the end, with the weights of the best validation epoch.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import typing
from pathlib import Path

import torch
import torch.distributed as dist

from gcsurgery import __version__, checkpoint, is_gcified, restore
from gcsurgery.checkpoint import KEY as GC_CHECKPOINT_KEY
from gcsurgery.data import imagenet_folders, load_cifar10, load_fashion_mnist
from gcsurgery.errors import GCSurgeryError
from gcsurgery.gcode import ODEOptions
from gcsurgery.gcw import GCWOptions
from gcsurgery.loader import TensorLoader, split_train_val
from gcsurgery.training import (
    ARMS,
    OPTIMIZERS,
    build_arm,
    build_model,
    build_optimizer,
    cosine_schedule,
    evaluate,
    gc_summary,
    plot_val_acc,
    seed_epoch,
    train_one_epoch,
)

DATASETS = ("fashion_mnist", "cifar10", "folders")
CHOICES = {"arm": ARMS, "dataset": DATASETS, "optimizer": tuple(OPTIMIZERS), "subset": (None, "embedded", "full")}
RESUME_MUST_MATCH = (
    "model",
    "dataset",
    "subset",
    "image_size",
    "arm",
    "seed",
    "epochs",
    "batch_size",
    "optimizer",
    "val_fraction",
    "limit_train_batches",
)


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """Everything one run depends on; the command-line options are these fields.

    Attributes:
        model: cifar_resnet<depth>, torchvision:<name> or timm:<name> (never pretrained).
        dataset: fashion_mnist, cifar10 or folders (ImageNet-style train/ and val/ class folders).
        data_dir: where the dataset is; fashion_mnist falls back to the Debian package or the embedded subset.
        subset: fashion_mnist only: embedded (6000/1000 images shipped with gcsurgery) or full (60000/10000).
        image_size: folders: the crop size (default 224); tensor datasets: pad up to it (default 32).
        epochs: training epochs.
        batch_size: images per step on each process.
        optimizer: the base optimizer: sgd or adamw.
        lr: peak learning rate (per-step cosine decay, after the warmup).
        momentum: SGD momentum.
        weight_decay: weight decay on every parameter.
        nesterov: Nesterov momentum (SGD).
        warmup_epochs: linear warmup, in epochs (may be fractional).
        min_lr_ratio: the final lr as a fraction of the peak.
        label_smoothing: cross-entropy label smoothing.
        arm: baseline, gcw (GC-W only), gcode (GC-ODE only) or gcgd (both).
        seed: seeds the model's initialisation, the data order and augmentation.
        val_fraction: the part of the training set held out for validation.
        augment: random crops and flips (tensor datasets) or random resized crops and flips (folders).
        amp: mixed precision: bf16 autocast on CPU, fp16 with a GradScaler on CUDA.
        channels_last: NHWC memory layout for the model and the inputs.
        compile: torch.compile the model (after gcify and DDP).
        workers: data-loader processes (folders only).
        out_dir: where metrics, checkpoints, the summary and the plot go.
        resume: a checkpoint.pt to continue from.
        limit_train_batches: train on the first N batches of each epoch only (quick checks).
        limit_eval_batches: evaluate on the first N batches only (quick checks).
        device: auto (CUDA when present), cpu, cuda or cuda:<i>.
        quiet: no progress bars and no per-epoch lines.
    """

    model: str = "cifar_resnet20"
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    subset: str | None = None
    image_size: int | None = None
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    arm: str = "baseline"
    seed: int = 0
    val_fraction: float = 0.1
    augment: bool = True
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    workers: int = 4
    out_dir: str = "runs/train"
    resume: str | None = None
    limit_train_batches: int | None = None
    limit_eval_batches: int | None = None
    device: str = "auto"
    quiet: bool = False

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise GCSurgeryError(f"unknown {name} {getattr(self, name)!r}; choose one of {list(choices)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise GCSurgeryError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclasses.dataclass
class Data:
    """The loaders of one dataset and what the model needs to know about it."""

    train: typing.Any
    val: typing.Any
    test: typing.Any
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    description: str


def build_data(cfg: TrainConfig, *, rank: int = 0, world_size: int = 1, device=None) -> Data:
    """The train / validation / test loaders; validation and test are sharded over DDP ranks without padding."""
    if cfg.dataset != "fashion_mnist" and cfg.data_dir is None:
        raise GCSurgeryError(f"dataset {cfg.dataset!r} needs --data-dir DIR (only fashion_mnist has a default)")
    if cfg.dataset == "folders":
        return _folder_data(cfg, rank=rank, world_size=world_size)
    if cfg.dataset == "cifar10":
        d = load_cifar10(cfg.data_dir)
    else:
        d = load_fashion_mnist(data_dir=cfg.data_dir, subset=cfg.subset)
    tr, va = split_train_val(len(d.train_labels), val_fraction=cfg.val_fraction, seed=0)
    common = {"batch_size": cfg.batch_size, "pad_to": cfg.image_size or 32, "device": device}
    augment = "crop_flip" if cfg.augment else None
    train = TensorLoader(
        d.train_images[tr],
        d.train_labels[tr],
        shuffle=True,
        seed=cfg.seed,
        augment=augment,
        rank=rank,
        world_size=world_size,
        **common,
    )
    stats = {"mean": train.mean, "std": train.std}
    val = TensorLoader(d.train_images[va][rank::world_size], d.train_labels[va][rank::world_size], **stats, **common)
    test = TensorLoader(d.test_images[rank::world_size], d.test_labels[rank::world_size], **stats, **common)
    shape = tuple(train.images.shape[1:])
    return Data(train, val, test, shape, len(d.classes), f"{d} -> {len(tr)} train / {len(va)} val")


def _folder_data(cfg: TrainConfig, *, rank: int, world_size: int) -> Data:
    from torch.utils.data import DataLoader, DistributedSampler, Subset
    from torchvision.datasets import ImageFolder

    size = cfg.image_size or 224
    train_ds, test_ds = imagenet_folders(cfg.data_dir, image_size=size)
    if not cfg.augment:
        train_ds.transform = test_ds.transform
    tr, va = split_train_val(len(train_ds), val_fraction=cfg.val_fraction, seed=0)
    val_ds = Subset(ImageFolder(train_ds.root, transform=test_ds.transform), va[rank::world_size].tolist())
    train_ds = Subset(train_ds, tr.tolist())
    sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    kw = {"batch_size": cfg.batch_size, "num_workers": cfg.workers, "pin_memory": torch.cuda.is_available()}
    return Data(
        DataLoader(train_ds, sampler=sampler, drop_last=True, **kw),
        DataLoader(val_ds, **kw),
        DataLoader(Subset(test_ds, range(rank, len(test_ds), world_size)), **kw),
        (3, size, size),
        len(test_ds.classes),
        f"folders {cfg.data_dir}: {len(tr)} train / {len(va)} val / {len(test_ds)} test images, "
        f"{len(test_ds.classes)} classes",
    )


def _set_epoch(loader, epoch: int) -> None:
    (loader.sampler if hasattr(loader, "sampler") else loader).set_epoch(epoch)


def _setup_device(cfg: TrainConfig) -> tuple[torch.device, int, int]:
    """The device and (rank, world size), joining the process group when launched by torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def _read_checkpoint(cfg: TrainConfig, device: torch.device) -> dict:
    ckpt = torch.load(cfg.resume, map_location=device, weights_only=False)
    diff = {k: (ckpt["config"].get(k), getattr(cfg, k)) for k in RESUME_MUST_MATCH}
    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
    if diff:
        raise GCSurgeryError(
            f"cannot resume {cfg.resume}: it was trained with other settings {{name: (checkpoint, now)}} {diff}; "
            "pass the same options (or start a new run in another --out-dir)"
        )
    return ckpt


def _resume(ckpt: dict, cfg: TrainConfig, *, model, opt, sched, scaler, device) -> tuple[list, dict, dict]:
    """Restores the training state; returns the run's history, its best epoch and that epoch's weights."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    best_state = torch.load(Path(cfg.resume).parent / "best.pt", map_location="cpu", weights_only=True)
    return ckpt["history"], ckpt["best"], best_state


def _save_checkpoint(path: Path, cfg: TrainConfig, *, model, opt, sched, scaler, device, history, best) -> None:
    """Writes everything a bit-identical resume needs, atomically (a killed job leaves the last one intact).

    Gcified models go through `gcsurgery.checkpoint`, which stores the plan and the GC-ODE options too.
    """
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
    extra = {"scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None, "rng": rng,
             "epoch": len(history), "history": history, "best": best, "config": dataclasses.asdict(cfg)}  # fmt: skip
    if is_gcified(model):
        ckpt = checkpoint(model, opt, **extra)
    else:
        ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "version": __version__, **extra}
    torch.save(ckpt, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def train(cfg: TrainConfig) -> dict:
    """Trains one arm per ``cfg``; returns the summary written to ``summary.json``."""
    device, rank, world = _setup_device(cfg)
    lead = rank == 0
    say = print if lead and not cfg.quiet else (lambda *a, **k: None)
    data = build_data(cfg, rank=rank, world_size=world, device=device if device.type == "cuda" else None)
    ckpt = _read_checkpoint(cfg, device) if cfg.resume else None
    torch.manual_seed(cfg.seed)  # the same initial weights for every arm
    model = build_model(cfg.model, num_classes=data.num_classes, in_chans=data.input_shape[0])
    if ckpt is not None and GC_CHECKPOINT_KEY in ckpt:  # the saved plan rebuilds the same graph
        model = restore(model, ckpt).train()
        sites = tuple(s.param for s in model.gc_plan.gcw_sites) if cfg.arm == "gcgd" else ()
    else:
        example = torch.zeros(2, *data.input_shape)
        model, sites = build_arm(model, cfg.arm, example_inputs=example, ode=ODEOptions(seed=cfg.seed))
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    net = model  # order: gcify -> DDP -> compile
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    opt = build_optimizer(model, sites=sites, name=cfg.optimizer, gcw=GCWOptions(seed=cfg.seed), **kwargs)
    steps = len(data.train) if cfg.limit_train_batches is None else min(len(data.train), cfg.limit_train_batches)
    warmup = min(round(cfg.warmup_epochs * steps), cfg.epochs * steps)
    sched = cosine_schedule(opt, total_steps=cfg.epochs * steps, warmup_steps=warmup, min_ratio=cfg.min_lr_ratio)
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    state = {"model": model, "opt": opt, "sched": sched, "scaler": scaler, "device": device}
    history, best, best_state = [], {"epoch": None, "val_acc": -1.0}, None
    if ckpt is not None:
        history, best, best_state = _resume(ckpt, cfg, **state)
    n_params = sum(p.numel() for p in model.parameters())
    sites_note = f", GC-W on {list(sites)}" if sites else ""
    say(f"{data.description}\n{cfg.model} [{cfg.arm}] {n_params / 1e6:.3f} M parameters on {device} x{world}", end="")
    say(sites_note)
    out = Path(cfg.out_dir)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    progress = lead and not cfg.quiet and sys.stderr.isatty()
    run = {"device": device, "amp_dtype": amp_dtype, "channels_last": cfg.channels_last}
    for epoch in range(len(history), cfg.epochs):
        start = time.perf_counter()
        seed_epoch(cfg.seed, epoch)
        _set_epoch(data.train, epoch)
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        tr = train_one_epoch(net, data.train, opt, scheduler=sched, scaler=scaler, label_smoothing=cfg.label_smoothing,
                             limit_batches=cfg.limit_train_batches, progress=progress, desc=desc, **run)  # fmt: skip
        va = evaluate(net, data.val, limit_batches=cfg.limit_eval_batches, **run)
        if va["acc"] > best["val_acc"]:
            best = {"epoch": epoch + 1, "val_acc": va["acc"]}
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if lead:
                torch.save(best_state, out / "best.pt")
        row = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
               "val_acc": va["acc"], "lr": sched.get_last_lr()[0], "step_time": tr["step_time"],
               "train_time": (history[-1]["train_time"] if history else 0.0) + tr["seconds"]}  # fmt: skip
        if (gc := gc_summary(opt)) is not None:
            row["gc_stats"] = gc
        row["epoch_time"] = time.perf_counter() - start
        history.append(row)
        if lead:
            _save_checkpoint(out / "checkpoint.pt", cfg, history=history, best=best, **state)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        say(f"{desc}  train loss {tr['loss']:.4f} acc {100 * tr['acc']:.2f}  val loss {va['loss']:.4f} "
            f"acc {100 * va['acc']:.2f}  lr {row['lr']:.4g}  {row['epoch_time']:.1f}s")  # fmt: skip

    model.load_state_dict(best_state)  # the test set is seen once, with the weights of the best validation epoch
    te = evaluate(net, data.test, limit_batches=cfg.limit_eval_batches, **run)
    summary = {"model": cfg.model, "arm": cfg.arm, "dataset": data.description, "seed": cfg.seed,
               "epochs": cfg.epochs, "best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
               "final_val_acc": history[-1]["val_acc"], "test_acc": te["acc"], "test_loss": te["loss"],
               "test_at": f"best validation epoch ({best['epoch']})", "train_time": history[-1]["train_time"],
               "step_time": sum(r["step_time"] for r in history) / len(history), "parameters": n_params,
               "gcw_sites": list(sites), "world_size": world, "version": __version__,
               "config": dataclasses.asdict(cfg)}  # fmt: skip
    if lead:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_val_acc({cfg.arm: [r["val_acc"] for r in history]}, out / "val_acc.png", title=f"{cfg.model} [{cfg.arm}]")
        print(f"{cfg.model} [{cfg.arm}]: best val acc {100 * best['val_acc']:.2f}% at epoch {best['epoch']}, test acc "
              f"{100 * te['acc']:.2f}% (at that epoch), train time {summary['train_time']:.1f}s "
              f"({1000 * summary['step_time']:.1f} ms/step); written to {out}/")  # fmt: skip
    return summary


def build_parser(defaults: TrainConfig) -> argparse.ArgumentParser:
    """A parser with one option per `TrainConfig` field, its help taken from the docstring."""
    doc = dict(re.findall(r"^ {8}(\w+): (.+(?:\n {12}.+)*)", TrainConfig.__doc__, re.M))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        helptext = " ".join(doc.get(f.name, "").split()) + f" (default: {default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
            continue
        kind = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
        choices = [c for c in CHOICES.get(f.name, ()) if c is not None] or None
        parser.add_argument(flag, type=kind, default=default, choices=choices, help=helptext)
    return parser


def main(argv: list[str] | None = None, *, defaults: TrainConfig | None = None) -> dict:
    """Parses the command line (defaults from a recipe's `TrainConfig`) and trains."""
    args = build_parser(defaults or TrainConfig()).parse_args(argv)
    summary = train(TrainConfig(**vars(args)))
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
