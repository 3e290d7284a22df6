"""`Run`: one arm of one model on one dataset, epoch by epoch — the training driver of every recipe, benchmark and demo.

A Run owns the model of its arm, the optimizer, the schedule, the history of its epochs, the best
validation epoch and its weights, atomic checkpoints (a killed job leaves the last one intact), resume
checks (a checkpoint made with other settings is refused), ``metrics.jsonl`` (one line per epoch; with
``diagnose_every`` also one ``diag/...`` line per recorded step, before its epoch's line) and the summary. Several
Runs can train in turns, one epoch each (the benchmark and the demo do), since each keeps its own state
and every epoch's random draws depend only on ``(seed, epoch)``.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..checkpoint import KEY as GC_CHECKPOINT_KEY
from ..checkpoint import checkpoint, restore
from ..diagnostics import GradientRecorder
from ..errors import GCSurgeryError
from ..plans import plan as make_plan
from ..rewrite import is_gcified
from .arms import arm_spec, build_arm, build_optimizer, gcw_site_names
from .config import RunConfig, config_diff
from .datasets import Data
from .loop import evaluate, gc_summary, make_schedule, ode_summary, seed_epoch, train_one_epoch
from .models import build_model
from .report import plot_curves

__all__ = ["Run", "RunFiles", "format_epoch", "metric_lines", "save_atomic"]


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """Where a Run writes; None: not written.

    Attributes:
        checkpoint: everything a bit-identical resume needs, after every epoch.
        best: the weights of the best validation epoch (None: they travel in the checkpoint instead).
        metrics: one JSON line per epoch.
        summary: the summary JSON, when the run is finished.
        plot: a PNG of the validation accuracy per epoch.
        keep_checkpoint: keep the checkpoint once the summary is written.
    """

    checkpoint: Path | None = None
    best: Path | None = None
    metrics: Path | None = None
    summary: Path | None = None
    plot: Path | None = None
    keep_checkpoint: bool = True

    @classmethod
    def in_dir(cls, out: str | Path) -> "RunFiles":
        """``checkpoint.pt``, ``best.pt``, ``metrics.jsonl``, ``summary.json`` and ``val_acc.png`` in ``out``."""
        out = Path(out)
        return cls(
            out / "checkpoint.pt", out / "best.pt", out / "metrics.jsonl", out / "summary.json", out / "val_acc.png"
        )


def save_atomic(obj, path: Path) -> None:
    """Writes ``obj`` atomically: ``torch.save`` for ``.pt``, else JSON."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    if path.suffix == ".pt":
        torch.save(obj, tmp)
    else:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def metric_lines(row: dict) -> str:
    """A history row as metrics.jsonl text: its step diagnostics (``diag/...`` keys), one line each, then the row."""
    diag = row.get("diagnostics", [])
    rest = {k: v for k, v in row.items() if k != "diagnostics"}
    return "".join(json.dumps(d) + "\n" for d in diag) + json.dumps(rest) + "\n"


def format_epoch(run: "Run", row: dict) -> str:
    """One line per epoch: losses, accuracies, lr and times."""
    return (
        f"epoch {row['epoch']}/{run.cfg.epochs}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}  "
        f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}  lr {row['lr']:.4g}  {row['epoch_time']:.1f}s"
    )


