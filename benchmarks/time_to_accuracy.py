"""Time to accuracy of every arm on Fashion-MNIST: CIFAR ResNet-20 (one input channel), several seeds, one table.

    python benchmarks/time_to_accuracy.py --train-size 20000 --val-size 5000 --out runs/tta
    python benchmarks/time_to_accuracy.py --train-size 20000 --val-size 5000 --out runs/tta --resume
    python benchmarks/time_to_accuracy.py --quick --out /tmp/tta                 # smoke test, seconds

Arms: ``baseline`` (SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128, per-step cosine decay to 0), ``gcw``,
``gcode``, ``gcgd`` (as in `gcsurgery.training`) and ``lookahead`` (timm's Lookahead over the same SGD,
k=5, alpha=0.5, slow weights synced before each evaluation as timm's training script does). A *variant*
of gcw, gcode or gcgd changes their options: ``ARM:KEY=VALUE,...`` with keys ``ode.<field>`` (an
`ODEOptions` field), ``gcw.<field>`` (a `GCWOptions` field) and ``sites=plan|convs`` (GC-W on the plan's
sites, or on every convolution's weight), e.g. ``gcgd:ode.gate_init=0.1,gcw.horizons=(5,50)``. Added to an
``OUT`` with ``--resume``, variants are paired with the baseline runs already there. Every arm
of a seed starts from the same weights and sees the same batches in the same order with the same
augmentation (random 4-pixel crops and flips of the images padded to 32x32).

Protocol: the validation split (10% of the training images, the same for every seed) picks the best
epoch; the test set is evaluated once per run, with the weights of that epoch. ``--train-size`` and
``--val-size`` take class-balanced subsets of the two splits. Within a seed the arms train in turns,
one epoch each (the order rotating), so load drift on a shared machine hits all arms alike. Each
(arm, seed) is its own run: a checkpoint after every epoch and a JSON file when done, in ``OUT/runs/``;
``--resume`` continues unfinished runs and skips finished ones.

Reported (``OUT/results.json``, ``OUT/results.md``, ``OUT/curves.png``): per arm the final validation
accuracy (mean ± std over seeds) and its paired difference to the baseline of the same seed; the test
accuracy at the best validation epoch; the epochs and the training wall time (evaluation excluded) that
the seed-mean validation curve needs to reach the baseline's final mean accuracy and the baseline's
mean accuracy at 50%, 75% and 90% of its epochs (linear interpolation between epochs, epoch 0 being the
untrained model), as ratios to the baseline's; and the train-step time ratio to the baseline (median
over the (seed, epoch) pairs).
"""

import argparse
import ast
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/overhead.py; read when torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gcsurgery  # noqa: E402
from gcsurgery.data import load_fashion_mnist  # noqa: E402
from gcsurgery.errors import GCSurgeryError  # noqa: E402
from gcsurgery.gcode import ODEOptions  # noqa: E402
from gcsurgery.gcw import GCWOptions  # noqa: E402
from gcsurgery.loader import TensorLoader, balanced_subset, split_train_val  # noqa: E402
from gcsurgery.models import cifar_resnet  # noqa: E402
from gcsurgery.training import (  # noqa: E402
    build_arm,
    build_optimizer,
    cosine_schedule,
    evaluate,
    gc_summary,
    seed_epoch,
    train_one_epoch,
)

ARMS = ("baseline", "gcw", "gcode", "gcgd", "lookahead")
VARIED = ("gcw", "gcode", "gcgd")  # the arms that take option overrides
SITES = ("plan", "convs")
LOOKAHEAD = {"k": 5, "alpha": 0.5}
QUICK = {"epochs": 2, "train_size": 200, "val_size": 100, "test_size": 100, "batch_size": 32, "limit_batches": 3}
RUN_KEYS = (
    "epochs",
    "train_size",
    "val_size",
    "test_size",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "augment",
    "limit_batches",
    "data",
)


