"""Gradient-flow diagnosis of arms side by side: build an arm, calibrate BatchNorm, train N steps with a
`GradientRecorder`, `diagnose` at insertion and after; the tables and the PNG plots.

``gcsurgery diagnose`` and ``benchmarks/diagnostics.py`` run this; `docs/diagnostics.md` defines every quantity.
Every arm of a (model, seed) starts from the same weights and sees the same batches in the same order.
"""

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..diagnostics import GradientRecorder, diagnose
from ..plans import plan as make_plan
from ..rewrite import is_gcified
from .arms import ARMS, build_arm, build_optimizer, parse_arm
from .data import load_fashion_mnist
from .models import build_model

__all__ = ["DiagnosisData", "arm_model", "calibrated", "fashion_data", "main", "plots", "table", "train"]


@dataclasses.dataclass(frozen=True, eq=False)
class DiagnosisData:
    """Normalised training images, the fixed images diagnosed, and those that calibrate BatchNorm at insertion.

    Attributes:
        x: (N, C, H, W) float images, normalised to mean 0 and std 1 over the whole set.
        y: (N,) labels.
        diag: ``(x, y)`` of the images `diagnose` sees, the same for every arm and seed.
        calib: (M, C, H, W) images whose batch statistics become the running statistics at insertion.
        description: what the data is and where it came from.
    """

    x: torch.Tensor
    y: torch.Tensor
    diag: tuple[torch.Tensor, torch.Tensor]
    calib: torch.Tensor
    description: str


def fashion_data(*, diag_samples: int, calibration: int, data_dir=None, subset: str | None = None) -> DiagnosisData:
    """Fashion-MNIST's training set (`load_fashion_mnist`'s order of places), split by a seed-independent
    permutation into ``diag_samples`` images to diagnose and the next ``calibration`` to calibrate on."""
    data = load_fashion_mnist(data_dir=data_dir, subset=subset)
    x = data.train_images.float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    x = (x - x.mean()) / x.std()
    y = data.train_labels
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    pick, calib = perm[:diag_samples], perm[diag_samples : diag_samples + calibration]
    return DiagnosisData(x, y, (x[pick], y[pick]), x[calib], str(data))


def _chans(model: str, data_chans: int) -> int:
    return 3 if model.startswith("torchvision:") else data_chans  # torchvision models take 3 channels only


def _inputs(x: torch.Tensor, chans: int) -> torch.Tensor:
    return x if x.shape[1] == chans else x.expand(-1, chans, -1, -1)  # grey images repeated over the channels


def arm_model(model: str, arm: str, seed: int, example: torch.Tensor, *, lr: float, momentum: float):
    """The arm's model (built under ``seed`` from `build_model`), its SGD (`GCOptimizer` for gcw, gcgd) and plan.

    Returns:
        ``(model, optimizer, plan)``; the model is in train mode, the global RNG is where ``seed`` left it.
    """
    torch.manual_seed(seed)  # the same initial weights for every arm (and for a plain twin of the same depth)
    net = build_model(model, num_classes=10, in_chans=example.shape[1])
    net, sites = build_arm(net, parse_arm(arm), example_inputs=example)
    with torch.random.fork_rng(devices=[]):
        plan = net.gc_plan if is_gcified(net) else make_plan(net, example_inputs=example)
    net.train()
    return net, build_optimizer(net, sites=sites, lr=lr, momentum=momentum), plan