class Run:
    """One arm of one model: build it, train it an epoch at a time, and summarise it.

    Args:
        cfg: the run's settings.
        data: its loaders (`gcsurgery.harness.datasets.build_data`).
        device: where the model trains.
        rank: this process's DDP rank (only rank 0 writes files).
        world_size: the number of DDP processes (> 1: the model is wrapped in DistributedDataParallel).
        files: where to write; None writes nothing.
        resume: a checkpoint to continue from (made with the same settings, else GCSurgeryError).
    """

    def __init__(
        self,
        cfg: RunConfig,
        data: Data,
        *,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        files: RunFiles | None = None,
        resume: str | Path | None = None,
    ):
        self.cfg, self.data, self.device = cfg, data, torch.device(device)
        self.rank, self.world_size, self.files = rank, world_size, files or RunFiles()
        self.spec = arm_spec(cfg)
        ckpt = self._read_checkpoint(resume) if resume is not None else None
        torch.manual_seed(cfg.seed)  # the same initial weights for every arm
        model = build_model(
            cfg.model, num_classes=data.num_classes, in_chans=data.input_shape[0], kwargs=cfg.model_kwargs
        )
        if ckpt is not None and GC_CHECKPOINT_KEY in ckpt:  # the saved plan rebuilds the same graph
            model = restore(model, ckpt).train()
            plan_sites = tuple(s.param for s in model.gc_plan.gcw_sites)
            self.sites = plan_sites if self.spec.arm == "gcgd" else ()
            if self.sites and self.spec.sites == "convs":
                self.sites = tuple(ckpt.get("gcw_sites", self.sites))
        else:
            model, self.sites = build_arm(model, self.spec, example_inputs=torch.zeros(2, *data.input_shape))
        scaled = None  # the baseline's site_lr control: the plan's GC-W sites in their own lr group
        if self.spec.site_lr != 1.0:
            scaled = (gcw_site_names(model, torch.zeros(2, *data.input_shape)), self.spec.site_lr)
        plan = None
        if cfg.diagnose_every and rank == 0 and not is_gcified(model):  # the recorder's stages of a plain model
            with torch.random.fork_rng(devices=[]):
                plan = make_plan(model, example_inputs=torch.zeros(2, *data.input_shape))
            model.train()
        memory = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=memory)
        self.net = self.model  # order: gcify -> DDP -> compile
        if world_size > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        if cfg.compile:
            self.net = torch.compile(self.net)
        kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
        if cfg.opt != "adamw":
            kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.opt = build_optimizer(
            self.model,
            sites=self.sites,
            name=cfg.opt,
            gcw=self.spec.gcw,
            peer=self.spec.optimizer_peer,
            scaled=scaled,
            **kwargs,
        )
        self.recorder = None
        if cfg.diagnose_every and self.lead:
            self.recorder = GradientRecorder(self.model, plan, every=cfg.diagnose_every, optimizer=self.opt)
        n = len(data.train) if cfg.limit_train_batches is None else min(len(data.train), cfg.limit_train_batches)
        self.steps_per_epoch = n
        warmup = min(round(cfg.warmup_epochs * n), cfg.epochs * n)
        self.sched = make_schedule(
            self.opt, cfg.schedule, total_steps=cfg.epochs * n, warmup_steps=warmup, min_ratio=cfg.min_lr_ratio
        )
        self.amp_dtype = (torch.float16 if self.device.type == "cuda" else torch.bfloat16) if cfg.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.history: list[dict] = []
        self.best: dict = {"epoch": None, "val_acc": -1.0}
        self.best_state: dict | None = None
        if ckpt is not None:
            self._load(ckpt)
        elif cfg.eval_untrained:
            self.history.append({**self._validate(0), "train_time": 0.0, "cpu_time": 0.0})
        if self.lead and self.files.metrics is not None:
            self.files.metrics.parent.mkdir(parents=True, exist_ok=True)
            self.files.metrics.write_text("".join(metric_lines(row) for row in self.history))

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def epochs_done(self) -> int:
        """Epochs trained so far."""
        return self.history[-1]["epoch"] if self.history else 0

    @property
    def done(self) -> bool:
        return self.epochs_done >= self.cfg.epochs

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # --- resume ---------------------------------------------------------------------------------------------------

    def check_config(self, saved: dict, where) -> None:
        """GCSurgeryError when ``saved`` (a run's config) differs from this run's in a field that changes results."""
        diff = config_diff(saved, self.cfg)
        if diff:
            raise GCSurgeryError(
                f"cannot resume {where}: it was trained with other settings {{name: (checkpoint, now)}} {diff}; "
                "pass the same options (or start a new run elsewhere: another --out-dir / --out)"
            )

    def _read_checkpoint(self, path) -> dict:
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        self.check_config(ckpt["config"], path)
        return ckpt

    def _load(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.history, self.best = ckpt["history"], ckpt["best"]
        if "best_state" in ckpt:
            self.best_state = ckpt["best_state"]
        elif self.files.best is not None:
            self.best_state = torch.load(self.files.best, map_location="cpu", weights_only=True)

    def _save_checkpoint(self) -> None:
        """Everything a bit-identical resume needs; gcified models go through `gcsurgery.checkpoint` (plan included)."""
        rng = {"torch": torch.get_rng_state()}
        rng["cuda"] = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        extra = {"scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                 "rng": rng, "epoch": self.epochs_done, "history": self.history, "best": self.best,
                 "config": self.cfg.to_dict(), "gcw_sites": list(self.sites)}  # fmt: skip
        if self.files.best is None:
            extra["best_state"] = self.best_state
        if is_gcified(self.model):
            ckpt = checkpoint(self.model, self.opt, **extra)
        else:
            ckpt = {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "version": __version__,
                **extra,
            }
        save_atomic(ckpt, self.files.checkpoint)

    # --- epochs ---------------------------------------------------------------------------------------------------

    def _eval_kw(self) -> dict:
        return {"device": self.device, "amp_dtype": self.amp_dtype, "channels_last": self.cfg.channels_last}

    def _validate(self, epoch: int) -> dict:
        if hasattr(self.opt, "sync_lookahead"):
            self.opt.sync_lookahead()  # Lookahead evaluates its slow weights, as timm's training script does
        va = evaluate(self.net, self.data.val, limit_batches=self.cfg.limit_eval_batches, **self._eval_kw())
        if va["acc"] > self.best["val_acc"]:
            self.best = {"epoch": epoch, "val_acc": va["acc"]}
            self.best_state = _cpu_state(self.model)
            if self.lead and self.files.best is not None:
                self.files.best.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self.best_state, self.files.best)
        return {"epoch": epoch, "val_acc": va["acc"], "val_loss": va["loss"]}

    def train_epoch(self, *, progress: bool = False) -> dict:
        """Trains the next epoch, validates, checkpoints; returns the epoch's row of the history."""
        if self.done:
            raise GCSurgeryError(f"the run has trained its {self.cfg.epochs} epochs; nothing left to train")
        start = time.perf_counter()
        epoch = self.epochs_done  # 0-based: the number of epochs trained before this one
        seed_epoch(self.cfg.seed, epoch)
        train = self.data.train
        (train.sampler if hasattr(train, "sampler") else train).set_epoch(epoch)
        tr = train_one_epoch(
            self.net, train, self.opt, scheduler=self.sched, scaler=self.scaler,
            label_smoothing=self.cfg.label_smoothing, limit_batches=self.cfg.limit_train_batches,
            progress=progress, desc=f"{self.cfg.arm}, epoch {epoch + 1}/{self.cfg.epochs}", **self._eval_kw(),
            recorder=self.recorder, first_step=epoch * self.steps_per_epoch,
        )  # fmt: skip
        row = self._validate(epoch + 1)
        last = self.history[-1] if self.history else {}
        row.update(
            train_loss=tr["loss"], train_acc=tr["acc"], lr=self.sched.get_last_lr()[0], steps=tr["steps"],
            step_time=tr["step_time"], cpu_step_time=tr["cpu_step_time"],
            train_time=last.get("train_time", 0.0) + tr["seconds"],  # cumulative, evaluation excluded
            cpu_time=last.get("cpu_time", 0.0) + tr["cpu_seconds"], load_average=os.getloadavg()[0],
        )  # fmt: skip
        if (gc := gc_summary(self.opt)) is not None:
            row["gc_stats"] = gc
        if (ode := ode_summary(self.net)) is not None:
            row["ode_stats"] = ode
        if "diagnostics" in tr:
            row["diagnostics"] = tr["diagnostics"]
        row["epoch_time"] = time.perf_counter() - start
        self.history.append(row)
        if self.lead:
            if self.files.checkpoint is not None:
                self._save_checkpoint()
            if self.files.metrics is not None:
                with open(self.files.metrics, "a") as f:
                    f.write(metric_lines(row))
        return row

    def finish(self) -> dict:
        """Evaluates the test set once, with the best validation epoch's weights; writes and returns the summary."""
        trained = [r for r in self.history if r["epoch"] > 0]
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        te = None
        if self.data.test is not None:
            te = evaluate(self.net, self.data.test, limit_batches=self.cfg.limit_eval_batches, **self._eval_kw())
        summary = {
            "model": self.cfg.model, "arm": self.cfg.arm, "seed": self.cfg.seed, "dataset": self.data.description,
            "epochs": self.cfg.epochs, "best_epoch": self.best["epoch"], "best_val_acc": self.best["val_acc"],
            "final_val_acc": self.history[-1]["val_acc"],
            "test_acc": te and te["acc"], "test_loss": te and te["loss"],
            "test_at": f"best validation epoch ({self.best['epoch']})" if te else "no test set",
            "train_time": self.history[-1]["train_time"], "cpu_time": self.history[-1].get("cpu_time"),
            "step_time": float(np.median([r["step_time"] for r in trained])) if trained else None,
            "cpu_step_time": float(np.median([r["cpu_step_time"] for r in trained])) if trained else None,
            "parameters": self.n_params, "gcw_sites": list(self.sites), "world_size": self.world_size,
            "threads": torch.get_num_threads(), "version": __version__, "config": self.cfg.to_dict(),
            "history": self.history,
        }  # fmt: skip
        if self.lead:
            if self.files.summary is not None:
                save_atomic(summary, self.files.summary)
            if self.files.plot is not None:
                label = self.cfg.arm
                plot_curves(
                    {label: [r["val_acc"] for r in trained]}, self.files.plot, title=f"{self.cfg.model} [{label}]"
                )
            if self.files.checkpoint is not None and not self.files.keep_checkpoint:
                self.files.checkpoint.unlink(missing_ok=True)
        return summary

    def fit(self, *, log: Callable[[str], None] | None = None, progress: bool = False) -> dict:
        """Trains the remaining epochs (``log`` gets one line each), then `finish`."""
        while not self.done:
            row = self.train_epoch(progress=progress)
            if log is not None:
                log(format_epoch(self, row))
        return self.finish()

    def describe(self) -> str:
        """What is trained, on what, where."""
        sites = f", GC-W on {list(self.sites)}" if self.sites else ""
        return (
            f"{self.data.description}\n{self.cfg.model} [{self.cfg.arm}] {self.n_params / 1e6:.3f} M parameters on "
            f"{self.device} x{self.world_size}{sites}"
        )
