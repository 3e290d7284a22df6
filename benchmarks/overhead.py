"""Train-step time and peak memory of each arm vs the plain model with its plain optimizer, measured in one run.

    python benchmarks/overhead.py                                   # both models, 2 threads, CPU
    python benchmarks/overhead.py --threads 1 --json overhead.json
    python benchmarks/overhead.py --device cuda --rounds 20

Models: CIFAR ResNet-20 at batch 128 on 3×32×32, torchvision ResNet-18 (1000 classes) at batch 32 on
3×64×64 (the default pair); ``torchvision:resnet18@224`` and ``torchvision:resnet50@224`` at batch 32 on
3×224×224, the ImageNet-scale cases, e.g.
``python benchmarks/overhead.py --models torchvision:resnet18@224 --threads 1 --rounds 3 --steps 1``.
Arms (as in `gcsurgery.harness.arms`): ``baseline`` (SGD, lr 0.1, momentum 0.9, wd 5e-4),
``gcw`` (`GCOptimizer` on the plan's GC-W sites of the plain model), ``gcode`` (`gcify` + SGD),
``gcgd`` (`gcify` + `GCOptimizer`). One step is zero_grad, forward, cross-entropy, backward, step,
on a few fixed random batches.

Time: after ``--warmup`` steps per arm, ``--rounds`` rounds visit the arms in turn (the order rotates
each round), ``--steps`` timed steps each. An arm's step time is the median (p10-p90) of all its
steps; its time ratio is the median (p10-p90) over rounds of (its median step / the baseline's median
step in the same round), so load drift cancels out in each ratio; "95% CI" is the geometric mean of those
per-round ratios with its Student-t interval (over log ratios), what the rounds can tell. ``--cpu-time``
(with ``--threads 1``, CPU only) times each step by the main thread's CPU time instead of the wall clock:
what a step costs when other work or a virtual machine's neighbours take the core away for part of it.

Memory: each arm also runs alone in a fresh process (after a throwaway step that loads every module
and kernel a step needs), for

- ``peak``: the most bytes held in torch's allocator during a train step: the tensors that live across
  steps (weights, buffers, optimizer and GC-W state, the batch) plus the step's own peak, replayed from
  the profiler's memory events. Repeatable (no allocator caches or fragmentation in it); on CUDA it is
  ``torch.cuda.max_memory_allocated``.
- ``rss``: ``ru_maxrss`` over a few steps (reset after the warm-up through ``/proc/self/clear_refs``)
  minus the process's RSS before the arm was built: what the operating system sees, allocator caches
  and fragmentation included, hence noisier (arm-to-arm differences of ±10 % are noise). CPU only.

and, in this process, ``saved``: the bytes autograd keeps for backward during one forward (distinct
storages, parameters and the input batch excluded): the activation memory, which is what GC-ODE
branches add. Branches that recompute in backward keep only their inputs there; the recomputation
shows in ``peak``.
"""

import argparse
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: with more runnable threads than cores (shared machines)
# spinning threads make 2-thread steps several times slower. Read when torch loads, hence set first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gcsurgery  # noqa: E402
from gcsurgery.errors import GCSurgeryError  # noqa: E402
from gcsurgery.harness.arms import ARMS, build_arm, build_optimizer  # noqa: E402
from gcsurgery.harness.models import build_model  # noqa: E402
from gcsurgery.harness.report import paired_interval  # noqa: E402

SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
N_BATCHES = 4  # distinct random batches the steps cycle through


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    """A model and the batch it is timed on."""

    model: str
    batch: int
    input: tuple[int, int, int]  # (C, H, W)
    num_classes: int


CASES = {
    "cifar_resnet20": Case(model="cifar_resnet20", batch=128, input=(3, 32, 32), num_classes=10),
    "torchvision:resnet18": Case(model="torchvision:resnet18", batch=32, input=(3, 64, 64), num_classes=1000),
    # the ImageNet-scale targets of docs/gcw.md (slow on a CPU: a few seconds a step at one thread)
    "torchvision:resnet18@224": Case(model="torchvision:resnet18", batch=32, input=(3, 224, 224), num_classes=1000),
    "torchvision:resnet50@224": Case(model="torchvision:resnet50", batch=32, input=(3, 224, 224), num_classes=1000),
}
DEFAULT_CASES = ["cifar_resnet20", "torchvision:resnet18"]


