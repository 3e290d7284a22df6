"""Gradient-flow diagnostics of every arm on Fashion-MNIST: CIFAR ResNet-20 and its plain twin, at insertion
and after a short training.

    python benchmarks/diagnostics.py --seeds 0 1 2 --steps 100 --threads 1 --out docs/results/diagnostics
    python benchmarks/diagnostics.py --seeds 0 --steps 5 --diag-samples 16 --out /tmp/diag   # smoke test

Models: ``resnet20`` (`gcsurgery.cifar_resnet(20)`, one input channel, 28×28) and ``plain20``: the same net
with every shortcut removed (He et al. 2016's "plain" baseline, `gcsurgery.harness.models.cifar_plain`), from the
same initial weights. Arms: ``baseline`` (SGD lr 0.1, momentum 0.9, no weight decay, batch 128, constant lr),
``gcode`` (`gcify`, the same SGD), ``gcw`` (`GCOptimizer` on the plan's GC-W sites) and ``gcgd`` (both). Every
arm of a (model, seed) starts from the same weights and sees the same batches in the same order.

For each run: `gcsurgery.diagnose` on a fixed set of training images (the first ``--diag-samples`` of a
seed-independent permutation) at insertion and after ``--steps`` steps (at insertion on a copy whose BatchNorm
running statistics are averaged over the next ``--calibration`` images, since eval mode would otherwise see
the initial (0, 1) statistics), and a `GradientRecorder` every
``--every`` steps during training. Writes ``OUT/results.json`` (everything), ``OUT/results.md`` (the table,
mean ± std over seeds) and ``OUT/norm_profile.png``, ``OUT/coherence.png``. ``--overhead-steps N`` also times
the recorder on CIFAR ResNet-20 (3×32×32, batch 128), interleaved with and without it.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gcsurgery as gcs
from gcsurgery.harness.data import load_fashion_mnist
from gcsurgery.harness.models import cifar_plain, cifar_resnet

ARMS = ("baseline", "gcode", "gcw", "gcgd")
MODELS = ("resnet20", "plain20")


def _load_fashion():
    return load_fashion_mnist()


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the plain twin draws the same initial weights as the ResNet
    return (cifar_plain if name == "plain20" else cifar_resnet)(20, in_chans=1)


def build_arm(base: nn.Module, arm: str, example: torch.Tensor, lr: float, momentum: float):
    model = copy.deepcopy(base)
    with torch.random.fork_rng(devices=[]):
        plan = gcs.plan(model, example_inputs=example)
        if arm in ("gcode", "gcgd"):
            model = gcs.gcify(model, plan)
        kw = {"lr": lr, "momentum": momentum}
        if arm in ("gcw", "gcgd"):
            opt = gcs.GCOptimizer(model, torch.optim.SGD, sites=[s.param for s in plan.gcw_sites], **kw)
        else:
            opt = torch.optim.SGD(model.parameters(), **kw)
    model.train()
    return model, opt, plan


def calibrated(model: nn.Module, x: torch.Tensor, batch: int) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are the average over `x`, in batches.

    At initialisation the running statistics are (0, 1), so the eval-mode network that per-sample
    diagnostics see would not be the one training starts from; the weights are not changed.
    """
    m = copy.deepcopy(model)
    norms = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    for b in norms:
        b.reset_running_stats()
        b.momentum = None  # cumulative average
    m.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            m(x[i : i + batch])
    return m


