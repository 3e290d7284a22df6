"""Coverage sweep: plan and gcify one model per timm family and every torchvision classification model.

For each model: build it (random weights), `plan` it at its default input size, `gcify` it, and check
that the gcified model computes exactly what the original computes, in eval and in train mode (same RNG
state), and that one backward reaches every parameter. Prints a table and writes JSON (and Markdown).
"""

import json
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import GCSurgeryError
from .report import coverage_head, coverage_section, summarize_sweep

if TYPE_CHECKING:
    import torch

__all__ = ["add_arguments", "check_model", "format_table", "main", "timm_families", "torchvision_models"]


FAMILIES_CACHE = Path(__file__).resolve().parents[1] / "assets" / "timm_families.json"


def timm_families(*, refresh: bool = False) -> dict[str, str]:
    """The smallest model (by parameter count, counted on the meta device) of each timm model module.

    The choice is cached in the package per timm version (`assets/timm_families.json`); it is recomputed,
    which builds every timm model on the meta device (minutes), when timm's version differs or on `refresh`.
    """
    import timm
    import torch

    if not refresh and FAMILIES_CACHE.exists():
        cached = json.loads(FAMILIES_CACHE.read_text())
        if cached.get("timm") == timm.__version__:
            return cached["families"]
    out = {}
    for module in sorted(timm.list_modules()):
        best = None
        for name in timm.list_models(module=module):
            try:
                with torch.device("meta"):
                    m = timm.create_model(name, pretrained=False)
                n = sum(p.numel() for p in m.parameters())
            except Exception:
                continue
            if best is None or n < best[0]:
                best = (n, name)
        if best is not None:
            out[module] = best[1]
    return out


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _first(y):
    while isinstance(y, tuple | list):
        y = y[0]
    return y.logits if hasattr(y, "logits") else y


def _torchvision_example(spec: str, model) -> "torch.Tensor | None":
    """A torchvision model's own input size, from its weights' metadata (nothing is downloaded).

    A model with a fixed `image_size` keeps it: ViT-H/14 built without weights takes 224, not its weights' 518.
    """
    if not spec.startswith("torchvision:"):
        return None
    import torch
    import torchvision

    size = getattr(model, "image_size", None)
    try:
        weights = torchvision.models.get_model_weights(spec.partition(":")[2])
        size = size if isinstance(size, int) else weights.DEFAULT.transforms().crop_size[0]
    except (ValueError, AttributeError, IndexError):
        return None
    return torch.randn(1, 3, size, size)


def check_gradients(model, gm, x, mode: str) -> None:
    """Every original parameter's gradient of sum(output) is bit-identical in the gcified model (same RNG).

    Each net is put in `mode` again first, as `gcsurgery.verify.run` does: a model may cache a value on its first
    forward after a mode switch and drop the cache in `train()` (LeViT's attention biases in eval mode), and the
    cache a no-grad forward left behind is detached, so the eager model would then give those parameters no
    gradient at all, which the graph (tracing reads the parameters themselves) does not compute."""
    import torch

    grads = []
    for net in (model, gm):
        net.train(mode == "train")
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        _first(net(x)).float().sum().backward()
        grads.append({n: q.grad for n, q in net.named_parameters()})
    for name, g0 in grads[0].items():
        g1 = grads[1].get(name)
        if (g0 is None) != (g1 is None) or (g0 is not None and not torch.equal(g0, g1)):
            diff = "missing" if g0 is None or g1 is None else f"max diff {(g0 - g1).abs().max().item():.3g}"
            raise AssertionError(f"gradient of {name} not exact in {mode} mode ({diff})")


def check_model(spec: str, *, exact: bool = True, batch: int = 2) -> dict:
    """Plans, gcifies and checks one model (outputs and every parameter gradient); returns a coverage-table row."""
    import torch

    from ..rewrite import gcify
    from ..stages import plan
    from .models import build_model

    row = {"model": spec, "states": 0, "pairs": 0, "gcw": 0, "seconds": 0.0, "status": "", "detail": ""}
    row["exact"] = exact
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build_model(spec)
        p = plan(model, _torchvision_example(spec, model))  # None: the planner's default input, said in its notes
        row.update(states=len(p.states), pairs=len(p.ode_pairs), gcw=len(p.gcw_sites))
        row["plan_seconds"] = round(time.perf_counter() - t0, 3)
        row["notes"] = list(p.notes)
        row["leaves"] = [leaf.module for leaf in p.leaves]
        if exact:
            gm = gcify(model, p)
            x = torch.randn(batch, *p.input_shape[1:])
            for mode in (False, True):
                model.train(mode)
                gm.train(mode)
                with torch.no_grad():
                    torch.manual_seed(1)
                    y0 = _first(model(x))
                    torch.manual_seed(1)
                    y1 = _first(gm(x))
                if not torch.equal(y0, y1):
                    diff = (y0 - y1).abs().max().item()
                    raise AssertionError(f"not exact in {'train' if mode else 'eval'} mode (max diff {diff:.3g})")
                check_gradients(model, gm, x, "train" if mode else "eval")
            branch_params = [n for n, q in gm.named_parameters() if n.startswith("gc.") and q.grad is None]
            if branch_params:
                raise AssertionError(f"GC-ODE parameters without gradient: {branch_params[:3]}")
        row["status"] = "ok"
    except GCSurgeryError as e:
        row["status"] = "no hierarchy" if "no spatial downsampling" in str(e) else "refused"
        row["detail"] = str(e)
    except AssertionError as e:
        row["status"] = "mismatch"
        row["detail"] = str(e)
    except Exception as e:  # a crash is a bug of ours or of the model: record it, keep sweeping
        row["status"] = "crash"
        row["detail"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row["traceback"] = traceback.format_exc(limit=-3)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def format_table(rows: list[dict]) -> str:
    head = ("model", "states", "pairs", "GC-W", "seconds", "status")
    lines = [head]
    for r in rows:
        status = r["status"] + (f": {r['detail'][:90]}" if r["status"] != "ok" else "")
        lines.append((r["model"], str(r["states"]), str(r["pairs"]), str(r["gcw"]), f"{r['seconds']:.1f}", status))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line[:5], widths, strict=True)) + "  " + line[5] for line in lines
    )