def calibrated(model: nn.Module, x: torch.Tensor, batch: int) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are the average over `x`, in batches.

    At initialisation the running statistics are (0, 1), so the eval-mode network that per-sample
    diagnostics see would not be the one training starts from; the weights are not changed.
    """
    m = copy.deepcopy(model)
    for b in m.modules():
        if isinstance(b, nn.modules.batchnorm._BatchNorm):
            b.reset_running_stats()
            b.momentum = None  # cumulative average
    m.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            m(x[i : i + batch])
    return m


def train(model: str, arm: str, seed: int, data: DiagnosisData, cfg, *, label: str | None = None) -> dict:
    """Diagnoses one arm at insertion, trains it ``cfg.steps`` SGD steps with a recorder, and diagnoses it again.

    Args:
        model: a `build_model` name.
        arm: baseline, gcw, gcode or gcgd.
        seed: the initial weights' seed; the batch order comes from ``1000 + seed``.
        data: from `fashion_data`.
        cfg: anything with ``steps``, ``batch``, ``lr``, ``momentum`` and ``every`` (the recorder's period).
        label: the model's name in the result (default: ``model``).

    Returns:
        Plain data: ``model``, ``arm``, ``seed``, ``insertion`` and ``final`` (`DiagnosticReport.to_dict`),
        ``losses``, ``train_seconds``, ``recorder`` (its summary) and ``records``.
    """
    chans = _chans(model, data.x.shape[1])
    x_all, y_all = _inputs(data.x, chans), data.y
    net, opt, plan = arm_model(model, arm, seed, x_all[:2], lr=cfg.lr, momentum=cfg.momentum)
    plain_plan = None if is_gcified(net) else plan
    gcw_opt = opt if hasattr(opt, "gc_stats") else None
    diag = (_inputs(data.diag[0], chans), data.diag[1])
    out = {"model": label or model, "arm": arm, "seed": seed}
    start = calibrated(net, _inputs(data.calib, chans), cfg.batch)
    out["insertion"] = diagnose(start, diag, plan=plain_plan, chunk_size=32).to_dict()
    rec = GradientRecorder(net, plain_plan, every=cfg.every, optimizer=gcw_opt)
    g = torch.Generator().manual_seed(1000 + seed)
    epochs = cfg.steps * cfg.batch // len(y_all) + 1
    order = torch.cat([torch.randperm(len(y_all), generator=g) for _ in range(epochs)])
    losses, t0 = [], time.perf_counter()
    for t in range(cfg.steps):
        idx = order[t * cfg.batch : (t + 1) * cfg.batch]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x_all[idx]), y_all[idx])
        loss.backward()
        rec.after_backward(t)
        opt.step()
        rec.after_step(t)
        losses.append(float(loss.detach()))
    out["train_seconds"] = time.perf_counter() - t0
    out["losses"] = losses
    out["final"] = diagnose(net, diag, plan=plain_plan, optimizer=gcw_opt, chunk_size=32).to_dict()
    out["recorder"] = rec.summary()
    out["records"] = rec.records
    return out


# -- aggregation ----------------------------------------------------------------------------------------------


def _ms(values) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values, fmt="{:.3g}") -> str:
    m, s = _ms(values)
    return f"{fmt.format(m)} ± {s:.3g}"


def _ratio(report: dict) -> float:
    """h0's gradient norm over h_N's; nan where no gradient reaches h_N (a dead last state)."""
    first, last = report["states"][0]["grad_norm"], report["states"][-1]["grad_norm"]
    return first / last if last > 0 else float("nan")


def _groups(report: dict) -> dict:
    return {g["name"]: g for g in report["groups"]}


def table(results: list[dict], models, arms) -> str:
    """Markdown tables of `train` results, mean ± std over seeds: per model, the norm profile, α and GSNR per
    stage at insertion and after training, the paired differences to the baseline, the recorder's cosines,
    GC-ODE branch shares and GC-W sites, and the last training losses."""
    lines = []
    for model in models:
        runs = {a: [r for r in results if r["model"] == model and r["arm"] == a] for a in arms}
        first = next(iter(runs.values()))[0]
        states = [f"h{s['index']}" for s in first["final"]["states"]]
        stages = [g["name"] for g in first["final"]["groups"] if not g["name"].startswith("gcw:")]
        for when in ("insertion", "final"):
            lines += [f"\n### {model}, {'at insertion' if when == 'insertion' else 'after training'}", ""]
            head = ["arm", *(f"E‖∂ℓ/∂{h}‖" for h in states), f"{states[0]}/{states[-1]}", *(f"α {s}" for s in stages)]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for arm, rs in runs.items():
                cells = [_pm([r[when]["states"][i]["grad_norm"] for r in rs]) for i in range(len(states))]
                cells.append(_pm([_ratio(r[when]) for r in rs]))
                cells += [_pm([_groups(r[when])[s]["coherence"] for r in rs]) for s in stages]
                lines.append("| " + " | ".join([arm, *cells]) + " |")
            lines += ["", "| arm | " + " | ".join(f"GSNR {s}" for s in stages) + " |", "|---|" + "---|" * len(stages)]
            for arm, rs in runs.items():
                lines.append(
                    "| " + " | ".join([arm, *(_pm([_groups(r[when])[s]["gsnr"] for r in rs]) for s in stages)]) + " |"
                )
        if "baseline" in runs and len(runs) > 1:
            lines += [f"\n### {model}, after training: paired difference to the baseline of the same seed", ""]
            head = ["arm", f"{states[0]}/{states[-1]}", *(f"α {s}" for s in stages), *(f"GSNR {s}" for s in stages)]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            base = {r["seed"]: r["final"] for r in runs["baseline"]}

            for arm, rs in runs.items():
                if arm == "baseline":
                    continue
                cells = [_pm([_ratio(r["final"]) - _ratio(base[r["seed"]]) for r in rs], "{:+.3g}")]
                for key in ("coherence", "gsnr"):
                    cells += [
                        _pm([_groups(r["final"])[s][key] - _groups(base[r["seed"]])[s][key] for r in rs], "{:+.3g}")
                        for s in stages
                    ]
                lines.append("| " + " | ".join([arm, *cells]) + " |")
        lines += [f"\n### {model}, during training (recorder means over the recorded steps)", ""]
        head = ["arm", *(f"cos(g_t,g_t+1) {s}" for s in stages), *(f"cos(−g_t,ΔW) {s}" for s in stages)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm, rs in runs.items():
            cells = [_pm([r["recorder"].get(s, {}).get("cos_next") for r in rs]) for s in stages]
            cells += [_pm([r["recorder"].get(s, {}).get("cos_step") for r in rs]) for s in stages]
            lines.append("| " + " | ".join([arm, *cells]) + " |")
        gc_rows = []
        for arm, rs in runs.items():
            for b in range(len(rs[0]["final"]["branches"])):
                br = [r["final"]["branches"][b] for r in rs]
                gc_rows.append(
                    f"| {arm} | {br[0]['branch']} h{br[0]['src']}→h{br[0]['dst']} | {_pm([x['share'] for x in br])} | "
                    f"{_pm([x['cosine'] for x in br])} |"
                )
        if gc_rows:
            lines += [
                "",
                "| arm | GC-ODE branch | share of ∂ℓ/∂h_src via branch | cos(branch, main) |",
                "|---|---|---|---|",
            ]
            lines += gc_rows
        site_rows = []
        for arm, rs in runs.items():
            keys = sorted({k for r in rs for k in r["recorder"] if k.startswith("gcw-opt:")})
            for k in keys:
                d = [r["recorder"][k] for r in rs]
                own = [r["recorder"].get(f"gcw:{k.removeprefix('gcw-opt:')}", {}).get("cos_next") for r in rs]
                site_rows.append(
                    f"| {arm} | {k.removeprefix('gcw-opt:')} | {_pm([x.get('ratio') for x in d])} | "
                    f"{_pm([x.get('cos_dG_next') for x in d])} | {_pm([x.get('proposal_cosine') for x in d])} | "
                    f"{_pm(own)} |"
                )
        if site_rows:
            lines += [
                "",
                "| arm | GC-W site | ‖ΔG_t‖/‖G_t‖ | cos(ΔG_t, g_t+1) | cos(proposal, g_t+1) | cos(G_t, g_t+1) |",
                "|---|---|---|---|---|---|",
                *site_rows,
            ]
        loss = {a: _pm([statistics.fmean(r["losses"][-10:]) for r in rs]) for a, rs in runs.items()}
        lines += ["", "train loss, mean of the last 10 steps: " + ", ".join(f"{a} {v}" for a, v in loss.items())]
    return "\n".join(lines) + "\n"


def plots(results: list[dict], models, arms, out: Path) -> None:
    """Writes ``out/norm_profile.png`` and ``out/coherence.png``: per model, the arms' seed means at insertion and
    after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for kind in ("norm_profile", "coherence"):
        fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.4 * len(models)), squeeze=False)
        for i, model in enumerate(models):
            for j, when in enumerate(("insertion", "final")):
                ax = axes[i][j]
                for arm in arms:
                    rs = [r for r in results if r["model"] == model and r["arm"] == arm]
                    if kind == "norm_profile":
                        labels = [f"h{s['index']}" for s in rs[0][when]["states"]]
                        cols = [[s["grad_norm"] for s in r[when]["states"]] for r in rs]
                    else:
                        labels = [g["name"] for g in rs[0][when]["groups"] if not g["name"].startswith("gcw:")]
                        cols = [[_groups(r[when])[n]["coherence"] for n in labels] for r in rs]
                    mean = [statistics.fmean(c) for c in zip(*cols, strict=True)]
                    ax.plot(labels, mean, marker="o", label=arm)
                ax.set_yscale("log")
                ax.set_title(f"{model}, {'at insertion' if when == 'insertion' else 'after training'}", fontsize=9)
                ax.set_ylabel("E‖∂ℓ/∂h_i‖ per sample" if kind == "norm_profile" else "coherence α")
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=110)
        plt.close(fig)


