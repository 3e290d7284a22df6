"""Why does an arm pay in a regime? Trains runs of the regime map again with the gradient recorder, keeps their
weights, and measures the gradient flow of the trained networks.

    python benchmarks/regime_mechanism.py --regime plain56 --arms baseline gcode --seeds 0 1 \
        --out docs/results/regimes/mechanism/plain56
    python benchmarks/regime_mechanism.py --regime resnet20 --arms baseline gcode --seeds 0 --quick --out /tmp/mech

Each (arm, seed) is the regime map's run (`benchmarks/regimes.py`'s settings, `time_to_accuracy.run_config`)
trained alone in this process, one thread, with a `GradientRecorder` every ``--every`` steps; its final
validation accuracy is compared with the map's JSON of the same run in ``--map-runs`` (``reproduces``: the
recorder only reads, so they must agree). Its checkpoint is kept in ``OUT/runs/<arm>-seed<s>/`` (a later call
resumes it). `gcsurgery.diagnose` then measures, on the first ``--samples`` validation images, the network at
insertion (a copy whose BatchNorm statistics are averaged over the next ``--calibration`` validation images)
and after training (the last epoch's weights): the per-sample gradient reaching each hidden state h_i,
coherence α and GSNR per stage, and the share of the gradient reaching each GC-ODE branch's input that comes
back through the branch. The recorder adds, per epoch, the norm of each stage's weight gradient (the
mini-batch gradient the optimizer sees) and cos(g_t, g_t+1).

Writes ``OUT/<arm>-seed<s>.json`` per run (`gcsurgery.harness.diagnosis.train`'s fields, plus ``epochs``: the
recorder's per-epoch means, ``gates``: each branch's mean |γ|, and ``reproduces``), and from all of them
``OUT/results.md`` (the tables of `benchmarks/diagnostics.py` and the per-epoch stage gradient norms, paired with
the baseline), ``OUT/results.json``, ``OUT/norm_profile.png`` and ``OUT/coherence.png``. ``--report`` only
rewrites these from the runs there.
"""

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import regimes  # noqa: E402
import time_to_accuracy as tta  # noqa: E402
import torch  # noqa: E402

from gcsurgery.diagnostics import diagnose  # noqa: E402
from gcsurgery.errors import GCSurgeryError  # noqa: E402
from gcsurgery.gcode import GCODE  # noqa: E402
from gcsurgery.harness.arms import ALL_ARMS, parse_arm  # noqa: E402
from gcsurgery.harness.config import config_diff  # noqa: E402
from gcsurgery.harness.datasets import build_data  # noqa: E402
from gcsurgery.harness.diagnosis import calibrated, plots, table  # noqa: E402
from gcsurgery.harness.report import paired_interval  # noqa: E402
from gcsurgery.harness.run import Run, RunFiles, save_atomic  # noqa: E402
from gcsurgery.plans import plan as make_plan  # noqa: E402
from gcsurgery.rewrite import is_gcified  # noqa: E402


