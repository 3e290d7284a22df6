"""`RunConfig`: everything one training run depends on, and the command-line parser made from it.

The recipes, the benchmarks and the demo describe a run by one of these; ``recipes/train.py`` exposes
every field as an option (``--batch-size`` for ``batch_size``), its help taken from the docstring.
"""

import argparse
import dataclasses
import re
import typing

from ..errors import GCSurgeryError

__all__ = ["CHOICES", "DATASETS", "RESULT_FIELDS", "RunConfig", "build_parser", "config_diff"]

DATASETS = ("fashion_mnist", "cifar10", "folders")
CHOICES = {
    "dataset": DATASETS,
    "subset": (None, "embedded", "full"),
    "schedule": ("cosine", "constant"),
}
# the fields that do not change what a run computes, so a resumed run may differ in them
HOW_FIELDS = ("data_dir", "workers", "out_dir", "resume", "device", "quiet", "compile", "diagnose_every")


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """Everything one run depends on; the command-line options are these fields.

    Attributes:
        model: cifar_resnet<depth>, cifar_plain<depth>, timm:<name>, torchvision:<name> or package.module:factory
            (never pretrained).
        model_kwargs: JSON keyword arguments for the model's factory, e.g. '{"drop_rate": 0.1}'.
        dataset: fashion_mnist, cifar10 or folders (ImageNet-style train/ and val/ class folders).
        data_dir: where the dataset is; fashion_mnist falls back to the Debian package or the embedded subset.
        subset: fashion_mnist only: embedded (6000/1000 images shipped with gcsurgery) or full (60000/10000).
        image_size: folders: the crop size (default 224); tensor datasets: pad up to it (default 32).
        train_size: tensor datasets: a class-balanced subset of this many training images (default all).
        val_size: tensor datasets: a class-balanced subset of this many validation images (default all).
        test_size: tensor datasets: the first this many test images (default all).
        val_fraction: tensor datasets: the part of the training set held out for validation (folders: val/ is
            the validation set).
        epochs: training epochs.
        batch_size: images per step on each process.
        eval_batch_size: images per evaluation batch (default: batch_size).
        opt: the base optimizer: sgd, adamw (torch.optim) or a name of timm.optim.list_optimizers().
        lr: peak learning rate (per-step schedule, after the warmup).
        schedule: cosine (decay to min_lr_ratio of the peak) or constant.
        momentum: SGD momentum (and timm's momentum-based optimizers).
        weight_decay: weight decay.
        nesterov: Nesterov momentum (torch's SGD).
        warmup_epochs: linear warmup, in epochs (may be fractional).
        min_lr_ratio: the final lr as a fraction of the peak.
        label_smoothing: cross-entropy label smoothing.
        arm: baseline, gcw (GC-W only), gcode (GC-ODE only), gcgd (both), or a peer (lookahead, sam, gradcent),
            or a variant such as gcgd:ode.gate_init=0.1,gcw.lr=0.01 or gcode:ode.mode=gradient.
        gcw: GCWOptions for the arm, KEY=VALUE,... (e.g. lr=0.01,rho=0.5).
        ode: ODEOptions for the arm, KEY=VALUE,... (e.g. gate_init=0.1,solver=rk4).
        seed: seeds the model's initialisation, the data order, augmentation, GC-ODE and GC-W.
        augment: random crops and flips (tensor datasets) or random resized crops and flips (folders).
        amp: mixed precision: bf16 autocast on CPU, fp16 with a GradScaler on CUDA.
        channels_last: NHWC memory layout for the model and the inputs.
        compile: torch.compile the model (after gcify and DDP).
        workers: data-loader processes (folders only).
        out_dir: where metrics, checkpoints, the summary and the plot go.
        resume: a checkpoint.pt to continue from.
        limit_train_batches: train on the first N batches of each epoch only (quick checks).
        limit_eval_batches: evaluate on the first N batches only (quick checks).
        eval_untrained: also evaluate the untrained model, as epoch 0 of the history.
        diagnose_every: record the GradientRecorder's step-to-step gradient diagnostics every K steps into
            metrics.jsonl, one line per recorded step (0: off; it does not change the training).
        device: auto (CUDA when present), cpu, cuda or cuda:<i>.
        quiet: no progress bars and no per-epoch lines.
    """

    model: str = "cifar_resnet20"
    model_kwargs: str | None = None
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    subset: str | None = None
    image_size: int | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    val_fraction: float = 0.1
    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int | None = None
    opt: str = "sgd"
    lr: float = 0.1
    schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    arm: str = "baseline"
    gcw: str | None = None
    ode: str | None = None
    seed: int = 0
    augment: bool = True
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    workers: int = 4
    out_dir: str = "runs/train"
    resume: str | None = None
    limit_train_batches: int | None = None
    limit_eval_batches: int | None = None
    eval_untrained: bool = False
    diagnose_every: int = 0
    device: str = "auto"
    quiet: bool = False

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise GCSurgeryError(f"unknown {name} {getattr(self, name)!r}; choose one of {list(choices)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise GCSurgeryError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.diagnose_every < 0:
            raise GCSurgeryError(f"diagnose_every must be 0 (off) or a number of steps >= 1, got {self.diagnose_every}")
        from .arms import arm_spec, check_optimizer  # torch is needed from here on

        arm_spec(self)  # a bad arm, --gcw or --ode fails here, before any data is read
        check_optimizer(self.opt)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in HOW_FIELDS)


def config_diff(saved: dict, cfg: RunConfig) -> dict:
    """``{field: (saved, now)}`` for the fields that change what a run computes and differ from ``saved``."""
    now = cfg.to_dict()
    return {k: (saved.get(k), now[k]) for k in RESULT_FIELDS if saved.get(k) != now[k]}


def _field_docs() -> dict[str, str]:
    doc = dict(re.findall(r"^ {8}(\w+): (.+(?:\n {12}.+)*)", RunConfig.__doc__, re.M))
    return {k: " ".join(v.split()) for k, v in doc.items()}


def build_parser(
    defaults: RunConfig | None = None, *, description: str | None = None, prog: str | None = None
) -> argparse.ArgumentParser:
    """A parser with one option per `RunConfig` field (defaults from ``defaults``), its help from the docstring.

    Args:
        defaults: the recipe's settings; the options default to them.
        description: the text ``--help`` shows first (a recipe passes its own docstring).
        prog: the program's name in the usage line.
    """
    defaults = defaults or RunConfig()
    doc = _field_docs()
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    aliases = {"opt": ["--optimizer"], "model_kwargs": ["--kwargs"]}
    for f in dataclasses.fields(RunConfig):
        flags = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, [])]
        default = getattr(defaults, f.name)
        helptext = doc.get(f.name, "") + f" (default: {default})"
        if f.type is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=helptext)
            continue
        kind = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
        choices = [c for c in CHOICES.get(f.name, ()) if c is not None] or None
        parser.add_argument(*flags, dest=f.name, type=kind, default=default, choices=choices, help=helptext)
    return parser
