"""Gradient-flow diagnostics of every arm on Fashion-MNIST: CIFAR ResNet-20 and its plain twin, at insertion
and after a short training.

    python benchmarks/diagnostics.py --seeds 0 1 2 --steps 100 --threads 1 --out docs/results/diagnostics
    python benchmarks/diagnostics.py --seeds 0 --steps 5 --diag-samples 16 --out /tmp/diag   # smoke test

Models: ``resnet20`` (`gcsurgery.cifar_resnet(20)`, one input channel, 28×28) and ``plain20``: the same net
with every shortcut removed (He et al. 2016's "plain" baseline, `gcsurgery.harness.models.cifar_plain`), from the
same initial weights. Arms: ``baseline`` (SGD lr 0.1, momentum 0.9, no weight decay, batch 128, constant lr),
``gcode`` (`gcify`, the same SGD), ``gcw`` (`GCOptimizer` on the plan's GC-W sites) and ``gcgd`` (both). Every
arm of a (model, seed) starts from the same weights and sees the same batches in the same order.

Each run is `gcsurgery.harness.diagnosis.train` (which ``gcsurgery diagnose`` runs too): `gcsurgery.diagnose`
on a fixed set of training images (the first ``--diag-samples`` of a seed-independent permutation) at insertion
and after ``--steps`` steps (at insertion on a copy whose BatchNorm running statistics are averaged over the
next ``--calibration`` images, since eval mode would otherwise see the initial (0, 1) statistics), and a
`GradientRecorder` every ``--every`` steps during training. Writes ``OUT/results.json`` (everything),
``OUT/results.md`` (the table, mean ± std over seeds) and ``OUT/norm_profile.png``, ``OUT/coherence.png``.
``--overhead-steps N`` also times the recorder on CIFAR ResNet-20 (3×32×32, batch 128), interleaved with and
without it.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gcsurgery as gcs
from gcsurgery.harness.diagnosis import fashion_data, plots, table, train
from gcsurgery.harness.models import cifar_resnet

ARMS = ("baseline", "gcode", "gcw", "gcgd")
MODELS = {"resnet20": "cifar_resnet20", "plain20": "cifar_plain20"}  # label: `build_model` name


def run(model_name: str, arm: str, seed: int, data, args) -> dict:
    """One (model, arm, seed): `gcsurgery.harness.diagnosis.train`, labelled ``resnet20`` / ``plain20``."""
    return train(MODELS[model_name], arm, seed, data, args, label=model_name)


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
    data = fashion_data(diag_samples=args.diag_samples, calibration=args.calibration)
    print(f"data: {data.description}; diagnostics on {len(data.diag[1])} training images", flush=True)
    summary = {"command": " ".join(["python", "benchmarks/diagnostics.py", *(argv or sys.argv[1:])])}
    results, start = [], time.perf_counter()
    summary.update(config=vars(args), data=data.description, results=results, complete=False)
    if args.overhead_steps:
        summary["overhead"] = overhead(args.overhead_steps, args.every)
        print(f"recorder overhead: {summary['overhead']}", flush=True)
    for seed in args.seeds:
        for model in args.models:
            for arm in args.arms:
                r = run(model, arm, seed, data, args)
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
