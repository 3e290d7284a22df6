"""Coverage sweep: plan and gcify one model per timm family and every torchvision classification model.

For each model: build it (random weights), `plan` it at its default input size, `gcify` it, and check
that the gcified model computes exactly what the original computes, in eval and in train mode (same RNG
state), and that one backward reaches every parameter. Prints a table and writes JSON (and Markdown).
"""

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from .errors import GCSurgeryError

__all__ = ["add_arguments", "main", "check_model", "timm_families", "torchvision_models"]


FAMILIES_CACHE = Path(__file__).parent / "assets" / "timm_families.json"


def timm_families(*, refresh: bool = False) -> dict[str, str]:
    """The smallest model (by parameter count, counted on the meta device) of each timm model module.

    The choice is cached in the package per timm version (`assets/timm_families.json`); it is recomputed,
    which builds every timm model on the meta device (minutes), when timm's version differs or on `refresh`.
    """
    import timm

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


def _torchvision_example(spec: str) -> torch.Tensor | None:
    """A torchvision model's own input size, from its weights' metadata (nothing is downloaded)."""
    if not spec.startswith("torchvision:"):
        return None
    import torchvision

    try:
        size = torchvision.models.get_model_weights(spec.partition(":")[2]).DEFAULT.transforms().crop_size[0]
    except (ValueError, AttributeError, IndexError):
        return None
    return torch.randn(1, 3, size, size)


def check_model(spec: str, *, exact: bool = True, batch: int = 2) -> dict:
    """Plans, gcifies and checks one model; returns a row of the coverage table."""
    from .models import build_model
    from .plans import default_example_inputs, plan
    from .rewrite import gcify

    row = {"model": spec, "states": 0, "pairs": 0, "gcw": 0, "seconds": 0.0, "status": "", "detail": ""}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build_model(spec)
        example = _torchvision_example(spec) or default_example_inputs(model)
        p = plan(model, example)
        row.update(states=len(p.states), pairs=len(p.ode_pairs), gcw=len(p.gcw_sites))
        row["plan_seconds"] = round(time.perf_counter() - t0, 3)
        row["notes"] = list(p.notes)
        row["leaves"] = [leaf.module for leaf in p.leaves]
        if exact:
            gm = gcify(model, p)
            x = torch.randn(batch, *example.shape[1:])
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
            gm.train()
            torch.manual_seed(1)
            _first(gm(x)).float().sum().backward()
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


def summarize(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    hier = [r for r in rows if r["status"] != "no hierarchy"]
    ok = sum(r["status"] == "ok" for r in hier)
    pct = 100.0 * ok / len(hier) if hier else 0.0
    return (
        f"{len(rows)} models: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f"; {ok}/{len(hier)} of those with a spatial hierarchy ok ({pct:.1f}%)"
    )


def to_markdown(rows: list[dict], title: str) -> str:
    out = [
        f"## {title}",
        "",
        summarize(rows),
        "",
        "| model | states | pairs | GC-W | s | status |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        detail = r["detail"].replace("|", "/").replace("\n", " ")[:160]
        status = r["status"] + (f": {detail}" if detail else "")
        out.append(f"| {r['model']} | {r['states']} | {r['pairs']} | {r['gcw']} | {r['seconds']:.1f} | {status} |")
    return "\n".join(out) + "\n"


def run_isolated(spec: str, *, exact: bool, timeout: float) -> dict:
    """`check_model` in a fresh interpreter, so a huge model's memory is returned and a hang is cut off."""
    code = f"import json, gcsurgery.sweep as s; print(json.dumps(s.check_model({spec!r}, exact={exact!r})))"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        detail = f"no result within {timeout:.0f} s"
    except (IndexError, json.JSONDecodeError):
        detail = f"the check process died: {(proc.stderr or '').strip().splitlines()[-1:] or proc.returncode}"
    row = {"model": spec, "states": 0, "pairs": 0, "gcw": 0, "status": "timeout", "detail": detail}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def add_arguments(parser) -> None:
    parser.add_argument("--source", choices=("all", "timm", "torchvision"), default="all")
    parser.add_argument("--models", nargs="*", help="explicit model specs (timm:NAME, torchvision:NAME)")
    parser.add_argument("--no-exact", action="store_true", help="plan only; skip gcify and the exactness check")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model (each runs in its own process)")
    parser.add_argument("--json", default="sweep.json", help="where to write the rows (default sweep.json)")
    parser.add_argument("--markdown", help="also write a Markdown table (docs/coverage.md)")


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
    all_rows, md = {}, []
    for title, specs in groups.items():
        rows = []
        for spec in specs:
            row = run_isolated(spec, exact=not args.no_exact, timeout=args.timeout)
            rows.append(row)
            print(f"{row['status']:>12}  {row['seconds']:6.1f}s  {spec}  {row['detail'][:100]}", flush=True)
            with open(args.json, "w") as f:
                json.dump({**all_rows, title: rows}, f, indent=1)
        all_rows[title] = rows
        print(f"\n{title}\n{format_table(rows)}\n{summarize(rows)}\n")
        md.append(to_markdown(rows, title))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(
                "# Coverage\n\nWritten by `gcsurgery sweep --markdown docs/coverage.md`: each model is planned at "
                "its default input size, gcified, and checked for bit-exact outputs in eval and train mode, "
                "each in its own process.\n\n"
            )
            f.write("\n".join(md))
    return 0
