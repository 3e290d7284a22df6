"""Where does gradient correction pay? A map of regimes × arms on Fashion-MNIST, paired seeds, 95% intervals.

    python benchmarks/regimes.py --jobs 2                                   # the core grid (see below)
    python benchmarks/regimes.py --regimes resnet20 --arms core extras --jobs 2   # every arm, main regime
    python benchmarks/regimes.py --report                                   # tables and plots of what is there
    python benchmarks/regimes.py --quick --out /tmp/regimes                 # smoke test, seconds

Every cell is a (regime, arm) pair; each arm is paired by seed with the baseline of its regime: the same
initial weights, the same batches in the same order, the same augmentation. The protocol of every run is
`benchmarks/time_to_accuracy.py`'s (one `Run` per (arm, seed), the arms of a seed trained in turns, one
epoch each, the validation split picking the best epoch, the test set evaluated once with its weights),
on Fashion-MNIST padded to 32x32 with random crops and flips: a class-balanced 10000 of the 54000 training
images, 3 epochs of batch 128, SGD (momentum 0.9, weight decay 5e-4, per-step cosine decay to 0), 5000
validation and the first 5000 test images — unless the regime says otherwise (`REGIMES`).

The core grid is every regime × the four core arms (baseline, gcw, gcode, gcgd). ``extras`` are the arms
the main regime (resnet20) also runs: the lead GCGD variant of the 5-seed benchmark, the gradient-only
GC-ODE (forward exactly the original network's), GC-ODE without its ODE (a linear shortcut), and the
peers Lookahead (timm), SAM and Gradient Centralization (pytorch-optimizer), and GC-W on centralised
gradients (``gcw:peer=gradcent``), and the control for GC-W as a longer step: plain SGD with the
learning rate of GC-W's three sites alone ×1.12 (``baseline:site_lr=1.12``; 1.12 from
``docs/results/regimes/mechanism/``).

``--jobs N`` trains N seeds at once, in separate processes of one thread each. Each (regime, arm, seed) run
keeps a checkpoint after every epoch and a JSON when done, in ``OUT/runs/<regime>/``; a later call continues
unfinished runs and skips finished ones, so the map fills a piece at a time. ``--report`` (and the end of
every call) writes ``OUT/results.json``, ``OUT/results.md``, ``OUT/map.png`` (the heatmap) and
``OUT/curves-<regime>.png`` from every finished run there: per cell the paired difference of the final
validation accuracy with its 95% Student-t interval and a verdict (pays: the interval lies above 0; hurts:
below; within noise: it holds 0; and how many of its runs diverged, their training loss NaN), the same for the
test accuracy at the best validation epoch, the epochs and the training wall time each seed needs to reach its
own baseline's final validation accuracy, as a ratio to what the baseline needs (mean over the seeds that
reach it, with its interval), and the step-time ratio; the cells of the core grid still missing, with the time
they need at the measured speed (a regime with no finished run: the measured regime's speed scaled by forward
FLOPs per image times images trained on), and per regime the commands that train what is there.
"""

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/overhead.py; read when torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_to_accuracy as tta  # noqa: E402

import gcsurgery  # noqa: E402
from gcsurgery.errors import GCSurgeryError  # noqa: E402
from gcsurgery.harness.arms import ARMS, parse_arm  # noqa: E402
from gcsurgery.harness.datasets import build_data  # noqa: E402
from gcsurgery.harness.report import crossing, markdown_table, mean_std, paired_interval, plot_curves  # noqa: E402
from gcsurgery.harness.run import save_atomic  # noqa: E402

