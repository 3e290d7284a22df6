"""Does GC-W's correction point where the next gradient goes, better than the gradient itself? Read off the
`GradientRecorder` lines of GC-W runs (``recipes/train.py --arm gcw --diagnose-every K``).

    python benchmarks/gcw_mechanism.py RUN_DIR [RUN_DIR ...] [--markdown OUT.md]

For each GC-W site and epoch, over the records of every run given: ‖ΔG_t‖/‖G_t‖ (the applied correction's
size), cos(ΔG_t, g_{t+1}) (where the correction points, against the next step's gradient) and cos(G_t, g_{t+1})
(the same for the gradient it corrects), and their paired difference per record with a 95% Student-t interval.
To first order a step W −= η(G_t + ΔG_t) lowers the next loss by η⟨g_{t+1}, G_t + ΔG_t⟩: a correction whose
cosine with g_{t+1} exceeds the gradient's adds more decrease per unit of length than a longer step along G_t
would, i.e. it corrects the direction rather than only the scale. Records where no correction was applied
(ratio 0, cos nan) are left out. SGD-like base optimizers only (with Adam the recorded dot is preconditioned).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from gcsurgery.errors import GCSurgeryError
from gcsurgery.harness.report import paired_interval


def records_by_epoch(run_dir: Path) -> list[tuple[int, dict]]:
    """``[(epoch, diag record)]`` of a run's metrics.jsonl: each record belongs to the epoch whose line follows it."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise GCSurgeryError(f"{run_dir} has no metrics.jsonl; pass the --out-dir of a recipes/train.py run")
    pending, out = [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "diag/step" in row:
            pending.append(row)
        elif "epoch" in row and row["epoch"] > 0:
            out += [(row["epoch"], r) for r in pending]
            pending = []
    if not any(k.endswith("/cos_dG_next") for _, r in out for k in r):
        raise GCSurgeryError(
            f"{path} has no GC-W records (cos_dG_next); it must be a gcw or gcgd run with --diagnose-every"
        )
    return out


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def summarize(runs: list[Path]) -> dict:
    rows = [(e, r) for d in runs for e, r in records_by_epoch(d)]
    sites = sorted({k.split("/")[1] for _, r in rows for k in r if k.endswith("/cos_dG_next")})
    epochs = sorted({e for e, _ in rows})
    out = {}
    for site in sites:
        per = {}
        for epoch in [*epochs, "all"]:
            recs = [r for e, r in rows if epoch == "all" or e == epoch]
            both = [(r.get(f"diag/{site}/cos_dG_next"), r.get(f"diag/gcw:{site}/cos_next")) for r in recs]
            pairs = [pair for pair in both if len(_finite(pair)) == 2]  # records where a correction was applied
            ratio = _finite(r.get(f"diag/{site}/ratio") for r in recs)
            diff = paired_interval([a - b for a, b in pairs]) if len(pairs) > 1 else None
            per[str(epoch)] = {
                "records": len(pairs),
                "ratio": float(np.mean(ratio)) if ratio else None,
                "cos_dG_next": float(np.mean([a for a, _ in pairs])) if pairs else None,
                "cos_G_next": float(np.mean([b for _, b in pairs])) if pairs else None,
                "difference": diff,
            }
        out[site] = per
    return {"runs": [str(d) for d in runs], "sites": out}


def markdown(summary: dict) -> str:
    lines = [
        "| GC-W site | epoch | records | ‖ΔG‖/‖G‖ | cos(ΔG_t, g_t+1) | cos(G_t, g_t+1) | difference [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for site, per in summary["sites"].items():
        for epoch, c in per.items():
            d = c["difference"]
            ci = "—" if d is None else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(
                f"| {site} | {epoch} | {c['records']} | {fmt(c['ratio'])} | {fmt(c['cos_dG_next'])} | "
                f"{fmt(c['cos_G_next'])} | {ci} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="--out-dir of recipes/train.py runs of a GC-W arm")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    summary = summarize(args.runs)
    table = markdown(summary)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    try:
        main()
    except GCSurgeryError as e:
        sys.exit(f"error: {e}")
