"""Time to accuracy of every arm on Fashion-MNIST: CIFAR ResNet-20 (one input channel), several seeds, one table.

    python benchmarks/time_to_accuracy.py --train-size 20000 --val-size 5000 --out runs/tta
    python benchmarks/time_to_accuracy.py --train-size 20000 --val-size 5000 --out runs/tta --resume
    python benchmarks/time_to_accuracy.py --quick --out /tmp/tta                 # smoke test, seconds

Arms: ``baseline`` (SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128, per-step cosine decay to 0), ``gcw``,
``gcode``, ``gcgd`` and ``lookahead`` (timm's Lookahead over the same SGD, k=5, alpha=0.5, slow weights
synced before each evaluation as timm's training script does), as in `gcsurgery.harness.arms`. A *variant*
of gcw, gcode or gcgd changes their options: ``ARM:KEY=VALUE,...`` with keys ``ode.<field>`` (an
`ODEOptions` field), ``gcw.<field>`` (a `GCWOptions` field) and ``sites=plan|convs`` (GC-W on the plan's
sites, or on every convolution's weight), e.g. ``gcgd:ode.gate_init=0.1,gcw.horizons=(5,50)``. Added to an
``OUT`` with ``--resume``, variants are paired with the baseline runs already there. ``--model`` and
``--opt`` change the model (any name `build_model` knows) and the base optimizer of every arm. Every arm
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
over the (seed, epoch) pairs), in wall time and in per-process CPU time.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/overhead.py; read when torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gcsurgery  # noqa: E402
from gcsurgery.errors import GCSurgeryError  # noqa: E402
from gcsurgery.harness.arms import ALL_ARMS, ARMS, parse_arm  # noqa: E402
from gcsurgery.harness.config import RunConfig, config_diff  # noqa: E402
from gcsurgery.harness.datasets import build_data  # noqa: E402
from gcsurgery.harness.report import crossing, markdown_table, mean_std, plot_curves, plus_minus, spread  # noqa: E402
from gcsurgery.harness.run import Run, RunFiles, save_atomic  # noqa: E402

QUICK = {"epochs": 2, "train_size": 200, "val_size": 100, "test_size": 100, "batch_size": 32, "limit_batches": 3}


def run_config(cfg: dict, arm: str, seed: int) -> RunConfig:
    """The `RunConfig` of one (arm, seed) under the benchmark's settings ``cfg``."""
    return RunConfig(
        model=cfg["model"], dataset="fashion_mnist", subset=cfg["data"], image_size=32, train_size=cfg["train_size"],
        val_size=cfg["val_size"], test_size=cfg["test_size"], epochs=cfg["epochs"], batch_size=cfg["batch_size"],
        opt=cfg["opt"], lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
        augment=cfg["augment"], arm=arm, seed=seed, limit_train_batches=cfg["limit_batches"], eval_untrained=True,
        device=cfg["device"], quiet=True, warmup_epochs=cfg.get("warmup_epochs", 0.0),
        nesterov=cfg.get("nesterov", False),
    )  # fmt: skip


def run_file(runs_dir: Path, arm: str, seed: int, suffix: str) -> Path:
    """Where the (arm, seed) run keeps its checkpoint (``.pt``) or its summary (``.json``)."""
    return runs_dir / f"{parse_arm(arm).filename}-seed{seed}{suffix}"


def _check_done(path: Path, cfg: RunConfig) -> dict:
    result = json.loads(path.read_text())
    diff = config_diff(result["config"], cfg)
    if diff:
        raise GCSurgeryError(
            f"{path} was run with other settings {{name: (then, now)}} {diff}; pass the same options to resume, "
            "or write to another --out"
        )
    return result


def run_seed(seed: int, *, arms: list[str], cfg: dict, data, runs_dir: Path, device: torch.device) -> None:
    """Trains the unfinished runs of one seed, the arms in turns, one epoch each; writes each run's JSON."""
    data.train.seed = seed  # the loader draws each epoch's order and augmentation from (seed, epoch)
    runs = {}
    for arm in arms:
        rc = run_config(cfg, arm, seed)
        done = run_file(runs_dir, arm, seed, ".json")
        if done.exists():
            _check_done(done, rc)
            continue
        ckpt = run_file(runs_dir, arm, seed, ".pt")
        files = RunFiles(checkpoint=ckpt, summary=done, keep_checkpoint=False)
        runs[arm] = Run(rc, data, device=device, files=files, resume=ckpt if ckpt.exists() else None)
    pending = list(runs)
    for epoch in range(1, cfg["epochs"] + 1):
        turn = (seed + epoch) % max(1, len(pending))
        for arm in pending[turn:] + pending[:turn]:  # the order rotates, so load drift hits every arm alike
            run = runs[arm]
            if run.epochs_done != epoch - 1:
                continue  # this epoch was done before a resume
            row = run.train_epoch()
            print(
                f"seed {seed} epoch {epoch}/{cfg['epochs']} {arm:9}  val acc {100 * row['val_acc']:.2f}%  "
                f"train {row['train_time']:.1f} s ({1e3 * row['step_time']:.0f} ms/step)",
                flush=True,
            )
    for run in runs.values():
        run.finish()