BASE = {
    "model": "cifar_resnet20", "opt": "sgd", "epochs": 3, "train_size": 10000, "val_size": 5000,
    "test_size": 5000, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "augment": True,
    "limit_batches": None, "data": "full", "warmup_epochs": 0.0,
}  # fmt: skip
REGIMES = {  # name: (what it asks, overrides of BASE)
    "resnet20": ("CIFAR ResNet-20 (the main regime)", {}),
    "resnet56": ("CIFAR ResNet-56: deeper, with shortcuts", {"model": "cifar_resnet56"}),
    "plain20": ("plain 20-layer net (no shortcuts)", {"model": "cifar_plain20"}),
    "plain56": (
        "plain 56-layer net (no shortcuts; He et al.'s degradation), 1 warm-up epoch so that SGD is stable",
        {"model": "cifar_plain56", "warmup_epochs": 1.0},
    ),
    "lr0.01": ("ResNet-20, SGD lr 0.01 (x0.1 of the tuned 0.1)", {"lr": 0.01}),
    "lr0.3": ("ResNet-20, SGD lr 0.3 (x3)", {"lr": 0.3}),
    "adamw": ("ResNet-20, AdamW lr 2e-3, weight decay 0.05", {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.05}),
    "full-data": ("ResNet-20 on all 54000 training images, 2 epochs", {"train_size": None, "epochs": 2}),
    "timm-resnet10t": ("timm's resnet10t (one input channel, 32x32)", {"model": "timm:resnet10t"}),
}
MAIN = "resnet20"
CORE = list(ARMS)
EXTRAS = [
    "gcgd:gcw.lr=0.01,ode.gate_init=0.1",  # the lead variant of the 5-seed run
    "gcode:ode.mode=gradient",  # the exact forward, the branch's gradient injected
    "gcode:ode.solver=none",  # no ODE: E(R(h_src)), a linear stage-spanning shortcut
    "lookahead",
    "sam",
    "gradcent",
    "gcw:peer=gradcent",  # GC-W on top of the best peer: does it add to it?
    "baseline:site_lr=1.12",  # no corrector, GC-W's sites at 1.12x the lr: is GC-W a longer step there?
]
QUICK = {"epochs": 2, "train_size": 200, "val_size": 100, "test_size": 100, "batch_size": 32, "limit_batches": 3}
SEEDS = [0, 1, 2, 3, 4]
FASHION_MNIST_TRAIN = 60000  # its training images, the validation split cut from them


def regime_config(name: str, *, quick: bool = False, device: str = "cpu") -> dict:
    """The `time_to_accuracy` settings of regime ``name``."""
    cfg = {**BASE, **REGIMES[name][1], "device": device}
    if quick:
        cfg.update(QUICK, data=None, epochs=min(cfg["epochs"], QUICK["epochs"]))
    return cfg


def _unit(
    regime: str, seed: int, arms: list[str], out: str, quick: bool, device: str, call: str
) -> tuple[str, int, float]:
    """Trains the unfinished runs of one (regime, seed), one thread, and marks them with ``call`` (the command's
    start); returns (regime, seed, seconds)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    cfg = regime_config(regime, quick=quick, device=device)
    dev = torch.device(device)
    data = build_data(tta.run_config(cfg, "baseline", seed), device=dev if dev.type == "cuda" else None)
    runs_dir = Path(out) / "runs" / regime
    runs_dir.mkdir(parents=True, exist_ok=True)
    done = {arm for arm in arms if tta.run_file(runs_dir, arm, seed, ".json").exists()}
    tta.run_seed(seed, arms=arms, cfg=cfg, data=data, runs_dir=runs_dir, device=dev)
    for arm in set(arms) - done:  # the runs this call trained in turns: their times compare with each other
        path = tta.run_file(runs_dir, arm, seed, ".json")
        save_atomic({**json.loads(path.read_text()), "call": call}, path)
    return regime, seed, time.perf_counter() - start


# --- report -------------------------------------------------------------------------------------------------------


def _finished(out: Path, regime: str, quick: bool) -> dict:
    """``{(arm, seed): summary}`` of the finished runs of ``regime`` made with its current settings."""
    runs_dir, found = out / "runs" / regime, {}
    if not runs_dir.is_dir():
        return found
    cfg = regime_config(regime, quick=quick)
    for path in sorted(runs_dir.glob("*-seed*.json")):
        summary = json.loads(path.read_text())
        arm, seed = summary["arm"], summary["seed"]
        found[(arm, seed)] = tta._check_done(path, tta.run_config(cfg, arm, seed))
    return found


def _ratio_stats(values: list[float | None]) -> dict:
    reached = [v for v in values if v is not None and math.isfinite(v)]
    out = {"reached": len(reached), "n": len(values)}
    if reached:
        iv = paired_interval(reached) if len(reached) > 1 else {"mean": reached[0], "low": None, "high": None}
        out.update(mean=iv["mean"], low=iv["low"], high=iv["high"])
    return out


def _diverged(run: dict) -> bool:
    """Whether the run's training loss went non-finite (its weights NaN: it ends at chance accuracy)."""
    return any(not math.isfinite(r.get("train_loss", 0.0)) for r in run["history"])


