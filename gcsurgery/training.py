"""The training loop's parts, shared by `recipes/train.py`, `gcsurgery demo` and the benchmarks.

An *arm* is one way to train the same model, as compared in the paper:

=========  ==========================  =====================================================
arm        model                       optimizer
=========  ==========================  =====================================================
baseline   the plain model             the base optimizer
gcw        the plain model             `GCOptimizer` on the automatic plan's GC-W sites
gcode      `gcify(model)`              the base optimizer (it also trains the GC-ODE branches)
gcgd       `gcify(model)`              `GCOptimizer` (GC-W and GC-ODE: the paper's GCGD)
=========  ==========================  =====================================================

Build the model under the seed first, then the arm: GC-ODE branches and GC-W correctors are
initialised from their own seeds, so every arm starts from the same weights of the original model
and the global RNG is left where it was.
"""

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GCSurgeryError
from .gcode import ODEOptions
from .gcw import GCWOptions
from .loader import _seed
from .models import build_model
from .optim import GCOptimizer
from .plans import plan
from .rewrite import gcify
from .wrappers import unwrap

__all__ = [
    "ARMS",
    "OPTIMIZERS",
    "build_model",
    "build_arm",
    "build_optimizer",
    "cosine_schedule",
    "seed_epoch",
    "train_one_epoch",
    "evaluate",
    "gc_summary",
    "plot_val_acc",
    "unwrap",
]

ARMS = ("baseline", "gcw", "gcode", "gcgd")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def _check_arm(arm: str) -> None:
    if arm not in ARMS:
        raise GCSurgeryError(f"unknown arm {arm!r}; choose one of {list(ARMS)}")


def build_arm(
    model: nn.Module,
    arm: str,
    *,
    example_inputs: torch.Tensor,
    ode: ODEOptions = ODEOptions(),  # noqa: B008 (frozen, hence safe)
) -> tuple[nn.Module, tuple[str, ...]]:
    """Prepares the model of an arm, leaving the global RNG untouched.

    Args:
        model: the plain model, on the CPU (it is copied for gcode and gcgd, left as is otherwise).
        arm: one of `ARMS`.
        example_inputs: an example batch for the plan, e.g. ``torch.zeros(2, C, H, W)``.
        ode: options of the GC-ODE branches (gcode, gcgd).

    Returns:
        ``(model, sites)``: the model to train (gcified for gcode and gcgd) and the names of the
        parameters GC-W corrects (empty for baseline and gcode).
    """
    _check_arm(arm)
    if arm == "baseline":
        return model, ()
    with torch.random.fork_rng(devices=[]):
        if arm == "gcw":
            out = model
            sites = tuple(s.param for s in plan(model, example_inputs).gcw_sites)
        else:
            out = gcify(model, example_inputs=example_inputs, ode=ode)
            sites = tuple(s.param for s in out.gc_plan.gcw_sites) if arm == "gcgd" else ()
    model.train()  # tracing may leave submodules in eval mode
    out.train()
    return out, sites


def build_optimizer(
    model: nn.Module,
    *,
    sites: tuple[str, ...] = (),
    name: str = "sgd",
    gcw: GCWOptions = GCWOptions(),  # noqa: B008 (frozen, hence safe)
    **kwargs,
) -> torch.optim.Optimizer:
    """The base optimizer over all of ``model``'s parameters, wrapped in `GCOptimizer` when there are sites.

    Args:
        model: the arm's model (DDP or compiled wrappers are fine).
        sites: GC-W parameter names from `build_arm`; empty gives the plain base optimizer.
        name: the base optimizer, a key of `OPTIMIZERS`.
        gcw: options of the GC-W correctors.
        **kwargs: options of the base optimizer (lr, momentum, weight_decay, ...).
    """
    if name not in OPTIMIZERS:
        raise GCSurgeryError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
    if not sites:
        return OPTIMIZERS[name](unwrap(model).parameters(), **kwargs)
    return GCOptimizer(unwrap(model), OPTIMIZERS[name], sites=list(sites), gcw=gcw, **kwargs)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay from the optimizer's lr to ``min_ratio`` times it, after a linear warmup."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise GCSurgeryError(
            f"the schedule needs total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps} and "
            f"{warmup_steps}; train longer or warm up for fewer epochs"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_epoch(seed: int, epoch: int) -> None:
    """Seeds the global RNGs (dropout, drop-path, data-loader workers) from ``(seed, epoch)`` alone.

    Every arm and every resumed run then sees the same random draws in the same epoch, whatever
    happened before it.
    """
    torch.manual_seed(_seed(seed, epoch, 7919))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    scheduler=None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    label_smoothing: float = 0.0,
    limit_batches: int | None = None,
    progress: bool = False,
    desc: str = "train",
) -> dict[str, float]:
    """Trains one pass over ``loader`` (or its first ``limit_batches`` batches), stepping ``scheduler`` per step.

    Returns:
        ``loss`` and ``acc`` (means over the examples seen), ``steps``, ``seconds`` (wall time of the
        loop) and ``step_time`` (seconds per step).
    """
    from tqdm.auto import tqdm

    model.train()
    total = len(loader) if limit_batches is None else min(len(loader), limit_batches)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = steps = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for x, y in loader:  # (B, C, H, W), (B,)
        if steps == total:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(x)  # (B, num_classes)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen, steps = seen + len(y), steps + 1
        bar.update()
        if progress and steps % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    stats = _all_reduce([loss_sum, correct.double(), float(seen)], device)
    return {
        "loss": stats[0] / max(stats[2], 1),
        "acc": stats[1] / max(stats[2], 1),
        "steps": steps,
        "seconds": seconds,
        "step_time": seconds / max(steps, 1),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    limit_batches: int | None = None,
) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and accuracy ``acc`` over ``loader``, summed over DDP ranks (each rank
    passes its own shard), and ``n`` examples."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for i, (x, y) in enumerate(loader):
        if limit_batches is not None and i == limit_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(x).float()  # (B, num_classes)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    model.train(was_training)
    loss, hits, n = _all_reduce([loss_sum, correct.double(), float(seen)], device)
    return {"loss": loss / max(n, 1), "acc": hits / max(n, 1), "n": int(n)}


def _all_reduce(values: list, device: torch.device) -> list[float]:
    """Sums scalars over DDP ranks (when running under DDP) in one collective; returns floats."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def gc_summary(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, float]] | None:
    """Per GC-W site, the last step's ``ratio`` ‖ΔG‖/‖G‖, ``next_grad_dot`` and ``trust``; None without GC-W."""
    if not hasattr(optimizer, "gc_stats"):
        return None
    keep = ("ratio", "next_grad_dot", "trust")
    return {site: {k: d[k] for k in keep if k in d} for site, d in optimizer.gc_stats().items()}


def plot_val_acc(curves: dict[str, list[float]], path, *, title: str = "validation accuracy") -> None:
    """Writes a PNG of validation accuracy per epoch, one line per arm (``curves[arm][epoch]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, accs in curves.items():
        ax.plot(range(1, len(accs) + 1), [100 * a for a in accs], marker="o", ms=3, label=label)
    ax.set(xlabel="epoch", ylabel="val accuracy (%)", title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