# -- gcsurgery diagnose -------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """Runs ``gcsurgery diagnose``: the baseline and ``args.arm`` side by side; prints the table, writes the files."""
    import json

    from ..errors import GCSurgeryError

    if parse_arm(args.arm).arm not in ARMS:
        raise GCSurgeryError(
            f"--arm {args.arm!r}: diagnose compares one of {list(ARMS)} (or a variant) with the baseline"
        )
    for name in ("steps", "batch", "every", "samples", "calibration"):
        if getattr(args, name) < 1:
            raise GCSurgeryError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = fashion_data(
        diag_samples=args.samples, calibration=args.calibration, data_dir=args.data_dir, subset=args.subset
    )
    print(f"{data.description}; diagnostics on {len(data.diag[1])} training images", flush=True)
    arms = ["baseline"] if args.arm == "baseline" else ["baseline", args.arm]
    results = []
    for arm in arms:
        r = train(args.model, arm, args.seed, data, args)
        results.append(r)
        print(f"{args.model} [{arm}]: loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} in {args.steps} steps, "
              f"train {r['train_seconds']:.1f}s", flush=True)  # fmt: skip
    text = table(results, [args.model], arms)
    settings = ("arm", "steps", "seed", "batch", "lr", "momentum", "every", "samples", "calibration")
    line = f"gcsurgery diagnose {args.model} " + " ".join(f"--{k} {getattr(args, k)}" for k in settings)
    (out / "results.md").write_text(f"`{line}`\n\n{data.description}\n{text}")
    (out / "results.json").write_text(
        json.dumps(
            {
                "command": line,
                "data": data.description,
                "config": {k: v for k, v in vars(args).items() if k != "func"},
                "results": results,
            }
        )
    )
    plots(results, [args.model], arms, out)
    print(text)
    print(f"written to {out}/: results.md, results.json, norm_profile.png, coherence.png")
    return 0