def _verdict(arm: str, c: dict) -> str:
    diverged = f" ({c['diverged']} of {len(c['seeds'])} diverged)" if c.get("diverged") else ""
    return ("—" if arm == "baseline" else c["val_diff"]["verdict"]) + diverged


def cell(results: dict, arm: str) -> dict | None:
    """The statistics of one arm of a regime, over the seeds where it and the baseline both finished."""
    seeds = sorted(s for a, s in results if a == arm and ("baseline", s) in results)
    if not seeds:
        return None
    runs = [results[(arm, s)] for s in seeds]
    base = [results[("baseline", s)] for s in seeds]
    epochs, seconds, cpu, step = [], [], [], []
    for run, b in zip(runs, base, strict=True):
        same_call = run.get("call") is not None and run.get("call") == b.get("call")
        target = b["final_val_acc"]  # each seed's own baseline final
        hist, bh = run["history"], b["history"]
        e_arm = crossing([r["val_acc"] for r in hist], [r["train_time"] for r in hist], target)
        e_base = crossing([r["val_acc"] for r in bh], [r["train_time"] for r in bh], target)
        epochs.append(e_arm[0] / e_base[0] if e_arm[0] is not None and e_base[0] else None)
        if not same_call:  # trained in another command than its baseline, under other load: times do not compare
            continue
        seconds.append(e_arm[1] / e_base[1] if e_arm[1] is not None and e_base[1] else None)
        c_arm = crossing([r["val_acc"] for r in hist], [r.get("cpu_time", 0.0) for r in hist], target)[1]
        c_base = crossing([r["val_acc"] for r in bh], [r.get("cpu_time", 0.0) for r in bh], target)[1]
        cpu.append(c_arm / c_base if c_arm is not None and c_base else None)
        step += [r["step_time"] / q["step_time"] for r, q in zip(hist[1:], bh[1:], strict=True)]
    return {
        "seeds": seeds,
        "final_val_acc": mean_std([r["final_val_acc"] for r in runs]),
        "val_diff": paired_interval([r["final_val_acc"] - b["final_val_acc"] for r, b in zip(runs, base, strict=True)]),
        "test_diff": paired_interval([r["test_acc"] - b["test_acc"] for r, b in zip(runs, base, strict=True)]),
        "epochs_ratio": _ratio_stats(epochs),
        "wall_ratio": _ratio_stats(seconds),
        "cpu_ratio": _ratio_stats(cpu),
        "step_time_ratio": float(np.median(step)) if step else None,
        "diverged": sum(_diverged(r) for r in runs),
        "run_seconds": float(np.median([r["train_time"] for r in runs])),
        "curve": np.mean([[r["val_acc"] for r in run["history"]] for run in runs], 0).tolist(),
    }


def _interval(d: dict, scale: float = 100) -> str:
    if d.get("low") is None:
        return f"{scale * d['mean']:+.2f}"
    return f"{scale * d['mean']:+.2f} [{scale * d['low']:+.2f}, {scale * d['high']:+.2f}]"


def _ratio_text(d: dict) -> str:
    if not d["n"]:
        return "— (not trained with its baseline)"
    if not d["reached"]:
        return f"not reached (0/{d['n']})"
    if d.get("low") is None:
        return f"{d['mean']:.2f} ({d['reached']}/{d['n']})"
    return f"{d['mean']:.2f} [{d['low']:.2f}, {d['high']:.2f}] ({d['reached']}/{d['n']})"


def run_cost(regime: str) -> float:
    """The relative training cost of one run of ``regime``: its model's forward FLOPs on one image, times the
    images it trains on; what an unmeasured regime's runs are estimated from."""
    from torch.utils.flop_counter import FlopCounterMode

    from gcsurgery.harness.config import RunConfig
    from gcsurgery.harness.loader import split_train_val
    from gcsurgery.harness.models import build_model

    cfg = regime_config(regime)
    with torch.random.fork_rng():
        model = build_model(cfg["model"], num_classes=10, in_chans=1).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        model(torch.zeros(1, 1, 32, 32))
    images = cfg["train_size"] or len(split_train_val(FASHION_MNIST_TRAIN, val_fraction=RunConfig.val_fraction)[0])
    return flops.get_total_flops() * images * cfg["epochs"]


