"""One entry point for every recipe: the baseline, GC-W, GC-ODE, GCGD or Lookahead arm of any model on any dataset.

    python recipes/train.py --model cifar_resnet20 --dataset cifar10 --data-dir ~/data --arm gcgd
    python recipes/train.py --arm gcgd --gcw lr=0.01 --ode gate_init=0.1     # the README's lead variant
    torchrun --nproc-per-node 4 recipes/train.py ...       # DDP: gloo on CPU, nccl on CUDA

The recipes next to this file set the defaults for one model family and call `main`; every option
can still be overridden on the command line. Written to ``--out-dir``: ``metrics.jsonl`` (one JSON object
per epoch), ``checkpoint.pt`` every epoch (``--resume`` it: training continues bit-identically),
``best.pt`` (the weights of the best validation epoch), ``summary.json`` and ``val_acc.png``.

The validation split picks the best epoch (cut from the training set, or an image folder's ``val/``); the
test set is evaluated once, at the end, with the weights of that epoch.
"""

import sys

import torch.distributed as dist

from gcsurgery.errors import GCSurgeryError
from gcsurgery.harness.config import RunConfig, build_parser
from gcsurgery.harness.datasets import build_data
from gcsurgery.harness.loop import setup_device
from gcsurgery.harness.run import Run, RunFiles


def train(cfg: RunConfig) -> dict:
    """Trains one arm per ``cfg``; returns the summary written to ``summary.json``."""
    device, rank, world = setup_device(cfg.device)
    data = build_data(cfg, rank=rank, world_size=world, device=device if device.type == "cuda" else None)
    files = RunFiles.in_dir(cfg.out_dir)
    run = Run(cfg, data, device=device, rank=rank, world_size=world, files=files, resume=cfg.resume)
    say = print if rank == 0 and not cfg.quiet else None
    if say:
        say(run.describe())
    s = run.fit(log=say, progress=say is not None and sys.stderr.isatty())
    if rank == 0:
        test = "no test set" if s["test_acc"] is None else f"test acc {100 * s['test_acc']:.2f}% (at that epoch)"
        best = f"best val acc {100 * s['best_val_acc']:.2f}% at epoch {s['best_epoch']}"
        times = f"train time {s['train_time']:.1f}s ({1000 * s['step_time']:.1f} ms/step)"
        print(f"{cfg.model} [{cfg.arm}]: {best}, {test}, {times}; written to {cfg.out_dir}/")
    return s


def main(argv: list[str] | None = None, *, defaults: RunConfig | None = None, doc: str | None = None) -> dict:
    """Parses the command line (defaults from a recipe's `RunConfig`, ``--help`` from its ``doc``) and trains."""
    parser = build_parser(defaults, description=doc or __doc__)
    args = parser.parse_args(argv)
    try:
        summary = train(RunConfig(**vars(args)))
    except GCSurgeryError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
