"""The insertion plan: which hidden states get GC-ODE pairs, which layers get GC-W. Plans are data.

A `Plan` is frozen; it prints as an aligned table, round-trips through JSON, can be edited with
`without()`, compared with `diff()`, and drawn (`to_dot()`, `draw()`). `plan(model)` (in `stages.py`, which
builds plans from what it finds in the graph, and re-exported here) builds the automatic one.
"""

import dataclasses
import hashlib
import json

from torch import nn

from .errors import GCSurgeryError
from .layouts import spatial_size
from .trace import Leaf

__all__ = [
    "GCWSite",
    "Plan",
    "State",
    "body_entries",
    "fingerprint",
    "fingerprint_mismatch",
]  # and, from stages, the planner: see __getattr__

PLAN_FORMAT = 1
COLUMNS = (
    "(h_i: hidden state; node: fx node, module: the module making it; chs: channels; red: reduction, input size / "
    "map size; shape: per sample, in its layout; inserts: the GC-ODE pair ending at h_i, the GC-W site of its stage)"
)


@dataclasses.dataclass(frozen=True)
class State:
    """A hidden state h_i: a node every input→output path passes through."""

    node: str  # fx node name in the traced graph
    module: str  # qualified name of the module that produces it
    shape: tuple[int, ...]  # without batch, in the tensor's own layout
    layout: str  # "NCHW" | "NHWC" | "NLC"
    num_chs: int
    reduction: int  # input size / spatial size, a power of two


@dataclasses.dataclass(frozen=True)
class GCWSite:
    """A weight whose gradient GC-W corrects: the last weighted layer on the main path to state `state`."""

    module: str  # e.g. "layer1.1.conv2"
    param: str  # e.g. "layer1.1.conv2.weight"
    state: int  # index of the hidden state it produces