def _missing(report: dict, seeds: list[int]) -> list[dict]:
    """The core-grid cells (and the main regime's extras) with fewer than ``len(seeds)`` paired seeds, each with
    the seconds one more run takes: measured in its regime, else scaled by `run_cost` from the measured regime
    that ran fastest for its cost (the one least slowed by other jobs)."""
    todo = []
    measured = {
        regime: float(np.median([c["run_seconds"] for c in r["arms"].values()]))
        for regime, r in report["regimes"].items()
        if r["arms"]
    }
    ref = None
    if measured and set(REGIMES) - set(measured):
        costs = {regime: run_cost(regime) for regime in REGIMES}
        ref = min(measured, key=lambda r: measured[r] / costs[r])
    for regime in REGIMES:
        arms = CORE + (EXTRAS if regime == MAIN else [])
        cells = report["regimes"].get(regime, {}).get("arms", {})
        for arm in arms:
            have = len(cells[arm]["seeds"]) if arm in cells else 0
            if have >= len(seeds):
                continue
            per_run, estimated = measured.get(regime), False
            if per_run is None and ref is not None:
                per_run, estimated = measured[ref] * costs[regime] / costs[ref], True
            todo.append({"regime": regime, "arm": arm, "seeds": have, "per_run_s": per_run, "estimated": estimated})
    return todo


def _stacked(results: dict) -> dict:
    """For each arm stacked on a peer (``ARM:peer=P``), its paired difference to P alone, over their common seeds."""
    out = {}
    for arm in dict.fromkeys(a for a, _ in sorted(results)):
        peer = parse_arm(arm).peer
        seeds = sorted(s for a, s in results if a == arm and (peer, s) in results) if peer else []
        if not seeds:
            continue
        pairs = [(results[(arm, s)], results[(peer, s)]) for s in seeds]
        out[arm] = {
            "vs": peer,
            "seeds": seeds,
            "val_diff": paired_interval([r["final_val_acc"] - q["final_val_acc"] for r, q in pairs]),
            "test_diff": paired_interval([r["test_acc"] - q["test_acc"] for r, q in pairs]),
        }
    return out


def aggregate(out: Path, *, quick: bool, seeds: list[int]) -> dict:
    report = {"regimes": {}}
    for regime, (what, over) in REGIMES.items():
        results = _finished(out, regime, quick)
        if not results:
            continue
        arms = list(dict.fromkeys([*CORE, *EXTRAS, *(a for a, _ in sorted(results))]))
        cells = {arm: c for arm in arms if (c := cell(results, arm)) is not None}
        report["regimes"][regime] = {"what": what, "overrides": over, "arms": cells, "stacked": _stacked(results)}
    report["missing"] = _missing(report, seeds)
    return report


def regime_commands(command: str, regime: str, cells: dict) -> list[str]:
    """The commands that train the runs of ``regime``'s cells: one per set of seeds its arms were run at."""
    by_seeds: dict[tuple, list[str]] = {}
    for arm, c in cells.items():
        if arm != "baseline":
            by_seeds.setdefault(tuple(c["seeds"]), []).append(arm)
    out = []
    for seeds, arms in by_seeds.items() or [(tuple(cells["baseline"]["seeds"]), [])]:
        seeds_arg = "" if list(seeds) == SEEDS else f" --seeds {' '.join(map(str, seeds))}"
        arms_arg = " core" if arms == CORE[1:] else "".join(f" {a}" for a in ["baseline", *arms])
        out.append(f"{command} --regimes {regime} --arms{arms_arg}{seeds_arg}")
    return out