def build(case: Case, arm: str, device: torch.device):
    """The arm's model and optimizer; every arm starts from the same weights (seed 0)."""
    torch.manual_seed(0)
    model = build_model(case.model, num_classes=case.num_classes, in_chans=case.input[0])
    model, sites = build_arm(model, arm, example_inputs=torch.zeros(2, *case.input))
    model.to(device)
    return model, build_optimizer(model, sites=sites, **SGD), sites


def batches(case: Case, device: torch.device, *, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(N_BATCHES):
        x = torch.randn(batch, *case.input, generator=g)  # (B, C, H, W)
        y = torch.randint(0, case.num_classes, (batch,), generator=g)  # (B,)
        out.append((x.to(device), y.to(device)))
    return out


def train_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(model, x, y) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward, parameters and ``x`` excluded."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(n for ptr, n in storages.items() if ptr not in skip)


def _rss_kb() -> int:
    """The current resident set size in kB (Linux), else the peak so far."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM, hence ru_maxrss) to the current RSS
        return True
    except OSError:
        return False


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the distinct tensor storages in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        s = obj.untyped_storage()
        if s.data_ptr() in seen:
            return 0
        seen.add(s.data_ptr())
        return s.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def allocator_peak(model, opt, x, y) -> int:
    """Peak bytes held in torch's CPU allocator over one train step.

    What lives across steps (weights, buffers, optimizer and GC-W state, the batch) is counted from the
    tensors themselves; the step's own peak comes from the profiler's memory events, replayed in order.
    """
    static = _tensor_bytes([model.state_dict(), opt.state_dict(), x, y], set())
    with tempfile.TemporaryDirectory() as tmp:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            train_step(model, opt, x, y)
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    live, now, peak = {}, 0, 0
    for a in sorted(events, key=lambda a: a["Ev Idx"]):
        if a.get("Device Type", 0) != 0:  # CPU only
            continue
        if a["Bytes"] > 0:
            live[a["Addr"]] = a["Bytes"]
            now += a["Bytes"]
            peak = max(peak, now)
        else:  # frees of tensors allocated before the step (last step's gradients) are not in `live`
            now -= live.pop(a["Addr"], 0)
    return static + peak


def child_memory(case: Case, arm: str, *, device: torch.device, batch: int, steps: int) -> dict:
    """Runs in a fresh process: the memory one arm's training takes (see the module docstring)."""
    model, opt, _ = build(case, "gcgd", device)  # loads every module and kernel a step uses (fx, fake tensors...)
    train_step(model, opt, *batches(case, device, batch=2)[0])
    del model, opt
    gc.collect()
    idle_kb = _rss_kb()
    model, opt, _ = build(case, arm, device)
    data = batches(case, device, batch=batch)
    for x, y in data[:2]:  # optimizer state and allocator caches exist from here on
        train_step(model, opt, x, y)
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = _reset_peak_rss()
    for i in range(steps):
        train_step(model, opt, *data[i % len(data)])
    sync(device)
    if device.type == "cuda":
        return {"peak_kind": "cuda_max_memory_allocated", "peak_bytes": torch.cuda.max_memory_allocated(device)}
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_kind": "cpu_allocator_profiler",
        "peak_bytes": allocator_peak(model, opt, *data[0]),
        "rss_bytes": 1024 * (peak_kb - idle_kb),
        "peak_rss_bytes": 1024 * peak_kb,
        "rss_peak_reset": reset,
    }