def run_isolated(spec: str, *, exact: bool, timeout: float) -> dict:
    """`check_model` in a fresh interpreter, so a huge model's memory is returned and a hang is cut off."""
    code = f"import json, gcsurgery.harness.sweep as s; print(json.dumps(s.check_model({spec!r}, exact={exact!r})))"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        detail = f"no result within {timeout:.0f} s"
    except (IndexError, json.JSONDecodeError):
        detail = f"the check process died: {(proc.stderr or '').strip().splitlines()[-1:] or proc.returncode}"
    row = {"model": spec, "states": 0, "pairs": 0, "gcw": 0, "status": "timeout", "detail": detail, "exact": exact}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def add_arguments(parser) -> None:
    parser.add_argument("--source", choices=("all", "timm", "torchvision"), default="all")
    parser.add_argument("--models", nargs="*", help="explicit model specs (timm:NAME, torchvision:NAME)")
    parser.add_argument("--no-exact", action="store_true", help="plan only; skip gcify and the exactness check")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model (each runs in its own process)")
    parser.add_argument("--json", default="sweep.json", help="where to write the rows (default sweep.json)")
    parser.add_argument("--markdown", help="also write a Markdown table (docs/coverage.md)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json; run the models missing")
    parser.add_argument("--from", dest="sources", nargs="*", default=[], help="with --resume: more JSON files to keep")
    parser.add_argument("--rerun", nargs="*", default=[], help="with --resume: models to run again all the same")
    parser.add_argument("--no-run", action="store_true", help="with --resume: run nothing, mark the rest 'not run'")
    parser.add_argument("--note", help="a remark kept in --json and printed in --markdown (how the runs relate)")


def _command(args) -> str:
    """The command line that reproduces `args`, for the record."""
    out = ["gcsurgery sweep"]
    out += ["--models", *args.models] if args.models else ["--source", args.source]
    out += ["--no-exact"] * args.no_exact + ["--timeout", f"{args.timeout:g}", "--json", args.json]
    out += ["--markdown", args.markdown] if args.markdown else []
    out += ["--resume"] * args.resume + (["--from", *args.sources] if args.sources else [])
    out += ["--no-run"] * args.no_run
    out += ["--rerun", *args.rerun] if args.rerun else []
    out += ["--note", shlex.quote(args.note)] if args.note else []
    return " ".join(out)


def _load_rows(paths) -> tuple[dict[str, dict], list[str], list[str]]:
    """Rows by model, the recorded commands and the notes of earlier sweep files (later files win)."""
    rows, commands, notes = {}, [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        notes += [n for n in data.pop("notes", []) if n not in notes]
        recorded = data.pop("commands", [])
        commands += [c for c in recorded if c not in commands]
        for row in (r for group in data.values() for r in group):
            rows[row["model"]] = {"run": recorded[-1] if recorded else "", **row}
    return rows, commands, notes


def main(args) -> int:
    if args.models:
        groups = {"selected": list(args.models)}
    else:
        groups = {}
        if args.source in ("all", "timm"):
            fams = timm_families()
            groups["timm families (smallest model each)"] = [f"timm:{n}" for n in sorted(fams.values())]
        if args.source in ("all", "torchvision"):
            groups["torchvision classification models"] = [f"torchvision:{n}" for n in torchvision_models()]
    old, commands, notes = {}, [], []
    if args.resume:
        old, commands, notes = _load_rows([*args.sources, *([args.json] if Path(args.json).exists() else [])])
    commands.append(_command(args))
    notes += [args.note] if args.note and args.note not in notes else []
    all_rows, md = {"commands": commands, "notes": notes}, []
    for title, specs in groups.items():
        rows = []
        for spec in specs:
            if spec in old and spec not in args.rerun:
                rows.append(old[spec])
                continue
            if args.no_run:
                rows.append(dict(model=spec, states=0, pairs=0, gcw=0, seconds=0.0, status="not run", detail=""))
                continue
            row = {**run_isolated(spec, exact=not args.no_exact, timeout=args.timeout), "run": commands[-1]}
            rows.append(row)
            print(f"{row['status']:>12}  {row['seconds']:6.1f}s  {spec}  {row['detail'][:100]}", flush=True)
            with open(args.json, "w") as f:
                json.dump({**all_rows, title: rows}, f, indent=1)
        all_rows[title] = rows
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)
        print(f"\n{title}\n{format_table(rows)}\n{summarize_sweep(rows)}\n")
        md.append(coverage_section(rows, title, commands))
    if args.markdown:
        Path(args.markdown).write_text(coverage_head(commands, notes, versions=_versions()) + "\n".join(md))
    return 0


def _versions() -> str:
    import timm
    import torch
    import torchvision

    return f"timm {timm.__version__}, torchvision {torchvision.__version__}, torch {torch.__version__}"
