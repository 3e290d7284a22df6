"""Cost of GC-ODE branches on CIFAR ResNet-20: train-step time and peak memory, each variant vs the plain model.

    python benchmarks/gcode_branch_cost.py [--rounds 9] [--steps 3] [--threads 2] [--json out.json]
    python benchmarks/gcode_branch_cost.py --threads 1 --cpu-time   # when other work shares the cores

The three branches sit on the pairs h0→h1 (16,32,32)→(16,32,32), h1→h2 (16,32,32)→(32,16,16) and
h2→h3 (32,16,16)→(64,8,8); a small wrapper runs the stem, the stages and the branches. One SGD step
(batch 128, 3×32×32) per measurement. Time: the arms run interleaved, `--steps` steps each per round;
the arms' order is shuffled each round; "time" is the median over rounds of (arm's median step / plain's
median step in that round), "q1" the ratio of the lower quartiles of all steps (less sensitive to other work).
Memory: the peak of bytes allocated by the CPU allocator during one step, from the profiler's memory
events, plus what lives across steps (parameters, momentum, the batch); "saved" is the activation
memory autograd keeps for backward (distinct storages, from saved_tensors_hooks).
"""

import argparse
import copy
import json
import os
import random
import statistics
import tempfile
import time

# Idle OpenMP threads sleep instead of spinning, so that other work on the cores does not multiply
# multi-thread step times. Read when torch loads, hence set first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import gcsurgery as gcs  # noqa: E402
from gcsurgery.gcode import GCODE, ODEOptions  # noqa: E402

PAIRS = [((16, 32), (16, 32)), ((16, 32), (32, 16)), ((32, 16), (64, 8))]  # ((Ca, Ha), (Cb, Hb))


def variants() -> dict:
    """name → (ODEOptions for all three pairs, how the solve runs: "loop" | "torchdiffeq" | "nchw")."""
    full = {"ode_stride": 1, "recompute": "none"}  # every pair at the destination's size, activations kept
    return {
        "naive: conv×2 + GN + t channel, full": (ODEOptions(phi="conv", norm="group", time="channel", **full), "loop"),
        "conv×2, no norm, t bias, full": (ODEOptions(phi="conv", **full), "loop"),
        "dwsep + GN per eval, full": (ODEOptions(norm="group", **full), "loop"),
        "dwsep, full": (ODEOptions(**full), "loop"),
        "dwsep, full, NCHW internals": (ODEOptions(**full), "nchw"),
        "dwsep, full, recompute ODE": (ODEOptions(ode_stride=1), "loop"),
        "dwsep, coarse 1st pair": (ODEOptions(recompute="none"), "loop"),
        "dwsep, coarse 1st, recompute branch": (ODEOptions(recompute="branch"), "loop"),
        "default: dwsep, coarse 1st, recompute ODE": (ODEOptions(), "loop"),
        "default, pool in R": (ODEOptions(reduce="pool"), "loop"),
        "default, torchdiffeq odeint": (ODEOptions(), "torchdiffeq"),
        "default + GN on z0": (ODEOptions(norm="input"), "loop"),
        "default + GN per eval": (ODEOptions(norm="group"), "loop"),
        "default + silu": (ODEOptions(act="silu"), "loop"),
        "default, r=4": (ODEOptions(width=4), "loop"),
        "default, 1 Euler step (nfe 1)": (ODEOptions(step_size=1.0), "loop"),
        "default, rk4 1 step (nfe 4)": (ODEOptions(solver="rk4", step_size=1.0), "loop"),
        "default, ode_stride 2 all pairs": (ODEOptions(ode_stride=2), "loop"),
    }


class NCHWInternals(GCODE):
    """The branch computed in NCHW order throughout: pooling, 1×1 convs, the final add (measured only here)."""

    def _correction(self, x, ode_hw, channels_last):
        z = self._solve(self.in_norm(self.reduce(F.adaptive_avg_pool2d(x, ode_hw))))
        e = F.conv2d(z, self.expand.weight * self.gate.view(-1, 1, 1, 1), self.expand.bias * self.gate)
        return e.permute(0, 2, 3, 1) if channels_last else e


class Wrapped(nn.Module):
    """ResNet-20 run stage by stage, with optional branches h_{i-1} → h_i (each takes the corrected h_{i-1})."""

    def __init__(self, net, branches=None):
        super().__init__()
        self.net, self.branches = net, branches

    def forward(self, x):  # (B, 3, 32, 32)
        n = self.net
        h = n.relu(n.bn1(n.conv1(x)))  # (B, 16, 32, 32)
        for i, layer in enumerate((n.layer1, n.layer2, n.layer3)):
            h_next = layer(h)
            h = self.branches[i](h, h_next) if self.branches is not None else h_next
        return n.fc(torch.flatten(n.avgpool(h), 1))  # (B, 10)