def measure_memory(case: Case, arm: str, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        arm,
        "--models",
        next(k for k, c in CASES.items() if c == case),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch or case.batch),
        "--memory-steps",
        str(args.memory_steps),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the memory run of {case.model} [{arm}] failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_arms(
    arms: dict, data, *, device, rounds: int, steps: int, warmup: int, clock=time.perf_counter
) -> dict[str, list[list[float]]]:
    """Seconds per step, ``times[arm][round][step]``, the arms visited in a rotating order each round."""
    names = list(arms)
    for name in names:
        for i in range(warmup):
            train_step(*arms[name], *data[i % len(data)])
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            ts = []
            for i in range(steps):
                x, y = data[(r * steps + i) % len(data)]
                sync(device)
                t0 = clock()
                train_step(*arms[name], x, y)
                sync(device)
                ts.append(clock() - t0)
            times[name].append(ts)
    return times


def _spread(values, scale: float = 1.0) -> dict[str, float]:
    v = np.asarray(values, dtype=float) * scale
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


def ratio_interval(ratios) -> dict[str, float | None]:
    """Geometric mean of per-round ratios and its 95% Student-t interval (`paired_interval` of the log ratios)."""
    iv = paired_interval(np.log(np.asarray(ratios, dtype=float)))
    return {k: None if iv[k] is None else float(np.exp(iv[k])) for k in ("mean", "low", "high")}


def add_intervals(results: list[dict]) -> None:
    """Fills each arm's ``time_interval`` from its per-round step times (also for a JSON saved without it)."""
    for res in results:
        base = [np.median(ts) for ts in res["arms"]["baseline"]["step_s"]]
        for r in res["arms"].values():
            r["time_interval"] = ratio_interval([np.median(ts) / b for ts, b in zip(r["step_s"], base, strict=True)])


def run_case(case: Case, args, device: torch.device) -> dict:
    batch = args.batch or case.batch
    case_args = {**dataclasses.asdict(case), "batch": batch}
    print(f"\n{case.model}, batch {batch} x {'x'.join(map(str, case.input))}: ", end="", flush=True)
    memory = {}
    if args.memory in ("all", "process"):
        for arm in args.arms:
            print(f"memory[{arm}] ", end="", flush=True)
            memory[arm] = measure_memory(case, arm, args)
    arms, sites, saved = {}, {}, {}
    data = batches(case, device, batch=batch)
    for arm in args.arms:
        model, opt, sites[arm] = build(case, arm, device)
        if args.memory in ("all", "saved"):
            saved[arm] = saved_bytes(model, *data[0])
        arms[arm] = (model, opt)
    print(f"timing {args.rounds} rounds x {args.steps} steps", flush=True)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    times = time_arms(arms, data, device=device, rounds=args.rounds, steps=args.steps, warmup=args.warmup, clock=clock)
    base_round = [np.median(ts) for ts in times["baseline"]]
    out = {}
    for arm in args.arms:
        per_round = [np.median(ts) for ts in times[arm]]
        row = {
            "sites": list(sites[arm]),
            "step_ms": _spread([t for ts in times[arm] for t in ts], 1e3),
            "time_ratio": _spread([a / b for a, b in zip(per_round, base_round, strict=True)]),
            "step_s": times[arm],
        }
        if arm in memory:
            row["memory"] = memory[arm]
            for key in ("peak", "rss"):
                if f"{key}_bytes" in memory[arm]:
                    row[f"{key}_mb"] = memory[arm][f"{key}_bytes"] / 2**20
                    base_bytes = memory["baseline"][f"{key}_bytes"]  # RSS can grow by 0 on tiny batches
                    row[f"{key}_ratio"] = memory[arm][f"{key}_bytes"] / base_bytes if base_bytes > 0 else None
        if arm in saved:
            row["saved_mb"] = saved[arm] / 2**20
            row["saved_ratio"] = saved[arm] / saved["baseline"]
        out[arm] = row
    return {**case_args, "arms": out}


