"""CPU time of each GC-ODE branch of an ImageNet-size model, at the default (capped) width and at r = Cb/4.

    python benchmarks/branch_widths.py                                   # torchvision resnet18 and resnet50
    python benchmarks/branch_widths.py --models torchvision:resnet50 --rounds 9 --json out.json

For every pair the plan of the model at 224 px finds, two branches with its shapes, layouts and options are
built: one at the default width (`gcsurgery.gcode.default_width`, capped at `MAX_WIDTH`) and one at the
uncapped r = max(8, Cb // 4). Each round times one forward and backward of each (the order alternating
between rounds) on random src and dst of batch ``--batch``, by the main thread's CPU time with one thread,
and the median over rounds is printed next to the time of passing dst's gradient alone (the floor).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/overhead.py; read when torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gcsurgery  # noqa: E402
from gcsurgery.errors import GCSurgeryError  # noqa: E402
from gcsurgery.gcode import GCODE, ODEOptions  # noqa: E402
from gcsurgery.harness.models import build_model  # noqa: E402


def uncapped_width(out_chs: int) -> int:
    return max(8, out_chs // 4)


def branch_pairs(model_name: str, size: int) -> list[GCODE]:
    torch.manual_seed(0)
    model = gcsurgery.gcify(build_model(model_name, num_classes=1000), example_inputs=torch.zeros(2, 3, size, size))
    return [m for m in model.modules() if isinstance(m, GCODE)]


def twin(branch: GCODE, width: int) -> GCODE:
    """A branch with `branch`'s shapes, layouts and options at another width."""
    options = ODEOptions(**{**branch.options.to_dict(), "width": width})
    return GCODE(
        branch.in_chs, branch.out_chs, branch.in_size, branch.out_size,
        in_layout=branch.in_layout, out_layout=branch.out_layout, options=options,
    )  # fmt: skip


def fwd_bwd_seconds(branch: GCODE, src, dst, g) -> float:
    t0 = time.thread_time()
    branch(src, dst).backward(g)
    return time.thread_time() - t0


def measure(model_name: str, *, size: int, batch: int, rounds: int) -> list[dict]:
    rows = []
    for k, branch in enumerate(branch_pairs(model_name, size)):
        default, uncapped = twin(branch, branch.width), twin(branch, uncapped_width(branch.out_chs))
        src = torch.randn(batch, branch.in_chs, *branch.in_size, requires_grad=True)
        dst = torch.randn(batch, branch.out_chs, *branch.out_size, requires_grad=True)
        g = torch.randn_like(dst)
        arms = {"default": default, "uncapped": uncapped}
        times = {name: [] for name in [*arms, "floor"]}
        for b in arms.values():  # warm-up
            fwd_bwd_seconds(b, src, dst, g)
        for r in range(rounds):
            for name in list(arms)[:: 1 if r % 2 else -1]:
                times[name].append(fwd_bwd_seconds(arms[name], src, dst, g))
            t0 = time.thread_time()
            (dst * 1.0).backward(g)
            times["floor"].append(time.thread_time() - t0)
            src.grad = dst.grad = None
        row = {
            "pair": k,
            "shapes": f"{branch.in_chs}x{branch.in_size} -> {branch.out_chs}x{branch.out_size}",
            "width": default.width,
            "uncapped_width": uncapped.width,
            **{f"{name}_ms": float(np.median(ts)) * 1e3 for name, ts in times.items()},
        }
        rows.append(row)
        print(
            f"{model_name:22} pair {k}  {row['shapes']:34} r={row['width']:<4} {row['default_ms']:7.0f} ms   "
            f"r={row['uncapped_width']:<4} {row['uncapped_ms']:7.0f} ms   floor {row['floor_ms']:5.0f} ms",
            flush=True,
        )
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["torchvision:resnet18", "torchvision:resnet50"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.batch < 1:
        raise GCSurgeryError(f"--rounds and --batch must be at least 1, got {args.rounds} and {args.batch}")
    torch.set_num_threads(1)
    out = {
        "batch": args.batch, "size": args.size, "rounds": args.rounds, "clock": "thread_time", "threads": 1,
        "load_average": os.getloadavg(), "torch": torch.__version__,
        "models": {m: measure(m, size=args.size, batch=args.batch, rounds=args.rounds) for m in args.models},
    }  # fmt: skip
    for m, rows in out["models"].items():
        d, u = (sum(r[f"{k}_ms"] - r["floor_ms"] for r in rows) for k in ("default", "uncapped"))
        print(f"{m}: all branches over the floor, default {d:.0f} ms, uncapped {u:.0f} ms (main-thread CPU time)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    try:
        main()
    except GCSurgeryError as e:
        sys.exit(f"error: {e}")
