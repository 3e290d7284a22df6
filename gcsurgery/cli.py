"""`gcsurgery` command line: `demo`, `plan`, `sweep`."""

import argparse
import sys

from .errors import GCSurgeryError
from .models import build_model

__all__ = ["main", "build_model"]


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise GCSurgeryError(f"--input must be comma-separated ints like 1,3,224,224, got {text!r}.") from None
    return shape


def _cmd_plan(args) -> int:
    import torch

    from .plans import plan

    model = build_model(args.model)
    example = torch.randn(*_parse_shape(args.input)) if args.input else None
    p = plan(model, example, leaf_modules=tuple(args.leaf))
    print(p.to_json() if args.json else p)
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(p.to_dot())
    if args.png:
        p.draw(args.png)
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import main as sweep_main

    return sweep_main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gcsurgery", description="Gradient correction for any CNN, by fx surgery.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print the automatic insertion plan of a model")
    p.add_argument("model", help="timm:NAME, torchvision:NAME or cifar_resnetDEPTH")
    p.add_argument("--input", help="example input shape, e.g. 1,3,224,224 (default: timm's input_size, else 224)")
    p.add_argument("--leaf", action="append", default=[], help="a submodule to keep opaque (repeatable)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--dot", metavar="FILE", help="write a Graphviz drawing")
    p.add_argument("--png", metavar="FILE", help="write a PNG drawing")
    p.set_defaults(func=_cmd_plan)

    from .sweep import add_arguments as add_sweep_arguments

    s = sub.add_parser("sweep", help="plan (and check) one model per timm family and every torchvision CNN")
    add_sweep_arguments(s)
    s.set_defaults(func=_cmd_sweep)

    from .demo import add_arguments as add_demo_arguments
    from .demo import run as run_demo

    d = sub.add_parser("demo", help="baseline vs GCGD, side by side, on the embedded Fashion-MNIST")
    add_demo_arguments(d)
    d.set_defaults(func=run_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GCSurgeryError as e:
        print(f"gcsurgery: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