def build(net, variant=None):
    if variant is None:
        return Wrapped(copy.deepcopy(net))
    opts, how = variant
    cls = NCHWInternals if how == "nchw" else GCODE
    branches = nn.ModuleList(cls(ca, cb, (ha, ha), (hb, hb), options=opts) for (ca, ha), (cb, hb) in PAIRS)
    if how == "torchdiffeq":
        for b in branches:
            b._fixed = False  # the same solve through torchdiffeq.odeint(method=..., options={"step_size": ...})
    return Wrapped(copy.deepcopy(net), branches)


def step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def peak_bytes(model, opt, x, y) -> tuple[int, int]:
    """(peak bytes during one train step + bytes living across steps, saved-for-backward bytes)."""
    step(model, opt, x, y)  # optimizer state exists from here on
    static = sum(t.numel() * t.element_size() for t in [*model.parameters(), x, y])
    static += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, opt, x, y)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            trace = json.load(f)
    events = [e["args"] for e in trace["traceEvents"] if e.get("name") == "[memory]"]
    live, cur, peak = {}, 0, 0
    for a in sorted(events, key=lambda a: a["Ev Idx"]):
        if a["Bytes"] > 0:
            live[a["Addr"]] = a["Bytes"]
            cur += a["Bytes"]
            peak = max(peak, cur)
        else:
            cur -= live.pop(a["Addr"], 0)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.zero_grad()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    return static + peak, sum(v for k, v in storages.items() if k not in param_ptrs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the main thread's CPU time (needs --threads 1): robust when other work shares the cores",
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--only", nargs="*", help="substrings of the variant names to run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)
    net = gcs.cifar_resnet(20)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    chosen = {k: v for k, v in variants().items() if not args.only or any(s in k for s in args.only)}
    arms = {"plain": build(net, None)}
    arms.update({k: build(net, v) for k, v in chosen.items()})
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for k, m in arms.items()}
    mem = {k: (1, 1) if args.no_memory else peak_bytes(m, opts[k], x, y) for k, m in arms.items()}
    for k, m in arms.items():  # warm-up
        step(m, opts[k], x, y)
    times = {k: [] for k in arms}  # per round, the step times
    order = list(arms)
    for r in range(args.rounds):
        random.Random(r).shuffle(order)  # no arm always runs right after another
        for k in order:
            ts = []
            for _ in range(args.steps):
                t0 = clock()
                step(arms[k], opts[k], x, y)
                ts.append(clock() - t0)
            times[k].append(ts)
        print(f"round {r + 1}/{args.rounds}: plain {statistics.median(times['plain'][-1]) * 1e3:.0f} ms", flush=True)
    q1 = {k: statistics.quantiles([t for ts in v for t in ts], n=4)[0] for k, v in times.items()}
    rows = []
    for k in arms:
        ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(times[k], times["plain"], strict=True)]
        nfe = [b.nfe for b in arms[k].branches] if arms[k].branches is not None else []
        rows.append(
            {
                "variant": k,
                "time_ratio": statistics.median(ratios),
                "time_ratio_q1": q1[k] / q1["plain"],
                "step_ms": statistics.median(t for ts in times[k] for t in ts) * 1e3,
                "peak_ratio": mem[k][0] / mem["plain"][0],
                "peak_mb": mem[k][0] / 2**20,
                "saved_ratio": mem[k][1] / mem["plain"][1],
                "nfe": nfe,
            }
        )
    clock_name = "main-thread CPU time" if args.cpu_time else "wall time"
    print(f"\n{clock_name}, threads={args.threads} batch={args.batch} rounds={args.rounds}x{args.steps} steps")
    print("time: median over rounds of the step-time ratio; q1: ratio of the lower quartiles of all steps")
    print(f"{'variant':42} {'time':>6} {'q1':>6} {'ms':>6} {'peak':>6} {'MB':>6} {'saved':>6}  nfe")
    for r in rows:
        print(
            f"{r['variant']:42} {r['time_ratio']:6.3f} {r['time_ratio_q1']:6.3f} {r['step_ms']:6.0f} "
            f"{r['peak_ratio']:6.3f} {r['peak_mb']:6.0f} {r['saved_ratio']:6.3f}  {r['nfe']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(args), "clock": clock_name, "rows": rows, "step_s": times}, f, indent=1)


if __name__ == "__main__":
    main()