def run(model_name, arm, seed, data, args):
    x_all, y_all, diag, calib = data
    base = build(model_name, seed)
    model, opt, plan = build_arm(base, arm, x_all[:2], args.lr, args.momentum)
    plain_plan = None if gcs.is_gcified(model) else plan
    gcw_opt = opt if arm in ("gcw", "gcgd") else None
    out = {"model": model_name, "arm": arm, "seed": seed}
    start = calibrated(model, calib, args.batch)
    out["insertion"] = gcs.diagnose(start, diag, plan=plain_plan, chunk_size=32).to_dict()
    rec = gcs.GradientRecorder(model, plain_plan, every=args.every, optimizer=gcw_opt)
    g = torch.Generator().manual_seed(1000 + seed)
    order = torch.cat(
        [torch.randperm(len(y_all), generator=g) for _ in range(args.steps * args.batch // len(y_all) + 1)]
    )
    losses, t0 = [], time.perf_counter()
    for t in range(args.steps):
        idx = order[t * args.batch : (t + 1) * args.batch]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        loss.backward()
        rec.after_backward(t)
        opt.step()
        rec.after_step(t)
        losses.append(float(loss.detach()))
    out["train_seconds"] = time.perf_counter() - t0
    out["losses"] = losses
    out["final"] = gcs.diagnose(model, diag, plan=plain_plan, optimizer=gcw_opt, chunk_size=32).to_dict()
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


def _groups(report: dict) -> dict:
    return {g["name"]: g for g in report["groups"]}


def table(results: list[dict], models, arms) -> str:
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
                cells.append(_pm([r[when]["states"][0]["grad_norm"] / r[when]["states"][-1]["grad_norm"] for r in rs]))
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

            def ratio(rep):
                return rep["states"][0]["grad_norm"] / rep["states"][-1]["grad_norm"]

            for arm, rs in runs.items():
                if arm == "baseline":
                    continue
                cells = [_pm([ratio(r["final"]) - ratio(base[r["seed"]]) for r in rs], "{:+.3g}")]
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


# -- recorder overhead ----------------------------------------------------------------------------------------


def overhead(steps: int, every: int) -> dict:
    """Per-step time of SGD training on CIFAR ResNet-20 with and without a GradientRecorder, interleaved."""
    arms = {}
    for with_rec in (False, True):
        torch.manual_seed(0)
        model = cifar_resnet(20)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rec = gcs.GradientRecorder(model, gcs.plan(model, (2, 3, 32, 32)), every=every) if with_rec else None
        arms[with_rec] = (model, opt, rec)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    times, inside = {False: [], True: []}, 0.0
    for t in range(steps + 5):
        for with_rec in (False, True) if t % 2 == 0 else (True, False):
            model, opt, rec = arms[with_rec]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            if rec is not None:
                rec.after_backward(t)
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if rec is not None:
                rec.after_step(t)
            t4 = time.perf_counter()
            if t >= 5:
                times[with_rec].append(t4 - t0)
                inside += (t2 - t1 + t4 - t3) if rec is not None else 0.0
    plain, recd = sum(times[False]), sum(times[True])
    return {
        "steps": steps,
        "every": every,
        "seconds_plain": plain,
        "seconds_recorder": recd,
        "ratio": recd / plain,
        "seconds_inside_recorder": inside,
        "inside_share": inside / recd,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--diag-samples", type=int, default=128)
    ap.add_argument("--calibration", type=int, default=1280, help="images for the BatchNorm statistics at insertion")
    ap.add_argument("--overhead-steps", type=int, default=0)
    ap.add_argument("--render", action="store_true", help="only rewrite results.md and the plots from OUT/results.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        saved = json.loads((out / "results.json").read_text())
        cfg = argparse.Namespace(**saved["config"])
        write(out, saved, cfg)
        return 0
    data = _load_fashion()
    x = data.train_images.float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    x = (x - x.mean()) / x.std()
    y = data.train_labels
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    pick, calib = perm[: args.diag_samples], perm[args.diag_samples : args.diag_samples + args.calibration]
    diag = (x[pick], y[pick])
    print(f"data: {data}; diagnostics on {len(pick)} training images", flush=True)
    summary = {"command": " ".join(["python", "benchmarks/diagnostics.py", *(argv or sys.argv[1:])])}
    results, start = [], time.perf_counter()
    summary.update(config=vars(args), data=str(data), results=results, complete=False)
    if args.overhead_steps:
        summary["overhead"] = overhead(args.overhead_steps, args.every)
        print(f"recorder overhead: {summary['overhead']}", flush=True)
    for seed in args.seeds:
        for model in args.models:
            for arm in args.arms:
                r = run(model, arm, seed, (x, y, diag, x[calib]), args)
                results.append(r)
                (out / "results.json").write_text(json.dumps(summary, indent=1))  # partial results survive a stop
                print(
                    f"seed {seed} {model:8s} {arm:8s} loss {r['losses'][0]:.3f} -> "
                    f"{statistics.fmean(r['losses'][-10:]):.3f}"
                    f"  train {r['train_seconds']:.1f}s  (total {time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
    summary["complete"] = True
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    write(out, summary, args)
    return 0


def write(out: Path, summary: dict, args) -> None:
    """Writes results.md and the plots from the (possibly partial) results."""
    runs = {(r["seed"], r["model"], r["arm"]) for r in summary["results"]}
    seeds = [s for s in args.seeds if all((s, m, a) in runs for m in args.models for a in args.arms)]
    results = [r for r in summary["results"] if r["seed"] in seeds]  # whole seeds only: every arm paired
    models, arms = args.models, args.arms
    if not results:
        print("no seed has finished every run; nothing to write")
        return
    text = table(results, models, arms)
    if "overhead" in summary:
        o = summary["overhead"]
        text += (
            f"\nGradientRecorder(every={o['every']}) on CIFAR ResNet-20, batch 128, SGD: "
            f"{o['steps']} steps interleaved, "
            f"{o['seconds_recorder']:.2f} s with vs {o['seconds_plain']:.2f} s without (ratio {o['ratio']:.3f}); "
            f"time inside the recorder's calls {o['seconds_inside_recorder'] * 1e3:.1f} ms "
            f"({100 * o['inside_share']:.3f}% of the steps with it)\n"
        )
    done = "" if summary.get("complete") else f" (stopped early: the seeds that finished every run, {seeds})"
    (out / "results.md").write_text(f"`{summary['command']}`{done}\n\n{summary['data']}\n{text}")
    plots(results, models, arms, out)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