# --- Report ------------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _cpu_ratios(pairs) -> list[float]:
    """Per (seed, epoch): the arm's per-process CPU time per step over the baseline's (runs that recorded it)."""
    return [
        r["cpu_step_time"] / b["cpu_step_time"]
        for run, base_run in pairs
        for r, b in zip(run["history"][1:], base_run["history"][1:], strict=True)
        if r.get("cpu_step_time") and b.get("cpu_step_time")
    ]


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
            "final_val_acc": mean_std([r["final_val_acc"] for r in runs]),
            "final_val_diff": mean_std([r["final_val_acc"] - b["final_val_acc"] for r, b in pairs]),
            "test_acc": mean_std([r["test_acc"] for r in runs]),
            "test_diff": mean_std([r["test_acc"] - b["test_acc"] for r, b in pairs]),
            "best_epoch": [r["best_epoch"] for r in runs],
            "val_curve": {"mean": acc.mean(0).tolist(), "std": acc.std(0, ddof=int(len(runs) > 1)).tolist()},
            "train_time": mean_std([r["train_time"] for r in runs]),
            "step_time_ratio": spread(ratios),
            **({"cpu_step_time_ratio": spread(cpu)} if (cpu := _cpu_ratios(pairs)) else {}),
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


def _fmt(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"  # n/a: the baseline's curve starts at the level (epoch 0)


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
                plus_minus(r["final_val_acc"]),
                "—" if arm == "baseline" else plus_minus(r["final_val_diff"], signed=True),
                plus_minus(r["test_acc"]),
                "—" if arm == "baseline" else plus_minus(r["test_diff"], signed=True),
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
    lines = [header, "", *markdown_table(head, rows), ""]
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
    lines += ["", *markdown_table(head, rows)]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path, *, title: str) -> None:
    """Validation accuracy per epoch, the seed mean and a ± std band per arm."""
    curves = {arm: r["val_curve"]["mean"][1:] for arm, r in report["arms"].items()}
    bands = {arm: r["val_curve"]["std"][1:] for arm, r in report["arms"].items()}
    plot_curves(curves, path, title=title, bands=bands)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--arms",
        nargs="+",
        default=[*ARMS, "lookahead"],
        metavar="ARM[:KEY=VALUE,...]",
        help=f"of {list(ALL_ARMS)}, or a variant such as gcgd:ode.gate_init=0.1 (see above); baseline always runs",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--model", default="cifar_resnet20", help="any name build_model knows (1 input channel)")
    ap.add_argument("--opt", default="sgd", help="the base optimizer: sgd, adamw or a timm optimizer name")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-size", type=int, default=None, help="a class-balanced subset of the 54000 training images")
    ap.add_argument("--val-size", type=int, default=None, help="a class-balanced subset of the 6000 validation images")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine decay per step to 0)")
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
        "model": args.model,
        "opt": args.opt,
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
        "device": args.device,
    }
    if args.quick:
        cfg.update(QUICK, data=None)  # the Debian package's data when present, else the embedded subset
    out = Path(args.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume and any(runs_dir.iterdir()):
        raise GCSurgeryError(f"{runs_dir} holds earlier runs; pass --resume to keep them, or write to another --out")
    data = build_data(run_config(cfg, "baseline", args.seeds[0]), device=device if device.type == "cuda" else None)
    description = data.description
    print(
        f"{description}; arms {args.arms}, seeds {args.seeds}, {cfg['epochs']} epochs, "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )
    start = time.perf_counter()
    for seed in args.seeds:
        run_seed(seed, arms=args.arms, cfg=cfg, data=data, runs_dir=runs_dir, device=device)
    results = {}
    for arm in args.arms:
        for seed in args.seeds:
            results[(arm, seed)] = _check_done(run_file(runs_dir, arm, seed, ".json"), run_config(cfg, arm, seed))
    report = aggregate(results, arms=args.arms, seeds=args.seeds, levels=sorted({*args.levels, 1.0}))
    header = (
        f"{cfg['model']} (1 input channel) on {description}; {cfg['epochs']} epochs of batch {cfg['batch_size']}, "
        f"{cfg['opt']} lr {cfg['lr']} (momentum {cfg['momentum']}, wd {cfg['weight_decay']}) with cosine decay, "
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
    save_atomic(report, out / "results.json")
    md = markdown(report, header=header)
    (out / "results.md").write_text(md)
    plot_report(report, out / "curves.png", title=f"Fashion-MNIST, {cfg['model']}, {len(args.seeds)} seed(s)")
    print("\n" + md + f"\nwritten to {out}/ (results.json, results.md, curves.png, runs/)")
    return report


if __name__ == "__main__":
    try:
        main()
    except GCSurgeryError as e:
        sys.exit(f"error: {e}")
