"""The epoch loop: schedules, per-epoch seeding, one training pass, evaluation, and the device / DDP setup.

`gcsurgery.harness.run.Run` drives these for every recipe, benchmark and the demo.
"""

import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GCSurgeryError
from ..gcode import GCODE
from ..optim import needs_closure
from .loader import mix_seed

__all__ = [
    "SCHEDULES",
    "cosine_schedule",
    "evaluate",
    "gc_summary",
    "make_schedule",
    "seed_epoch",
    "setup_device",
    "train_one_epoch",
]

SCHEDULES = ("cosine", "constant")


def cosine_schedule(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay from the optimizer's lr to ``min_ratio`` times it, after a linear warmup."""
    return make_schedule(optimizer, "cosine", total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio)


def make_schedule(
    optimizer: torch.optim.Optimizer, name: str, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule: a linear warmup, then ``cosine`` decay to ``min_ratio`` of the lr, or ``constant``."""
    if name not in SCHEDULES:
        raise GCSurgeryError(f"unknown schedule {name!r}; choose one of {list(SCHEDULES)}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise GCSurgeryError(
            f"the schedule needs total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps} and "
            f"{warmup_steps}; train longer or warm up for fewer epochs"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_epoch(seed: int, epoch: int) -> None:
    """Seeds the global RNGs (dropout, drop-path, data-loader workers) from ``(seed, epoch)`` alone.

    Every arm and every resumed run then sees the same random draws in the same epoch, whatever
    happened before it.
    """
    torch.manual_seed(mix_seed(seed, epoch, 7919))


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
    recorder=None,
    first_step: int = 0,
) -> dict[str, float]:
    """Trains one pass over ``loader`` (or its first ``limit_batches`` batches), stepping ``scheduler`` per step.

    Args:
        recorder: a `gcsurgery.GradientRecorder`, called after each backward (gradients unscaled) and each
            optimizer step; it only reads, so the training is the same with or without it.
        first_step: the global step number of this pass's first step (the recorder's step count).

    Returns:
        ``loss`` and ``acc`` (means over the examples seen), ``steps``, ``seconds`` (wall time of the
        loop), ``step_time`` (seconds per step), and ``cpu_seconds`` / ``cpu_step_time``, the same in this
        process's CPU time (all its threads), which other jobs on a shared machine do not inflate. With a
        recorder, ``diagnostics``: its records completed during the pass, as ``recorder.flat`` dicts.
    """
    from tqdm.auto import tqdm

    model.train()
    two_pass = needs_closure(optimizer)
    if two_pass and scaler is not None:
        raise GCSurgeryError(
            f"{type(optimizer).__name__} steps in two passes (SAM), which this loop does not combine with fp16 "
            "loss scaling; train in fp32, or with bf16 autocast on the CPU"
        )
    total = len(loader) if limit_batches is None else min(len(loader), limit_batches)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = steps = 0
    diagnostics = []
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    start, cpu_start = time.perf_counter(), time.process_time()
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
        step = first_step + steps
        if scaler is not None:
            scaler.scale(loss).backward()
            if recorder is not None:
                scaler.unscale_(optimizer)  # the recorder reads the gradients the optimizer will see
                recorder.after_backward(step)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if recorder is not None:
                recorder.after_backward(step)
            if two_pass:  # SAM: the closure recomputes the loss and gradients at the perturbed weights

                def closure(x=x, y=y):
                    optimizer.zero_grad(set_to_none=True)
                    with _autocast(device, amp_dtype):
                        again = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
                    again.backward()
                    return again

                optimizer.step(closure)
            else:
                optimizer.step()
        if recorder is not None:
            recorder.after_step(step)
            diagnostics += [recorder.flat(r) for r in recorder.pop_complete()]
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
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    bar.close()
    stats = _all_reduce([loss_sum, correct.double(), float(seen)], device)
    out = {
        "loss": stats[0] / max(stats[2], 1),
        "acc": stats[1] / max(stats[2], 1),
        "steps": steps,
        "seconds": seconds,
        "step_time": seconds / max(steps, 1),
        "cpu_seconds": cpu_seconds,
        "cpu_step_time": cpu_seconds / max(steps, 1),
    }
    if recorder is not None:
        out["diagnostics"] = diagnostics
    return out


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


def ode_summary(model: torch.nn.Module) -> dict[str, dict[str, int]] | None:
    """Per GC-ODE branch with a bound (gradient mode, or ``out_clip`` set), its `GCODE.fit_stats` (steps, clipped
    and dropped gradients, or capped samples, so far); None without such branches."""
    branches = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, GCODE) and (m.options.mode == "gradient" or m.options.out_clip != math.inf)
    ]
    return {n: m.fit_stats() for n, m in branches} or None


def setup_device(name: str = "auto") -> tuple[torch.device, int, int]:
    """The device and ``(rank, world_size)``, joining the process group when launched by torchrun.

    Args:
        name: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:<i>``; under torchrun ``cuda`` means
            the process's ``LOCAL_RANK`` device.
    """
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        device = torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise GCSurgeryError(f"unknown device {name!r} ({e}); use auto, cpu, cuda or cuda:<i>") from e
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world
