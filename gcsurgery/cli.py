"""`gcsurgery` command line: `plan`, `sweep`, `demo`, `diagnose`, on the harness (`gcsurgery.harness`).

torch and timm load only once a command runs, so ``--help`` and usage errors answer at once.
"""

import argparse
import os
import sys

from .errors import GCSurgeryError

__all__ = ["main"]

PLAN_EPILOG = """\
The table: idx (h0 is the stem output, hi the output of stage i), node (the fx node), module, chs
(channels), red (reduction: input size / the map's size), shape (C x H x W and layout), inserts (the GC-ODE
pair ending at that state and the GC-W site of that stage).

A model that is not a timm or torchvision name: pass an importable factory, package.module:function
(with --kwargs for its arguments), or in Python: gcs.plan(model, example_inputs=torch.randn(1, C, H, W)).
"""


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise GCSurgeryError(f"--input must be comma-separated ints like 1,3,224,224, got {text!r}.") from None


def _cmd_plan(args) -> int:
    from .harness.names import check_model_name

    check_model_name(args.model)  # a typo is answered before torch loads
    shape = _parse_shape(args.input) if args.input else None
    import torch

    from .harness.models import build_model
    from .harness.names import CIFAR_PREFIXES
    from .plans import plan

    in_chans = args.in_chans
    if in_chans is None and shape and len(shape) > 1 and args.model.startswith(("timm:", *CIFAR_PREFIXES)):
        in_chans = shape[1]  # these build any channel count: follow the example input
    model = build_model(args.model, num_classes=args.num_classes, in_chans=in_chans, kwargs=args.kwargs)
    example = torch.randn(*shape) if shape else None
    p = plan(model, example, leaf_modules=tuple(args.leaf))
    print(p.to_json() if args.json else p)
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(p.to_dot())
    if args.png:
        p.draw(args.png)
    return 0


def _cmd_sweep(args) -> int:
    from .harness.sweep import main as sweep_main

    return sweep_main(args)


def _cmd_demo(args) -> int:
    # Idle OpenMP threads sleep instead of spinning, so per-process CPU time counts work, not waiting, on a
    # shared machine (as benchmarks/overhead.py does); read when torch loads, which it has not yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .harness.demo import run

    return run(args)


def _add_diagnose_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="cifar_resnetDEPTH, cifar_plainDEPTH, timm:NAME, torchvision:NAME or package.module:factory"
    )
    parser.add_argument(
        "--data", default="fashion-mnist", choices=("fashion-mnist",), help="the images (default: %(default)s)"
    )
    parser.add_argument("--data-dir", help="the Fashion-MNIST IDX files (default: Debian's, else the embedded subset)")
    parser.add_argument("--subset", choices=("embedded", "full"), help="force the embedded 6000 images or the full set")
    parser.add_argument(
        "--arm",
        default="gcgd",
        help="baseline, gcw, gcode or gcgd, or a variant such as gcgd:ode.gate_init=0.1, set "
        "beside the baseline (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=100, help="SGD steps between the two diagnoses (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights (both arms) and batch order (default: 0)")
    parser.add_argument("--out", default="gcsurgery-diagnose", help="where results.md/json and the PNGs go")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (default: 64)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD's constant lr, no weight decay (default: 0.1)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum (default: 0.9)")
    parser.add_argument("--every", type=int, default=10, help="the GradientRecorder's period in steps (default: 10)")
    parser.add_argument("--samples", type=int, default=128, help="training images diagnosed (default: 128)")
    parser.add_argument("--calibration", type=int, default=1280, help="images for BatchNorm statistics at insertion")


def _cmd_diagnose(args) -> int:
    from .harness.names import check_model_name

    check_model_name(args.model)  # a typo is answered before torch loads
    from .harness.diagnosis import main as diagnose_main

    return diagnose_main(args)


def build_parser() -> argparse.ArgumentParser:
    from .harness.demo import add_arguments as add_demo_arguments
    from .harness.sweep import add_arguments as add_sweep_arguments

    parser = argparse.ArgumentParser(prog="gcsurgery", description="Gradient correction for any CNN, by fx surgery.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "plan",
        help="print the automatic insertion plan of a model",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", help="timm:NAME, torchvision:NAME, cifar_resnetDEPTH, cifar_plainDEPTH or package.module:factory"
    )
    p.add_argument("--input", help="example input shape, e.g. 1,3,224,224 (default: timm's input_size, else 224)")
    p.add_argument("--num-classes", type=int, help="classifier outputs, as the model will be built in Python")
    p.add_argument("--in-chans", type=int, help="input channels (default: those of --input, else the model's)")
    p.add_argument(
        "--kwargs", metavar="JSON", help="more keyword arguments for the model's factory, e.g. '{\"depth\": 3}'"
    )
    p.add_argument("--leaf", action="append", default=[], help="a submodule to keep opaque (repeatable)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--dot", metavar="FILE", help="write a Graphviz drawing")
    p.add_argument("--png", metavar="FILE", help="write a PNG drawing")
    p.set_defaults(func=_cmd_plan)

    s = sub.add_parser("sweep", help="plan (and check) one model per timm family and every torchvision CNN")
    add_sweep_arguments(s)
    s.set_defaults(func=_cmd_sweep)

    d = sub.add_parser("demo", help="baseline vs GCGD, side by side, on the embedded Fashion-MNIST")
    add_demo_arguments(d)
    d.set_defaults(func=_cmd_demo)

    g = sub.add_parser(
        "diagnose",
        help="gradient-flow diagnostics of an arm beside the baseline, at insertion and after N steps",
        description="Trains the baseline and --arm from the same weights on the same Fashion-MNIST batches and "
        "measures, at insertion and after --steps SGD steps, the per-sample gradient norm at h0..hN and the "
        "coherence and GSNR of each stage's weight gradient (docs/diagnostics.md); prints the tables and writes "
        "OUT/results.md, results.json, norm_profile.png and coherence.png.",
    )
    _add_diagnose_arguments(g)
    g.set_defaults(func=_cmd_diagnose)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GCSurgeryError as e:
        print(f"gcsurgery: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
