"""Reports: paired statistics and verdicts, Markdown tables, accuracy-curve plots, and the coverage document.

Pure functions over plain numbers and dicts, shared by the recipes, the benchmarks, the demo and the sweep.
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "coverage_head",
    "coverage_section",
    "crossing",
    "markdown_table",
    "mean_std",
    "paired_interval",
    "paired_verdict",
    "plot_curves",
    "plus_minus",
    "spread",
    "summarize_sweep",
]


# --- statistics ---------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict:
    """``mean``, sample ``std`` (0 for one value) and ``n``."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def spread(values: Sequence[float]) -> dict:
    """``median``, ``p10`` and ``p90``."""
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


def crossing(accs: Sequence[float], times: Sequence[float], target: float) -> tuple[float | None, float | None]:
    """(epochs, seconds) at which the curve ``accs[epoch]`` first reaches ``target``, interpolated linearly."""
    for i, a in enumerate(accs):
        if a >= target:
            if i == 0:
                return 0.0, 0.0
            frac = (target - accs[i - 1]) / (a - accs[i - 1])
            return i - 1 + frac, times[i - 1] + frac * (times[i] - times[i - 1])
    return None, None


def paired_verdict(diffs: Sequence[float], *, seed_sd: float | None = None, z: float = 2.0) -> dict:
    """Whether paired differences (arm minus baseline, one per seed) stand out of seed-to-seed noise.

    The noise of the mean of ``n`` paired differences is ``sd / sqrt(n)``, with ``sd`` the standard deviation
    of one paired difference: measured from ``diffs`` when there are at least 3, else ``seed_sd`` (measured
    by a benchmark over more seeds). The mean stands out when it lies beyond ``z`` times that noise.

    Returns:
        ``mean``, ``sd``, ``n``, ``half_width`` (``z`` times the noise), ``sd_from`` (``"these seeds"``,
        ``"given"`` or ``"unknown"``) and ``verdict``: ``"within noise"``, ``"ahead"``, ``"behind"`` or
        ``"unknown"`` (one difference and no ``seed_sd``).
    """
    n = len(diffs)
    mean = float(np.mean(diffs))
    if n >= 3:
        sd, source = float(np.std(diffs, ddof=1)), "these seeds"
    elif seed_sd is not None:
        sd, source = float(seed_sd), "given"
    else:
        return {"mean": mean, "sd": None, "n": n, "half_width": None, "sd_from": "unknown", "verdict": "unknown"}
    half = z * sd / math.sqrt(n)
    verdict = "within noise" if abs(mean) <= half else ("ahead" if mean > 0 else "behind")
    return {"mean": mean, "sd": sd, "n": n, "half_width": half, "sd_from": source, "verdict": verdict}


def paired_interval(diffs: Sequence[float], *, level: float = 0.95) -> dict:
    """The mean of paired differences (arm minus baseline, one per seed) with its Student-t interval, and a verdict.

    Returns:
        ``mean``, ``sd``, ``n``, ``low`` and ``high`` (the ``level`` interval of the mean; None below 2 values)
        and ``verdict``: ``"pays"`` (the interval lies above 0), ``"hurts"`` (below 0), ``"within noise"``
        (it holds 0) or ``"unknown"`` (one value).
    """
    from scipy import stats

    v = np.asarray(diffs, dtype=float)
    n, mean = len(v), float(v.mean())
    if n < 2:
        return {"mean": mean, "sd": None, "n": n, "low": None, "high": None, "verdict": "unknown"}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = "pays" if low > 0 else "hurts" if high < 0 else "within noise"
    return {"mean": mean, "sd": sd, "n": n, "low": low, "high": high, "verdict": verdict}


# --- tables -------------------------------------------------------------------------------------------------------


def plus_minus(d: Mapping, scale: float = 100, signed: bool = False) -> str:
    """``"85.95 ± 0.42"`` from a `mean_std` dict (scaled, e.g. to percent)."""
    return f"{scale * d['mean']:{'+' if signed else ''}.2f} ± {scale * d['std']:.2f}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