def markdown(report: dict, *, header: str, command: str) -> str:
    lines = [header, ""]
    head = [
        "arm", "seeds", "final val acc (%)", "Δ val, pts [95% CI]", "verdict", "Δ test, pts [95% CI]",
        "epochs to baseline final (ratio)", "wall time to it (ratio)", "CPU time to it (ratio)", "step time ratio",
    ]  # fmt: skip
    for regime, r in report["regimes"].items():
        lines += [f"## {regime}: {r['what']}", ""]
        lines += [f"`{c}`" for c in regime_commands(command, regime, r["arms"])]
        lines.append("")
        rows = []
        for arm, c in r["arms"].items():
            rows.append(
                [
                    arm,
                    str(len(c["seeds"])),
                    f"{100 * c['final_val_acc']['mean']:.2f} ± {100 * c['final_val_acc']['std']:.2f}",
                    "—" if arm == "baseline" else _interval(c["val_diff"]),
                    _verdict(arm, c),
                    "—" if arm == "baseline" else _interval(c["test_diff"]),
                    _ratio_text(c["epochs_ratio"]),
                    _ratio_text(c["wall_ratio"]),
                    _ratio_text(c["cpu_ratio"]),
                    "—" if c["step_time_ratio"] is None else f"{c['step_time_ratio']:.2f}",
                ]
            )
        lines += [*markdown_table(head, rows), ""]
        if r.get("stacked"):
            stacked = [
                [
                    arm,
                    d["vs"],
                    str(len(d["seeds"])),
                    _interval(d["val_diff"]),
                    d["val_diff"]["verdict"],
                    _interval(d["test_diff"]),
                ]
                for arm, d in r["stacked"].items()
            ]
            lines += ["On top of a peer, paired with the peer alone (same seeds):", ""]
            head2 = ["arm", "vs", "seeds", "Δ val, pts [95% CI]", "verdict", "Δ test, pts [95% CI]"]
            lines += [*markdown_table(head2, stacked), ""]
    if report["missing"]:
        lines += ["## Missing cells", ""]
        for m in report["missing"]:
            lines.append(f"- {m['regime']} × {m['arm']}: {m['seeds']}/{len(SEEDS)} seeds")
        lines.append("")
        if any(m["per_run_s"] is None for m in report["missing"]):
            lines.append("No run has finished yet, so there is no speed to estimate their time from.")
        else:  # evaluation and start-up (x1.25) on top of the training time
            total = sum((len(SEEDS) - m["seeds"]) * m["per_run_s"] * 1.25 for m in report["missing"])
            lines.append(
                f"At the measured speed (one thread per run), they need about {total / 3600:.1f} core-hours more "
                f"({total / 7200:.1f} h with --jobs 2)"
                + (
                    "; a regime with no finished run is estimated from a measured one, scaled by forward FLOPs "
                    "per image times the images trained on."
                    if any(m["estimated"] for m in report["missing"])
                    else "."
                )
            )
    return "\n".join(lines) + "\n"