def format_table(results: list[dict]) -> str:
    """One line per (model, arm): step time, its ratio to the baseline, and the memory measures with their ratios."""
    head = (
        f"{'model':24} {'arm':8} {'step ms':>7} {'p10-p90':>11} {'time ratio':>10} {'p10-p90':>11} {'95% CI':>17} "
        f"{'peak MB':>8} {'ratio':>6} {'RSS MB':>7} {'ratio':>6} {'saved MB':>8} {'ratio':>6}"
    )
    lines = [head, "-" * len(head)]
    for res in results:
        label = f"{res['model'].split(':')[-1]} b{res['batch']} {res['input'][1]}px"
        for arm, r in res["arms"].items():
            s, q, ci = r["step_ms"], r["time_ratio"], r.get("time_interval") or {}
            ci_text = f"{ci['mean']:.3f} {ci['low']:.2f}-{ci['high']:.2f}" if ci.get("low") is not None else "-"
            mem = []
            for k, w, d in (("peak", 8, 0), ("rss", 7, 0), ("saved", 8, 1)):
                ratio = "-" if r.get(f"{k}_ratio") is None else f"{r[f'{k}_ratio']:.3f}"
                mem.append(f"{r[f'{k}_mb']:{w}.{d}f} {ratio:>6}" if f"{k}_mb" in r else f"{'-':>{w}} {'-':>6}")
            lines.append(
                f"{label:24} {arm:8} {s['median']:7.0f} {s['p10']:5.0f}-{s['p90']:<5.0f} {q['median']:10.3f} "
                f"{q['p10']:5.3f}-{q['p90']:<5.3f} {ci_text:>17} {' '.join(mem)}"
            )
            label = ""
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="baseline is always included")
    ap.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    ap.add_argument("--rounds", type=int, default=10, help="rounds over the arms")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per arm and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per arm before the rounds")
    ap.add_argument(
        "--memory",
        default="all",
        choices=["all", "process", "saved", "none"],
        help="process: peak and rss, measured in a fresh process per arm; saved: autograd's saved tensors",
    )
    ap.add_argument("--memory-steps", type=int, default=3, help="steps measured in each memory process")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, the same for every arm")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    ap.add_argument(
        "--cpu-time", action="store_true", help="time steps by the main thread's CPU time (needs --threads 1, CPU)"
    )
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--report", default=None, metavar="JSON", help="measure nothing; print the table of a saved run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.arms = ["baseline", *[a for a in args.arms if a != "baseline"]]
    for name in ("rounds", "steps", "memory_steps", "threads"):
        if getattr(args, name) < 1:
            raise GCSurgeryError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise GCSurgeryError(f"--warmup must be at least 0, got {args.warmup}")
    if args.cpu_time and (args.threads != 1 or not args.device.startswith("cpu")):
        raise GCSurgeryError(
            f"--cpu-time times one CPU thread: it needs --threads 1 on the CPU, got --threads {args.threads} "
            f"--device {args.device}; drop --cpu-time to time by the wall clock"
        )
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child is not None:
        case = CASES[args.models[0]]
        print(json.dumps(child_memory(case, args.child, device=device, batch=args.batch, steps=args.memory_steps)))
        return None
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        add_intervals(saved["cases"])
        print(format_table(saved["cases"]))
        clock = "main-thread CPU time" if saved.get("clock") == "thread_time" else "wall time"
        print(
            f"\n{clock}; device {saved['device']}, {saved['threads']} thread(s); load average "
            f"{saved['load_average']['start'][0]:.2f} at start, {saved['load_average']['end'][0]:.2f} at end"
        )
        return saved
    load_start = os.getloadavg()
    results = [run_case(CASES[m], args, device) for m in args.models]
    add_intervals(results)
    load_end = os.getloadavg()
    print(f"\n{format_table(results)}")
    print(
        f"\n{'main-thread CPU time' if args.cpu_time else 'wall time'}; "
        f"device {device}, {args.threads} thread(s), torch {torch.__version__}, gcsurgery {gcsurgery.__version__}; "
        f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
    )
    out = {
        "device": str(device),
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "clock": "thread_time" if args.cpu_time else "perf_counter",
        "memory": args.memory,
        "optimizer": {"name": "sgd", **SGD},
        "torch": torch.__version__,
        "gcsurgery": gcsurgery.__version__,
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": {"start": load_start, "end": load_end},
        "cases": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    try:
        main()
    except GCSurgeryError as e:
        sys.exit(f"error: {e}")