# --- plots --------------------------------------------------------------------------------------------------------


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str = "validation accuracy",
    bands: Mapping[str, Sequence[float]] | None = None,
    first_epoch: int = 1,
) -> None:
    """Writes a PNG of validation accuracy per epoch, one line per label, with a ± band where ``bands`` has one.

    Args:
        curves: ``curves[label][i]`` is the accuracy (0..1) after epoch ``first_epoch + i``.
        path: the PNG to write.
        title: the plot's title.
        bands: half-widths of a shaded band around each curve (e.g. the std over seeds), same indexing.
        first_epoch: the epoch of each curve's first value (0: the untrained model).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for label, accs in curves.items():
        y = 100 * np.asarray(accs, dtype=float)
        x = np.arange(first_epoch, first_epoch + len(y))
        ax.plot(x, y, marker="o", ms=3, label=label)
        if bands is not None and label in bands:
            w = 100 * np.asarray(bands[label], dtype=float)
            ax.fill_between(x, y - w, y + w, alpha=0.2)
    ax.set(xlabel="epoch", ylabel="val accuracy (%)", title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- coverage (docs/coverage.md, written by `gcsurgery sweep --markdown`) ------------------------------------------


def summarize_sweep(rows: Sequence[Mapping]) -> str:
    """One line: how many models had each status, and the share of those with a spatial hierarchy that are ok."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    hier = [r for r in rows if r["status"] not in ("no hierarchy", "not run")]
    ok = sum(r["status"] == "ok" for r in hier)
    pct = 100.0 * ok / len(hier) if hier else 0.0
    return (
        f"{len(rows)} models: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f"; {ok}/{len(hier)} of those with a spatial hierarchy ok ({pct:.1f}%)"
    )


def coverage_section(rows: Sequence[Mapping], title: str, commands: Sequence[str] = ()) -> str:
    """A section of docs/coverage.md; the `run` column numbers the command (in `commands`) that made the row."""
    out = [
        f"## {title}",
        "",
        summarize_sweep(rows),
        "",
        "| model | states | pairs | GC-W | s | run | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        detail = r["detail"].replace("|", "/").replace("\n", " ")[:160]
        status = r["status"] + (f": {detail}" if detail else "") + ("" if r.get("exact", True) else " (plan only)")
        skipped = [n.split(":")[0] for n in r.get("notes", []) if n.startswith("no hidden state")]
        status += f" ({skipped[0].replace('no hidden state', 'no state')})" if skipped and r["status"] == "ok" else ""
        run = commands.index(r["run"]) + 1 if r.get("run") in commands else ""
        cells = (r["model"], r["states"], r["pairs"], r["gcw"], f"{r['seconds']:.1f}", run, status)
        out.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(out) + "\n"


def coverage_head(commands: Sequence[str], notes: Sequence[str], *, versions: str) -> str:
    """The head of docs/coverage.md: what the sweep checks, what the statuses mean, the commands that made it."""
    return (
        f"# Coverage\n\nWritten by `gcsurgery sweep` ({versions}, CPU). Each model runs in its own process: `plan` "
        "at its default input size, then `gcify` and a bit-for-bit comparison, in eval and in train mode (same RNG "
        "state), of the outputs and of every original parameter's gradient of sum(output), and a check that the "
        "backward reaches every GC-ODE parameter. Statuses: `ok`; `no hierarchy` (one "
        "resolution level: ViTs, MLP-Mixers, refused with a GCSurgeryError that says so); `refused` (a "
        "GCSurgeryError saying why); `mismatch`, `crash`, `timeout` (bugs or limits of the sweep). A row marked "
        "(plan only) was planned without the exactness check. `ok (no state at reduction 8, 16)` means no node at "
        "those reductions lies on every input-to-output path — parallel streams (HRNet, NASNet cells) or a class "
        "token — so one GC-ODE pair spans them (docs/design.md, 'Parallel multi-resolution streams').\n\n"
        "Commands, in order (`--resume` keeps the rows of the files before it and runs the rest; a table's `run` "
        "column is the number of the command that made the row):\n\n"
        + "".join(f"{i}. `{c}`\n" for i, c in enumerate(commands, 1))
        + "".join(f"\n{n}\n" for n in notes)
        + "\n"
    )