def plot_map(report: dict, path: Path) -> None:
    """The heatmap: regimes × arms, colour = mean Δ val (points), the interval and the verdict written in; every
    regime has its row, a cell with no paired run a dash."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(REGIMES)
    cells = {regime: report["regimes"].get(regime, {}).get("arms", {}) for regime in regimes}
    arms = list(dict.fromkeys([*CORE[1:], *(a for r in cells.values() for a in r if a != "baseline")]))
    grid = np.full((len(regimes), len(arms)), np.nan)
    for i, regime in enumerate(regimes):
        for j, arm in enumerate(arms):
            c = cells[regime].get(arm)
            if c is not None:
                grid[i, j] = 100 * c["val_diff"]["mean"]
    # the colours span ±3 points at most: a diverged cell (tens of points) would wash out the rest
    lim = min(3.0, max(0.5, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.5))
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(arms), 1.0 + 0.62 * len(regimes)), dpi=120)
    ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    mark = {"pays": "▲ pays", "hurts": "▼ hurts", "within noise": "noise", "unknown": "1 seed"}
    for i, regime in enumerate(regimes):
        for j, arm in enumerate(arms):
            c = cells[regime].get(arm)
            if c is None:
                ax.text(j, i, "—", ha="center", va="center", color="grey")
                continue
            v = c["val_diff"]
            ci = "" if v["low"] is None else f"\n[{100 * v['low']:+.2f}, {100 * v['high']:+.2f}]"
            diverged = f", {c['diverged']} NaN" if c.get("diverged") else ""
            text = f"{100 * v['mean']:+.2f}{ci}\n{mark[v['verdict']]} (n={v['n']}{diverged})"
            dark = abs(100 * v["mean"]) > 0.6 * lim
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    ax.set_xticks(range(len(arms)), [a.replace(":", ":\n").replace(",", ",\n") for a in arms], fontsize=7)
    ax.set_yticks(range(len(regimes)), regimes, fontsize=8)
    ax.set_title(
        f"Δ final val accuracy vs the paired baseline (points), 95% t interval; colours clipped at ±{lim:g}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, *, quick: bool, command: str) -> dict:
    report = aggregate(out, quick=quick, seeds=SEEDS)
    base = regime_config(MAIN, quick=quick)
    header = (
        f"# Regime map\n\nFashion-MNIST (padded to 32x32, random crops and flips); unless a regime says otherwise "
        f"{base['train_size']} training images, {base['epochs']} epochs of batch {base['batch_size']}, SGD lr "
        f"{base['lr']} (momentum {base['momentum']}, weight decay {base['weight_decay']}, cosine decay), "
        f"{base['val_size']} validation and {base['test_size']} test images. Each arm is paired by seed with the "
        "baseline of its regime; Δ in accuracy points with a 95% Student-t interval over the seeds; ratios are the "
        "arm's over the baseline's, per seed, to each seed's own baseline final validation accuracy (in brackets the "
        "seeds that reach it). Runs train one thread each, two at a time on 2 cores; time ratios pair the arms "
        "of a seed that trained in turns in one process (one command; an arm added later shows none), and "
        "CPU-time ratios (the process's own CPU time) are the "
        "ones other jobs on the machine disturb least."
    )
    report = {"description": header, "base": base, "regime_settings": REGIMES, "torch": torch.__version__,
              "gcsurgery": gcsurgery.__version__, "command": command, **report}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_atomic(report, out / "results.json")
    (out / "results.md").write_text(markdown(report, header=header, command=command))
    if report["regimes"]:
        plot_map(report, out / "map.png")
    for regime, r in report["regimes"].items():
        curves = {arm: c["curve"][1:] for arm, c in r["arms"].items()}
        plot_curves(curves, out / f"curves-{regime}.png", title=f"Fashion-MNIST, {regime}, mean over seeds")
    return report


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES), metavar="REGIME")
    ap.add_argument(
        "--arms",
        nargs="+",
        default=["core"],
        metavar="ARM",
        help="arm specs, or 'core' (baseline gcw gcode gcgd) and 'extras' (the main regime's other arms); "
        "baseline always runs",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once, one process of one thread each")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="docs/results/regimes")
    ap.add_argument("--report", action="store_true", help="train nothing; write the report of the runs there")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 2 epochs of 3 batches of 32 images")
    args = ap.parse_args(argv)
    arms = []
    for a in args.arms:
        arms += CORE if a == "core" else EXTRAS if a == "extras" else [a]
    args.arms = ["baseline", *dict.fromkeys(a for a in arms if a != "baseline")]
    for arm in args.arms:
        parse_arm(arm)  # a bad spec fails here, before any training
    if args.jobs < 1:
        raise GCSurgeryError(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    command = "python benchmarks/regimes.py --jobs 2" + (" --quick" if args.quick else "")
    command += f" --out {args.out}" if args.out != "docs/results/regimes" else ""
    if not args.report:
        units = [(r, s) for r in args.regimes for s in args.seeds]
        print(f"{len(units)} (regime, seed) units, arms {args.arms}, {args.jobs} at a time", flush=True)
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            call = time.strftime("%Y-%m-%dT%H:%M:%S")
            futures = [pool.submit(_unit, r, s, args.arms, str(out), args.quick, args.device, call) for r, s in units]
            for f in as_completed(futures):
                regime, seed, secs = f.result()
                print(f"done: {regime} seed {seed} in {secs:.0f} s", flush=True)
    report = write_report(out, quick=args.quick, command=command)
    print((out / "results.md").read_text())
    return report


if __name__ == "__main__":
    try:
        main()
    except GCSurgeryError as e:
        sys.exit(f"error: {e}")