@dataclasses.dataclass(frozen=True)
class Plan:
    """What gcify inserts, and where. Build it with `gcsurgery.plan(model)`; edit it with `without()`."""

    model: str
    input_shape: tuple[int, ...]
    states: tuple[State, ...]
    ode_pairs: tuple[tuple[int, int], ...]
    gcw_sites: tuple[GCWSite, ...]
    leaves: tuple[Leaf, ...] = ()
    notes: tuple[str, ...] = ()
    fingerprint: str = ""
    leaf_modules: tuple[str, ...] = ()  # the user's leaf_modules, as the qualified names they cover
    verified: str = ""  # how the graph was checked against the eager model ("" when it was not)
    # what the fingerprint hashes: 1, the whole state dict (head included); 2, `depends_on`, the parameters and
    # buffers (name, shape) of the traced body up to the last state. Plans written before format 2 read as 1.
    fingerprint_format: int = 1
    depends_on: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self):
        n = len(self.states)
        for pair in self.ode_pairs:
            if len(pair) != 2 or not all(isinstance(i, int) and 0 <= i < n for i in pair) or pair[0] >= pair[1]:
                raise GCSurgeryError(
                    f"GC-ODE pair {pair!r} is not (src, dst) with 0 <= src < dst < {n} (the plan has {n} states)."
                )
        for site in self.gcw_sites:
            if not 0 <= site.state < n:
                raise GCSurgeryError(f"GC-W site {site.param!r} names state {site.state}, but the plan has {n}.")

    # -- editing --------------------------------------------------------------------------------------------

    def without(self, *, pairs=(), gcw=()) -> "Plan":
        """A copy without some GC-ODE pairs and GC-W sites.

        Args:
            pairs: indices into `ode_pairs`, or `(src, dst)` tuples.
            gcw: indices into `gcw_sites`, or module / parameter names.
        """
        drop_pairs = {self._pair_index(p) for p in pairs}
        drop_sites = {self._site_index(s) for s in gcw}
        return dataclasses.replace(
            self,
            ode_pairs=tuple(p for i, p in enumerate(self.ode_pairs) if i not in drop_pairs),
            gcw_sites=tuple(s for i, s in enumerate(self.gcw_sites) if i not in drop_sites),
        )

    def _pair_index(self, p) -> int:
        if isinstance(p, int) and not isinstance(p, bool) and -len(self.ode_pairs) <= p < len(self.ode_pairs):
            return p % len(self.ode_pairs)
        if isinstance(p, tuple | list) and tuple(p) in self.ode_pairs:
            return self.ode_pairs.index(tuple(p))
        raise GCSurgeryError(
            f"no GC-ODE pair {p!r} in this plan; valid: indices 0..{len(self.ode_pairs) - 1} "
            f"or one of {list(self.ode_pairs)}."
        )

    def _site_index(self, s) -> int:
        n = len(self.gcw_sites)
        if isinstance(s, int) and not isinstance(s, bool) and -n <= s < n:
            return s % n
        for i, site in enumerate(self.gcw_sites):
            if s in (site.module, site.param):
                return i
        raise GCSurgeryError(
            f"no GC-W site {s!r} in this plan; valid: indices 0..{n - 1} "
            f"or one of {[site.module for site in self.gcw_sites]}."
        )

    def diff(self, other: "Plan") -> list[str]:
        """Human-readable differences from `other` (empty when the plans insert the same things)."""
        out = []
        if self.fingerprint != other.fingerprint:
            out.append(f"model: {self.model} [{self.fingerprint}] vs {other.model} [{other.fingerprint}]")
        a, b = [s.node for s in self.states], [s.node for s in other.states]
        if a != b:
            out.append(f"states: {a} vs {b}")
        for p in sorted(set(self.ode_pairs) - set(other.ode_pairs)):
            out.append(f"- GC-ODE pair h{p[0]}->h{p[1]}")
        for p in sorted(set(other.ode_pairs) - set(self.ode_pairs)):
            out.append(f"+ GC-ODE pair h{p[0]}->h{p[1]}")
        mine, theirs = {s.param for s in self.gcw_sites}, {s.param for s in other.gcw_sites}
        out += [f"- GC-W {p}" for p in sorted(mine - theirs)] + [f"+ GC-W {p}" for p in sorted(theirs - mine)]
        return out

    # -- serialisation --------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["format"] = PLAN_FORMAT
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **{"indent": 1, **kwargs})

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        if not isinstance(d, dict) or found != PLAN_FORMAT:
            raise GCSurgeryError(
                f"not a gcsurgery plan (format {PLAN_FORMAT} expected, got {found!r}); write plans with Plan.to_json()."
            )
        try:
            return cls(
                model=d["model"],
                input_shape=tuple(d["input_shape"]),
                states=tuple(State(**{**s, "shape": tuple(s["shape"])}) for s in d["states"]),
                ode_pairs=tuple(tuple(p) for p in d["ode_pairs"]),
                gcw_sites=tuple(GCWSite(**s) for s in d["gcw_sites"]),
                leaves=tuple(Leaf(**leaf) for leaf in d.get("leaves", ())),
                notes=tuple(d.get("notes", ())),
                fingerprint=d.get("fingerprint", ""),
                leaf_modules=tuple(d.get("leaf_modules", ())),
                verified=d.get("verified", ""),
                fingerprint_format=d.get("fingerprint_format", 1),
                depends_on=tuple((name, tuple(shape)) for name, shape in d.get("depends_on", ())),
            )
        except (KeyError, TypeError) as e:
            raise GCSurgeryError(f"malformed plan: {type(e).__name__}: {e}; write plans with Plan.to_json().") from e

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise GCSurgeryError(f"plan JSON does not parse: {e}; write plans with Plan.to_json().") from e

    # -- printing and drawing -------------------------------------------------------------------------------

    def _inserts(self, i: int) -> str:
        parts = [f"ODE{k} h{a}->h{b}" for k, (a, b) in enumerate(self.ode_pairs) if b == i]
        parts += [f"GC-W {s.module}" for s in self.gcw_sites if s.state == i]
        return ", ".join(parts) or "-"

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        head = (
            f"Plan for {self.model} [{self.fingerprint}] on input {shape}: {len(self.states)} states, "
            f"{len(self.ode_pairs)} GC-ODE pairs, {len(self.gcw_sites)} GC-W sites"
        )
        rows = [("idx", "node", "module", "chs", "red", "shape", "inserts")]
        for i, s in enumerate(self.states):
            dims = "x".join(map(str, s.shape))
            rows.append(
                (
                    f"h{i}",
                    s.node,
                    s.module or "-",
                    str(s.num_chs),
                    str(s.reduction),
                    f"{dims} {s.layout}",
                    self._inserts(i),
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        right = {3, 4}
        lines = [head]
        for r in rows:
            cells = [r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c]) for c in range(len(r))]
            lines.append("  ".join(cells).rstrip())
        lines.append(COLUMNS)
        if self.leaf_modules:
            lines.append(f"leaf_modules: {', '.join(self.leaf_modules)}")
        lines += [f"leaf: {leaf.module} ({leaf.reason})" for leaf in self.leaves]
        lines += [f"note: {note}" for note in self.notes]
        if self.verified:
            lines.append(f"verified: {self.verified}")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """The plan as Graphviz DOT: states on the main path, GC-ODE pairs as dashed edges."""
        lines = ["digraph plan {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];']
        for i, s in enumerate(self.states):
            gcw = "".join(f"\\nGC-W {site.module}" for site in self.gcw_sites if site.state == i)
            label = f"h{i}: {s.node}\\n{s.num_chs} ch, /{s.reduction}{gcw}"
            lines.append(f'  h{i} [label="{label}"{", style=filled, fillcolor=lightyellow" if gcw else ""}];')
        for i in range(1, len(self.states)):
            lines.append(f'  h{i - 1} -> h{i} [label="stage {i}"];')
        for k, (a, b) in enumerate(self.ode_pairs):
            lines.append(f'  h{a} -> h{b} [style=dashed, color=blue, label="ODE{k}", constraint=false];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def draw(self, path: str) -> None:
        """Writes a PNG drawing of the plan (matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.states)
        fig, ax = plt.subplots(figsize=(max(5.0, 1.9 * n), 2.1))
        for i, s in enumerate(self.states):
            sites = [site.module for site in self.gcw_sites if site.state == i]
            hw = "x".join(map(str, spatial_size(s.layout, s.shape)))
            label = f"h{i}  /{s.reduction}\n{s.module or s.node}\n{s.num_chs} ch, {hw}"
            ax.text(
                i,
                0,
                label + "".join(f"\nGC-W {m}" for m in sites),
                ha="center",
                va="center",
                fontsize=8,
                bbox={"boxstyle": "round,pad=0.4", "fc": "lightyellow" if sites else "white", "ec": "black"},
            )
            if i:
                ax.annotate("", (i - 0.42, 0), (i - 1 + 0.42, 0), arrowprops={"arrowstyle": "->"})
        for k, (a, b) in enumerate(self.ode_pairs):
            ax.annotate(
                "",
                (b, 0.3),
                (a, 0.3),
                arrowprops={"arrowstyle": "->", "color": "tab:blue", "ls": "--", "connectionstyle": "arc3,rad=-0.35"},
            )
            ax.text((a + b) / 2, 0.5 + 0.12 * (b - a - 1), f"ODE{k}", color="tab:blue", ha="center", fontsize=8)
        top = 0.6 + 0.12 * max((b - a - 1 for a, b in self.ode_pairs), default=0)
        ax.set_xlim(-0.55, n - 0.45)
        ax.set_ylim(-0.3, top)
        ax.axis("off")
        shape = "x".join(map(str, self.input_shape))
        ax.set_title(
            f"{self.model} on {shape}: {len(self.ode_pairs)} GC-ODE pairs (blue), "
            f"{len(self.gcw_sites)} GC-W sites (yellow)",
            fontsize=9,
        )
        fig.tight_layout(pad=0.3)
        fig.savefig(path, dpi=130)
        plt.close(fig)


# -- identity -------------------------------------------------------------------------------------------------


def fingerprint(model: nn.Module, depends_on=None) -> str:
    """A short hash of the model's class and parameter and buffer names and shapes.

    With `depends_on` (format 2, see `body_entries`), those (name, shape) pairs; without, the whole state dict
    (format 1, what plans before format 2 hold).
    """
    h = hashlib.sha256(type(model).__name__.encode())
    entries = ((n, tuple(t.shape)) for n, t in model.state_dict().items()) if depends_on is None else depends_on
    for name, shape in entries:
        h.update(f"{name}:{tuple(shape)};".encode())
    return h.hexdigest()[:12]


def body_entries(model: nn.Module, graph, last: str) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    """(name, shape) of the state-dict entries the traced graph uses up to node `last` (None when it has no such node).

    A plan depends on these: the layers after the last state (global pooling, the classifier head) are left out,
    so a plan for `resnet18()` fits `resnet18(num_classes=10)`.
    """
    used: list[str] = []
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            used.append(str(node.target))
        if node.name == last:
            break
    else:
        return None
    state = model.state_dict()
    keep = [k for k in state if any(k == u or k.startswith(u + ".") for u in used)]
    return tuple((k, tuple(state[k].shape)) for k in keep)


def fingerprint_mismatch(model: nn.Module, plan: "Plan", graph) -> str | None:
    """Why `model` is not the model `plan` was made for ("" reasons are None: the fingerprint fits, or is absent)."""
    if not plan.fingerprint:
        return None
    mine = f"{type(model).__name__}"
    if plan.fingerprint_format == 1:
        fp = fingerprint(model)
        if fp == plan.fingerprint:
            return None
        return (
            f"{mine} [fingerprint {fp}] (parameter names or shapes differ; the plan's fingerprint is of the old "
            f"format 1, over the whole state dict with the classifier head, so it names no parameter)"
        )
    if mine != plan.model:
        return f"{mine} (another class)"
    have = body_entries(model, graph, plan.states[-1].node) if plan.states else ()
    if have is None:
        return f"{mine} (its traced graph has no node {plan.states[-1].node!r}, the plan's last state)"
    fp = fingerprint(model, have)
    if fp == plan.fingerprint:
        return None
    for i, ((a, sa), (b, sb)) in enumerate(zip(plan.depends_on, have, strict=False)):
        if a != b or sa != sb:
            first = (
                f"parameter {a!r} is {sa} in the plan's model and {sb} in this one"
                if a == b
                else f"entry {i} is {a!r} {sa} in the plan's model and {b!r} {sb} in this one"
            )
            break
    else:
        n, m = len(plan.depends_on), len(have)
        longer, extra = (plan.depends_on, "the plan's model") if n > m else (have, "this one")
        first = f"{extra} has {abs(n - m)} more parameters and buffers, from {longer[min(n, m)][0]!r}" if n != m else ""
        first = first or "the class differs"
    return f"{mine} [fingerprint {fp}] (before the last state, {first})"


_PLANNER = ("check_example_inputs", "default_example_inputs", "plan")


def __getattr__(name: str):
    """The planner's names, from `stages` (which imports this module, hence not imported at the top)."""
    if name in _PLANNER:
        from . import stages

        return getattr(stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