def _images(loader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys, got = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        got += len(y)
        if got >= n:
            break
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
    if len(y) < n:
        raise GCSurgeryError(f"the validation set has {len(y)} images; --samples + --calibration need {n}")
    return x, y


def _recorder_means(rows: list[dict]) -> tuple[dict, list[dict]]:
    """From a run's history rows: the recorder's mean per group and quantity over all records (its ``summary``),
    and per epoch the mean grad_norm and cos_next of each group."""
    every, epochs = {}, []
    for row in rows:
        per = {}
        for rec in row.get("diagnostics", []):
            for key, v in rec.items():
                if key == "diag/step" or not isinstance(v, float) or math.isnan(v):
                    continue
                _, group, q = key.split("/", 2)
                if "." in group and not group.startswith("gcw:"):  # a GC-W site's optimizer statistics
                    group = f"gcw-opt:{group}"
                per.setdefault(group, {}).setdefault(q, []).append(v)
                every.setdefault(group, {}).setdefault(q, []).append(v)
        if row.get("epoch", 0) > 0:
            epochs.append(
                {"epoch": row["epoch"], **{g: {q: statistics.fmean(v) for q, v in d.items()} for g, d in per.items()}}
            )
    return {g: {q: statistics.fmean(v) for q, v in d.items()} for g, d in every.items()}, epochs


def run_one(regime: str, arm: str, seed: int, args) -> dict:
    """Trains (or resumes) one run with the recorder and diagnoses it at insertion and after training."""
    cfg = regimes.regime_config(regime, quick=args.quick)
    rc = dataclasses.replace(tta.run_config(cfg, arm, seed), diagnose_every=args.every)
    data = build_data(rc)
    data.train.seed = seed  # as the map's runs: each epoch's order and augmentation from (seed, epoch)
    run_dir = Path(args.out) / "runs" / f"{parse_arm(arm).filename}-seed{seed}"
    files = RunFiles.in_dir(run_dir)
    resume = files.checkpoint if files.checkpoint.exists() else None
    x, y = _images(data.val, args.samples + args.calibration)
    diag, calib = (x[: args.samples], y[: args.samples]), x[args.samples :]
    plan = None
    run = Run(rc, data, files=files, resume=resume)
    if not is_gcified(run.model):
        with torch.random.fork_rng(devices=[]):
            plan = make_plan(run.model, example_inputs=diag[0][:2])
        run.model.train()
    out = {"model": regime, "arm": arm, "seed": seed, "config": rc.to_dict()}
    if resume is None:
        start = calibrated(run.model, calib, rc.batch_size)
        out["insertion"] = diagnose(start, diag, plan=plan, chunk_size=32).to_dict()
        save_atomic(out["insertion"], run_dir / "insertion.json")
    else:
        out["insertion"] = json.loads((run_dir / "insertion.json").read_text())
    t0 = time.perf_counter()
    while not run.done:
        row = run.train_epoch()
        print(f"{regime} {arm} seed {seed} epoch {row['epoch']}: val acc {100 * row['val_acc']:.2f}%", flush=True)
    out["train_seconds"] = time.perf_counter() - t0
    gcw_opt = run.opt if hasattr(run.opt, "gc_stats") else None  # the final weights (finish loads the best epoch's)
    out["final"] = diagnose(run.model, diag, plan=plan, optimizer=gcw_opt, chunk_size=32).to_dict()
    out["gates"] = {  # a gradient-mode branch has no gate (a buffer of ones)
        name: float(m.gate.detach().abs().mean())
        for name, m in run.model.named_modules()
        if isinstance(m, GCODE) and isinstance(m.gate, torch.nn.Parameter)
    }
    summary = run.finish()
    out["recorder"], out["epochs"] = _recorder_means(run.history)
    out["losses"] = [row["train_loss"] for row in run.history if row.get("epoch", 0) > 0]  # per epoch
    out["records"] = [rec for row in run.history for rec in row.get("diagnostics", [])]
    out["final_val_acc"] = summary["final_val_acc"]
    mapped = tta.run_file(Path(args.map_runs) / regime, arm, seed, ".json")
    if mapped.exists():
        theirs = json.loads(mapped.read_text())
        diff = config_diff(theirs["config"], rc)
        same = {"other_settings": str(diff)} if diff else {"equal": out["final_val_acc"] == theirs["final_val_acc"]}
        out["reproduces"] = {"map": str(mapped), "map_final_val_acc": theirs["final_val_acc"], **same}
    return out


def _fmt(values, spec="{:.3g}") -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "—"
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{spec.format(statistics.fmean(values))} ± {s:.2g}"


def _same(rep: dict) -> str:
    if "other_settings" in rep:
        return f"(the map's run has other settings: {rep['other_settings']})"
    return "(= the map's)" if rep["equal"] else f"(the map's: {100 * rep['map_final_val_acc']:.2f}%)"


def epoch_table(results: list[dict], arms: list[str]) -> str:
    """Per epoch and stage: the mean mini-batch weight-gradient norm per arm, and the arm's over the baseline's
    of the same seed (geometric mean of the per-seed ratios, with a 95% t interval on their logs)."""
    first = results[0]
    stages = [g["name"] for g in first["final"]["groups"] if not g["name"].startswith("gcw:")]
    lines = [
        "\n### stage weight-gradient norm ‖g‖ during training (recorder, mean per epoch)",
        "",
        "| arm | epoch | " + " | ".join(stages) + " |",
        "|---|---|" + "---|" * len(stages),
    ]
    by = {(r["arm"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    n_epochs = len(first["epochs"])

    def norm(arm, seed, e, stage):
        run = by.get((arm, seed))
        return run["epochs"][e].get(stage, {}).get("grad_norm") if run and e < len(run["epochs"]) else None

    for arm in arms:
        for e in range(n_epochs):
            cells = []
            for s in stages:
                vals = [norm(arm, sd, e, s) for sd in seeds]
                pairs = [(v, norm("baseline", sd, e, s)) for sd, v in zip(seeds, vals, strict=True)]
                logs = [math.log(a / b) for a, b in pairs if a and b]
                cell = _fmt(vals)
                if arm != "baseline" and len(logs) > 1:
                    iv = paired_interval(logs)
                    cell += f" (×{math.exp(iv['mean']):.2f} [{math.exp(iv['low']):.2f}, {math.exp(iv['high']):.2f}])"
                elif arm != "baseline" and logs:
                    cell += f" (×{math.exp(logs[0]):.2f})"
                cells.append(cell)
            lines.append(f"| {arm} | {e + 1} | " + " | ".join(cells) + " |")
    gate_rows = [
        f"| {r['arm']} | {r['seed']} | " + ", ".join(f"{k} {v:.3g}" for k, v in r["gates"].items()) + " |"
        for r in results
        if r["gates"]
    ]
    if gate_rows:
        lines += ["", "| arm | seed | mean \\|γ\\| per GC-ODE branch after training |", "|---|---|---|", *gate_rows]
    rep = [
        f"{r['arm']} seed {r['seed']}: {100 * r['final_val_acc']:.2f}% " + _same(r["reproduces"])
        for r in results
        if "reproduces" in r
    ]
    loss = {a: _fmt([r["losses"][-1] for r in results if r["arm"] == a]) for a in arms}
    lines += ["", "training loss of the last epoch: " + ", ".join(f"{a} {v}" for a, v in loss.items())]
    if rep:
        lines += ["", "final validation accuracy: " + "; ".join(rep)]
    return "\n".join(lines) + "\n"


def report(out: Path, regime: str, arms: list[str], command: str) -> str:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*-seed*.json"))]
    results = [r for r in results if r["model"] == regime and r["arm"] in arms]
    if not results:
        raise GCSurgeryError(f"no finished runs of {regime} {arms} in {out}; run without --report first")
    arms = [a for a in arms if any(r["arm"] == a for r in results)]
    steps = table(results, [regime], arms).splitlines()  # its loss line means the last 10 steps; ours are epochs
    text = "\n".join(line for line in steps if not line.startswith("train loss, mean of the last 10 steps"))
    text = f"`{command}`\n\n{text}\n" + epoch_table(results, arms)
    (out / "results.md").write_text(text)
    save_atomic({"command": command, "results": results}, out / "results.json")
    plots(results, [regime], arms, out)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--regime", default=regimes.MAIN, choices=list(regimes.REGIMES))
    ap.add_argument("--arms", nargs="+", default=["baseline", "gcode"], metavar="ARM", help=f"from {ALL_ARMS}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--every", type=int, default=5, help="the recorder's period in steps")
    ap.add_argument("--samples", type=int, default=128, help="validation images diagnosed")
    ap.add_argument("--calibration", type=int, default=1280, help="validation images calibrating BatchNorm")
    ap.add_argument("--out", default="docs/results/regimes/mechanism/plain56")
    ap.add_argument("--map-runs", default="docs/results/regimes/runs", help="the regime map's runs, to compare")
    ap.add_argument("--quick", action="store_true", help="the map's --quick settings (a smoke test)")
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the runs in --out")
    args = ap.parse_args(argv)
    for arm in args.arms:
        parse_arm(arm)  # GCSurgeryError on a bad spec, before any training
    if args.every < 1 or args.samples < 2 or args.calibration < 1:
        raise GCSurgeryError(
            f"--every {args.every}, --samples {args.samples}, --calibration {args.calibration}: "
            "need every >= 1, samples >= 2, calibration >= 1"
        )
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = (
        f"python benchmarks/regime_mechanism.py --regime {args.regime} --arms {' '.join(args.arms)} "
        f"--seeds {' '.join(map(str, args.seeds))} --every {args.every} --samples {args.samples} "
        f"--calibration {args.calibration} --out {args.out}" + (" --quick" if args.quick else "")
    )
    if not args.report:
        for seed in args.seeds:
            for arm in args.arms:
                path = out / f"{parse_arm(arm).filename}-seed{seed}.json"
                if path.exists():
                    continue
                save_atomic(run_one(args.regime, arm, seed, args), path)
    print(report(out, args.regime, args.arms, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