def build_data(cfg: dict) -> tuple[TensorLoader, TensorLoader, TensorLoader, str]:
    """Train, validation and test loaders; the splits and subsets are the same for every seed."""
    d = load_fashion_mnist(subset=cfg["data"])
    tr, va = split_train_val(len(d.train_labels), val_fraction=0.1, seed=0)
    n = len(d.classes)
    if cfg["train_size"] is not None:
        tr = tr[balanced_subset(d.train_labels[tr], per_class=max(1, cfg["train_size"] // n), seed=0)]
    if cfg["val_size"] is not None:
        va = va[balanced_subset(d.train_labels[va], per_class=max(1, cfg["val_size"] // n), seed=0)]
    te = torch.arange(len(d.test_labels) if cfg["test_size"] is None else cfg["test_size"])
    common = {"batch_size": cfg["batch_size"], "pad_to": 32}
    augment = "crop_flip" if cfg["augment"] else None
    train = TensorLoader(d.train_images[tr], d.train_labels[tr], shuffle=True, augment=augment, **common)
    stats = {"mean": train.mean, "std": train.std}
    val = TensorLoader(d.train_images[va], d.train_labels[va], **stats, **common)
    test = TensorLoader(d.test_images[te], d.test_labels[te], **stats, **common)
    return train, val, test, f"{d.name} from {d.source}: {len(tr)} train / {len(va)} val / {len(te)} test images"


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """An arm and its option overrides, parsed from ``ARM[:KEY=VALUE,...]``."""

    spec: str
    arm: str
    ode: ODEOptions = ODEOptions()  # noqa: RUF009 (frozen, hence safe)
    gcw: GCWOptions = GCWOptions()  # noqa: RUF009
    sites: str = "plan"

    @property
    def filename(self) -> str:
        return "".join(c if c.isalnum() or c in "._=-" else "_" for c in self.spec)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string option such as solver=rk4


def parse_arm(spec: str, *, seed: int = 0) -> ArmSpec:
    """The `ArmSpec` of ``spec`` with the option seeds set to ``seed``; GCSurgeryError on a bad spec."""
    arm, _, rest = spec.partition(":")
    if arm not in ARMS:
        raise GCSurgeryError(f"unknown arm {arm!r} in {spec!r}; choose one of {list(ARMS)}, e.g. gcgd:gcw.lr=0.01")
    if rest and arm not in VARIED:
        raise GCSurgeryError(f"{spec!r}: only {list(VARIED)} take options; write {arm!r} alone")
    over = {"ode": {"seed": seed}, "gcw": {"seed": seed}}
    sites = "plan"
    for item in filter(None, re.split(r",(?=[\w.]+=)", rest)):  # a comma inside a value, as in (5,50), stays
        key, eq, value = item.partition("=")
        group, dot, field = key.partition(".")
        fields = {f.name for f in dataclasses.fields(ODEOptions if group == "ode" else GCWOptions)} - {"seed"}
        if key == "sites" and eq and value in SITES:
            sites = value
        elif eq and dot and group in over and field in fields:
            over[group][field] = _literal(value)
        else:
            raise GCSurgeryError(
                f"{spec!r}: cannot read {item!r}; write KEY=VALUE with KEY sites ({'|'.join(SITES)}), ode.<field> "
                f"(fields of ODEOptions) or gcw.<field> (fields of GCWOptions), e.g. gcgd:ode.gate_init=0.1"
            )
    if sites != "plan" and arm == "gcode":
        raise GCSurgeryError(f"{spec!r}: sites= sets GC-W sites, which the gcode arm has none of; use gcw or gcgd")
    return ArmSpec(spec, arm, ODEOptions(**over["ode"]), GCWOptions(**over["gcw"]), sites)


class Run:
    """One (arm, seed): the model, its optimizer and schedule, and the history of its epochs."""

    def __init__(self, arm: str, seed: int, cfg: dict, *, steps: int, device: torch.device):
        self.arm, self.seed, self.cfg = arm, seed, cfg
        a = parse_arm(arm, seed=seed)
        torch.manual_seed(seed)  # the same initial weights for every arm
        model = cifar_resnet(20, num_classes=10, in_chans=1)
        convs = tuple(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
        gc_arm = "baseline" if a.arm == "lookahead" else a.arm
        model, self.sites = build_arm(model, gc_arm, example_inputs=torch.zeros(2, 1, 32, 32), ode=a.ode)
        if self.sites and a.sites == "convs":
            self.sites = convs  # gcify keeps the original parameter names
        self.model = model.to(device)
        sgd = {"lr": cfg["lr"], "momentum": cfg["momentum"], "weight_decay": cfg["weight_decay"]}
        self.opt = build_optimizer(self.model, sites=self.sites, gcw=a.gcw, **sgd)
        if a.arm == "lookahead":
            from timm.optim import Lookahead

            self.opt = Lookahead(self.opt, **LOOKAHEAD)
        self.sched = cosine_schedule(self.opt, total_steps=cfg["epochs"] * steps)
        self.history: list[dict] = []
        self.best = {"epoch": None, "val_acc": -1.0, "state": None}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "config": self.cfg,
            "scheduler": self.sched.state_dict(),
            "history": self.history,
            "best": self.best,
        }

    def load_state_dict(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.history, self.best = ckpt["history"], ckpt["best"]

    def validate(self, val: TensorLoader, device: torch.device) -> dict:
        if hasattr(self.opt, "sync_lookahead"):
            self.opt.sync_lookahead()
        va = evaluate(self.model, val, device=device)
        epoch = len(self.history)
        if va["acc"] > self.best["val_acc"]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.best = {"epoch": epoch, "val_acc": va["acc"], "state": state}
        return {"epoch": epoch, "val_acc": va["acc"], "val_loss": va["loss"]}

    def train_epoch(self, train: TensorLoader, val: TensorLoader, device: torch.device) -> dict:
        epoch = len(self.history)  # 1-based: history[0] is the untrained model
        seed_epoch(self.seed, epoch)
        train.set_epoch(epoch - 1)
        tr = train_one_epoch(
            self.model, train, self.opt, scheduler=self.sched, device=device, limit_batches=self.cfg["limit_batches"]
        )
        row = self.validate(val, device)
        row["train_time"] = self.history[-1]["train_time"] + tr["seconds"]  # cumulative, evaluation excluded
        row.update(train_loss=tr["loss"], train_acc=tr["acc"], step_time=tr["step_time"], steps=tr["steps"])
        row["load_average"] = os.getloadavg()[0]
        if (gc := gc_summary(self.opt)) is not None:
            row["gc_stats"] = gc
        self.history.append(row)
        return row

    def summary(self, test: TensorLoader, device: torch.device) -> dict:
        self.model.load_state_dict(self.best["state"])  # the test set is seen once, at the best validation epoch
        te = evaluate(self.model, test, device=device)
        return {
            "arm": self.arm,
            "seed": self.seed,
            "config": self.cfg,
            "sites": list(self.sites),
            "history": self.history,
            "best_epoch": self.best["epoch"],
            "best_val_acc": self.best["val_acc"],
            "final_val_acc": self.history[-1]["val_acc"],
            "test_acc": te["acc"],
            "test_loss": te["loss"],
            "train_time": self.history[-1]["train_time"],
            "step_time": float(np.median([r["step_time"] for r in self.history[1:]])),
            "threads": torch.get_num_threads(),
            "version": gcsurgery.__version__,
        }


def _save(obj, path: Path) -> None:
    """Writes ``obj`` atomically (a killed job leaves the previous file intact): torch.save for .pt, else JSON."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    if path.suffix == ".pt":
        torch.save(obj, tmp)
    else:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def run_file(runs_dir: Path, arm: str, seed: int, suffix: str) -> Path:
    """Where the (arm, seed) run keeps its checkpoint (``.pt``) or its summary (``.json``)."""
    return runs_dir / f"{parse_arm(arm).filename}-seed{seed}{suffix}"


def _check_config(saved: dict, cfg: dict, path: Path) -> None:
    diff = {k: (saved.get(k), cfg[k]) for k in RUN_KEYS if saved.get(k) != cfg[k]}
    if diff:
        raise GCSurgeryError(
            f"{path} was run with other settings {{name: (then, now)}} {diff}; pass the same options to resume, "
            "or write to another --out"
        )


def run_seed(seed: int, *, arms: list[str], cfg: dict, loaders, runs_dir: Path, device: torch.device) -> None:
    """Trains the unfinished runs of one seed, the arms in turns, one epoch each; writes each run's JSON."""
    train, val, test = loaders
    train.seed = seed  # the loader draws each epoch's order and augmentation from (seed, epoch)
    pending = []
    for arm in arms:
        done = run_file(runs_dir, arm, seed, ".json")
        if done.exists():
            _check_config(json.loads(done.read_text())["config"], cfg, done)
        else:
            pending.append(arm)
    steps = min(len(train), cfg["limit_batches"] or len(train))
    runs = {}
    for arm in pending:
        run = runs[arm] = Run(arm, seed, cfg, steps=steps, device=device)
        ckpt_path = run_file(runs_dir, arm, seed, ".pt")
        if ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
            _check_config(ckpt["config"], cfg, ckpt_path)
            run.load_state_dict(ckpt)
        else:
            run.history.append({**run.validate(val, device), "train_time": 0.0})
    for epoch in range(1, cfg["epochs"] + 1):
        turn = (seed + epoch) % max(1, len(pending))
        for arm in pending[turn:] + pending[:turn]:
            run = runs[arm]
            if len(run.history) != epoch:
                continue  # this epoch was done before a resume
            row = run.train_epoch(train, val, device)
            _save(run.state_dict(), run_file(runs_dir, arm, seed, ".pt"))
            print(
                f"seed {seed} epoch {epoch}/{cfg['epochs']} {arm:9}  val acc {100 * row['val_acc']:.2f}%  "
                f"train {row['train_time']:.1f} s ({1e3 * row['step_time']:.0f} ms/step)",
                flush=True,
            )
    for arm in pending:
        _save(runs[arm].summary(test, device), run_file(runs_dir, arm, seed, ".json"))
        run_file(runs_dir, arm, seed, ".pt").unlink(missing_ok=True)


# --- Report ------------------------------------------------------------------------------------------------------


def _spread(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


def _mean_std(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def crossing(accs, times, target: float) -> tuple[float | None, float | None]:
    """(epochs, seconds) at which the curve ``accs[epoch]`` first reaches ``target``, interpolated linearly."""
    for i, a in enumerate(accs):
        if a >= target:
            if i == 0:
                return 0.0, 0.0
            frac = (target - accs[i - 1]) / (a - accs[i - 1])
            return i - 1 + frac, times[i - 1] + frac * (times[i] - times[i - 1])
    return None, None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def aggregate(results: dict, *, arms: list[str], seeds: list[int], levels: list[float]) -> dict:
    """The report of ``results[(arm, seed)]`` (each run's JSON): see the module docstring."""
    out = {"arms": {}, "levels": {}}
    curve = {}
    for arm in arms:
        runs = [results[(arm, s)] for s in seeds]
        acc = np.array([[r["val_acc"] for r in run["history"]] for run in runs])  # (seeds, epochs + 1)
        secs = np.array([[r["train_time"] for r in run["history"]] for run in runs])
        curve[arm] = (acc.mean(0), secs.mean(0))
        base = [results[("baseline", s)] for s in seeds]
        pairs = list(zip(runs, base, strict=True))
        ratios = [  # per (seed, epoch): the arm's step time over the baseline's, measured in the same turn
            r["step_time"] / b["step_time"]
            for run, base_run in pairs
            for r, b in zip(run["history"][1:], base_run["history"][1:], strict=True)
        ]
        out["arms"][arm] = {
            "final_val_acc": _mean_std([r["final_val_acc"] for r in runs]),
            "final_val_diff": _mean_std([r["final_val_acc"] - b["final_val_acc"] for r, b in pairs]),
            "test_acc": _mean_std([r["test_acc"] for r in runs]),
            "test_diff": _mean_std([r["test_acc"] - b["test_acc"] for r, b in pairs]),
            "best_epoch": [r["best_epoch"] for r in runs],
            "val_curve": {"mean": acc.mean(0).tolist(), "std": acc.std(0, ddof=int(len(runs) > 1)).tolist()},
            "train_time": _mean_std([r["train_time"] for r in runs]),
            "step_time_ratio": _spread(ratios),
        }
    base_acc, _ = curve["baseline"]
    n_epochs = len(base_acc) - 1
    for f in levels:
        target = float(np.interp(f * n_epochs, np.arange(n_epochs + 1), base_acc))
        b_ep, b_s = crossing(*curve["baseline"], target)
        level = {"fraction": f, "target": target, "arms": {}}
        for arm in arms:
            ep, s = crossing(*curve[arm], target)
            histories = [results[(arm, sd)]["history"] for sd in seeds]
            per_seed = [crossing([r["val_acc"] for r in h], [r["train_time"] for r in h], target)[0] for h in histories]
            level["arms"][arm] = {
                "epochs": ep,
                "seconds": s,
                "epochs_ratio": _ratio(ep, b_ep),
                "seconds_ratio": _ratio(s, b_s),
                "per_seed_epochs": per_seed,
                "reached_seeds": sum(e is not None for e in per_seed),
            }
        out["levels"][f"{f:g}"] = level
    return out


def _pm(d: dict, scale: float = 100, signed: bool = False) -> str:
    return f"{scale * d['mean']:{'+' if signed else ''}.2f} ± {scale * d['std']:.2f}"


def _fmt(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"  # n/a: the baseline's curve starts at the level (epoch 0)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict, *, header: str) -> str:
    """The report as Markdown: the main table, then the time to each accuracy level."""
    arms, levels = report["arms"], report["levels"]
    final = levels[max(levels, key=float)]["arms"]
    rows = []
    for arm, r in arms.items():
        lv, q = final[arm], r["step_time_ratio"]
        rows.append(
            [
                arm,
                _pm(r["final_val_acc"]),
                "—" if arm == "baseline" else _pm(r["final_val_diff"], signed=True),
                _pm(r["test_acc"]),
                "—" if arm == "baseline" else _pm(r["test_diff"], signed=True),
                "not reached" if lv["epochs"] is None else f"{lv['epochs']:.2f} ({_fmt(lv['epochs_ratio'])})",
                "not reached" if lv["seconds"] is None else f"{lv['seconds']:.0f} s ({_fmt(lv['seconds_ratio'])})",
                f"{q['median']:.3f} ({q['p10']:.3f}–{q['p90']:.3f})",
            ]
        )
    head = [
        "arm",
        "final val acc (%)",
        "Δ val vs baseline (pts, paired)",
        "test acc at best val (%)",
        "Δ test (pts, paired)",
        "epochs to baseline's final (ratio)",
        "train time to it (ratio)",
        "step time ratio (p10–p90)",
    ]
    lines = [header, "", *_table(head, rows), ""]
    lines.append(
        "Epochs / train time to reach the baseline's mean val accuracy at a fraction of its epochs, as ratios to "
        "the baseline's (in parentheses: the seeds whose own curve reached it):"
    )
    head = ["arm"] + [f"{100 * lv['fraction']:g}% ({100 * lv['target']:.2f}%)" for lv in levels.values()]
    rows = []
    for arm in arms:
        cells = [arm]
        for lv in levels.values():
            a = lv["arms"][arm]
            k = f"{a['reached_seeds']}/{len(a['per_seed_epochs'])}"
            ratios = f"{_fmt(a['epochs_ratio'])} / {_fmt(a['seconds_ratio'])}"
            cells.append(f"not reached ({k})" if a["epochs"] is None else f"{ratios} ({k})")
        rows.append(cells)
    lines += ["", *_table(head, rows)]
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, path: Path, *, title: str) -> None:
    """Validation accuracy per epoch, the seed mean and a ± std band per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for arm, r in report["arms"].items():
        mean, std = 100 * np.array(r["val_curve"]["mean"]), 100 * np.array(r["val_curve"]["std"])
        x = np.arange(len(mean))
        ax.plot(x[1:], mean[1:], marker="o", ms=3, label=arm)
        ax.fill_between(x[1:], (mean - std)[1:], (mean + std)[1:], alpha=0.2)
    ax.set(xlabel="epoch", ylabel="val accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--arms",
        nargs="+",
        default=list(ARMS),
        metavar="ARM[:KEY=VALUE,...]",
        help=f"of {list(ARMS)}, or a variant such as gcgd:ode.gate_init=0.1 (see above); baseline is always included",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-size", type=int, default=None, help="a class-balanced subset of the 54000 training images")
    ap.add_argument("--val-size", type=int, default=None, help="a class-balanced subset of the 6000 validation images")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (cosine decay per step to 0)")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True, help="random crops and flips")
    ap.add_argument(
        "--levels",
        nargs="+",
        type=float,
        default=[0.5, 0.75, 0.9, 1.0],
        help="fractions of the baseline's epochs whose mean val accuracy is a target",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    ap.add_argument("--out", default="runs/time_to_accuracy", help="directory for runs/, results.*, curves.png")
    ap.add_argument("--resume", action="store_true", help="keep the finished runs in OUT/runs, continue the others")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke test: 2 epochs of 3 batches, 1 seed")
    args = ap.parse_args(argv)
    args.arms = ["baseline", *dict.fromkeys(a for a in args.arms if a != "baseline")]
    for arm in args.arms:
        parse_arm(arm)  # a bad spec fails here, before any training
    args.seeds = list(dict.fromkeys(args.seeds))
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.epochs < 1 or not args.seeds or any(not 0 < f <= 1 for f in args.levels):
        raise GCSurgeryError(
            f"need --epochs >= 1 (got {args.epochs}), at least one seed (got {args.seeds}) and --levels in (0, 1] "
            f"(got {args.levels})"
        )
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = {
        "epochs": args.epochs,
        "train_size": args.train_size,
        "val_size": args.val_size,
        "test_size": None,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "augment": args.augment,
        "limit_batches": None,
        "data": "full",
    }
    if args.quick:
        cfg.update(QUICK, data=None)  # the Debian package's data when present, else the embedded subset
    out = Path(args.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume and any(runs_dir.iterdir()):
        raise GCSurgeryError(f"{runs_dir} holds earlier runs; pass --resume to keep them, or write to another --out")
    train, val, test, description = build_data(cfg)
    print(
        f"{description}; arms {args.arms}, seeds {args.seeds}, {cfg['epochs']} epochs, "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )
    start = time.perf_counter()
    for seed in args.seeds:
        run_seed(seed, arms=args.arms, cfg=cfg, loaders=(train, val, test), runs_dir=runs_dir, device=device)
    results = {}
    for arm in args.arms:
        for seed in args.seeds:
            path = run_file(runs_dir, arm, seed, ".json")
            results[(arm, seed)] = r = json.loads(path.read_text())
            _check_config(r["config"], cfg, path)
    report = aggregate(results, arms=args.arms, seeds=args.seeds, levels=sorted({*args.levels, 1.0}))
    header = (
        f"CIFAR ResNet-20 (1 input channel) on {description}; {cfg['epochs']} epochs of batch {cfg['batch_size']}, "
        f"SGD lr {cfg['lr']} (momentum {cfg['momentum']}, wd {cfg['weight_decay']}) with cosine decay, "
        f"{'random crops and flips' if cfg['augment'] else 'no augmentation'}; seeds {args.seeds}, mean ± std over "
        "seeds; accuracy in %, differences in points."
    )
    report = {
        "description": header,
        "config": cfg,
        "arms_order": args.arms,
        "seeds": args.seeds,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "gcsurgery": gcsurgery.__version__,
        "wall_seconds_this_call": time.perf_counter() - start,
        **report,
    }
    _save(report, out / "results.json")
    md = markdown(report, header=header)
    (out / "results.md").write_text(md)
    plot_curves(report, out / "curves.png", title=f"Fashion-MNIST, ResNet-20, {len(args.seeds)} seed(s)")
    print("\n" + md + f"\nwritten to {out}/ (results.json, results.md, curves.png, runs/)")
    return report


if __name__ == "__main__":
    try:
        main()
    except GCSurgeryError as e:
        sys.exit(f"error: {e}")
