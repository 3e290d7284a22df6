"""The diagnostics report: plain dataclasses with `to_dict()`, printed as aligned tables."""

import dataclasses
import json

__all__ = ["StateGradient", "GroupGradient", "BranchShare", "DiagnosticReport"]


@dataclasses.dataclass(frozen=True)
class StateGradient:
    """Per-sample ‖∂ℓ_n/∂h_i‖ over the samples, for hidden state h_i."""

    index: int
    node: str
    numel: int  # elements of h_i per sample
    grad_norm: float  # mean over samples
    grad_norm_std: float


@dataclasses.dataclass(frozen=True)
class GroupGradient:
    """Per-sample gradient statistics of a group of weights (a stage's, or one GC-W site's)."""

    name: str  # "stem", "stage<i>", "head", or "gcw:<param>"
    params: tuple[str, ...]
    numel: int
    coherence: float  # α = ‖E g_n‖² / E‖g_n‖²
    gsnr: float  # mean over the parameters of E[g]² / Var[g]
    zero_variance: int  # parameters left out of the GSNR mean (their gradient is the same for every sample)
    grad_norm: float  # E‖g_n‖
    mean_grad_norm: float  # ‖E g_n‖


@dataclasses.dataclass(frozen=True)
class BranchShare:
    """How the per-sample gradient reaching h_src splits between the GC-ODE branch and the main path."""

    branch: str  # module, e.g. "gc.ode.0"
    src: int
    dst: int
    branch_norm: float  # E‖g_branch‖
    main_norm: float  # E‖g_main‖, g_main = ∂ℓ/∂h_src − g_branch
    share: float  # E‖g_branch‖ / (E‖g_branch‖ + E‖g_main‖)
    cosine: float  # E cos(g_branch, g_main) over samples whose two parts are non-zero


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return [
        "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
        for r in rows
    ]


def _g(x: float) -> str:
    return f"{x:.3g}"


@dataclasses.dataclass(frozen=True)
class DiagnosticReport:
    """What `gcsurgery.diagnose` measured on a model and a set of batches."""

    model: str
    samples: int
    method: str  # "vmap" or "loop"
    states: tuple[StateGradient, ...]
    groups: tuple[GroupGradient, ...]
    branches: tuple[BranchShare, ...] = ()
    gcw: dict = dataclasses.field(default_factory=dict)  # GCOptimizer.gc_stats() when an optimizer was given
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **{"indent": 1, **kwargs})

    def __str__(self) -> str:
        lines = [f"Gradient diagnostics of {self.model}: {self.samples} samples, per-sample gradients by {self.method}"]
        rows = [("state", "node", "numel", "E|dl/dh|", "std")]
        rows += [(f"h{s.index}", s.node, str(s.numel), _g(s.grad_norm), _g(s.grad_norm_std)) for s in self.states]
        lines += _table(rows)
        rows = [("weights", "numel", "coherence", "GSNR", "E|g_n|", "|E g_n|")]
        rows += [
            (g.name, str(g.numel), _g(g.coherence), _g(g.gsnr), _g(g.grad_norm), _g(g.mean_grad_norm))
            for g in self.groups
        ]
        lines += [""] + _table(rows)
        if self.branches:
            rows = [("branch", "pair", "E|g_branch|", "E|g_main|", "share", "cos")]
            rows += [
                (b.branch, f"h{b.src}->h{b.dst}", _g(b.branch_norm), _g(b.main_norm), _g(b.share), _g(b.cosine))
                for b in self.branches
            ]
            lines += [""] + _table(rows)
        if self.gcw:
            keys = sorted({k for d in self.gcw.values() for k in d if not k.startswith("coef_")})
            rows = [("GC-W site", *keys)] + [
                (n, *(_g(d.get(k, float("nan"))) for k in keys)) for n, d in self.gcw.items()
            ]
            lines += [""] + _table(rows)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
