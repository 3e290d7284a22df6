"""Verified surgery: a graph computes what the eager model computes, forward and backward, or we say where not.

torch.fx can record a different program from the one eager mode runs: `isinstance(x, torch.Tensor)` is False
for a traced value, `with torch.no_grad()` blocks and Python state are not recorded, an instance-level
`forward` is not what the tracer calls. So the planner and `gcify` run one batch through the eager model and
through the graph, in eval and in train mode from the same RNG state, and compare every output tensor (nested
tuples, lists, dicts, dataclasses and `ModelOutput`s), every buffer after the step (BatchNorm statistics),
and the gradient of every parameter of a fixed random projection of the outputs.

Equal means bit-identical: a traced graph runs the same ATen ops in the same order as the eager model, and a
GC-ODE branch at insertion adds exact zeros. Only where the eager model differs from itself run to run (a
nondeterministic kernel) is a tolerance used: ten times the eager model's own run-to-run difference, stated.

The batch is the example shrunk (so that verifying ResNet-50 at 224 px costs a small share of planning it):
batch 2, each side divided by the largest power of two up to 8 that leaves 16 px; where the eager model does
not run at that size (a fixed-size head), or where the graph's GC-ODE branches take token (NLC) maps, whose
count a branch is built for, the example itself, repeated to batch 2.
"""

import contextlib
import dataclasses
import inspect
import io
import math
import sys

import torch
from torch import fx, nn

from .errors import GCSurgeryError
from .trace import Leaf, Traced, preserve_buffers, trace

__all__ = [
    "Mismatch",
    "Reference",
    "Verdict",
    "compare",
    "first_divergence",
    "likely_cause",
    "verification_inputs",
    "verified_trace",
]

MIN_SIDE = 16
MAX_SHRINK = 8
MAX_VERIFY_LEAVES = 8  # modules verification may make leaves, per model
MAX_CANDIDATES = 8  # leaves tried per mismatch


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """Where a graph first differs from the eager model."""

    mode: str  # "eval" | "train"
    what: str  # "output out[0]", "gradient of layer1.0.conv1.weight", "buffer bn1.running_mean", "error"
    detail: str  # "max abs diff 0.31", "shape (2, 8) vs (2, 16)", or the graph's exception
    grads_only: bool  # forward and buffers equal, only gradients differ

    def __str__(self) -> str:
        return f"{self.what} differs in {self.mode} mode ({self.detail})"


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
    """One eager run: flattened outputs, gradients by parameter name, buffers after the step."""

    outputs: list[tuple[str, object]]
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True, eq=False)
class Verdict:
    """The outcome of `compare`: no mismatch (how it was verified) or the first mismatch found."""

    mismatch: Mismatch | None
    summary: str
    references: dict  # (mode, input shape) -> Reference, reusable for the next graph
    inputs: dict  # mode -> the batch verified in that mode


def flatten(value, prefix: str = "out") -> list[tuple[str, object]]:
    """(path, leaf) pairs of nested tuples, lists, dicts, dataclasses and ModelOutputs (dict subclasses)."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in flatten(v, f"{prefix}[{k!r}]")]
    if isinstance(value, list | tuple):
        return [kv for i, v in enumerate(value) for kv in flatten(v, f"{prefix}[{i}]")]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [kv for f in dataclasses.fields(value) for kv in flatten(getattr(value, f.name), f"{prefix}.{f.name}")]
    return [(prefix, value)]


def verification_inputs(example: torch.Tensor, *, shrink: bool = True) -> list[torch.Tensor]:
    """Batches to verify on, cheapest first: the example shrunk (batch 2; not with shrink=False), then the example
    at batch >= 2."""
    gen = torch.Generator().manual_seed(0)
    full = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()
    sides = example.shape[2:]
    k = 1
    while k < MAX_SHRINK and min(sides) // (2 * k) >= MIN_SIDE:
        k *= 2
    if k == 1 or example.dim() < 3 or not shrink:
        return [full]
    small = torch.randn(2, example.shape[1], *(math.ceil(s / k) for s in sides), generator=gen)
    return [small.to(device=example.device, dtype=example.dtype), full]


def _weights(i: int, t: torch.Tensor) -> torch.Tensor:
    """A fixed random projection for output tensor i, so the scalar's gradient is not degenerate (softmax sums)."""
    gen = torch.Generator().manual_seed(1000 + i)
    return torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype)


def _devices(x: torch.Tensor) -> list:
    return [x.device] if x.device.type == "cuda" else []


def run(module: nn.Module, x: torch.Tensor, *, training: bool, params: dict[str, nn.Parameter]) -> Reference:
    """One forward and backward in the given mode from RNG seed 0; buffers are restored afterwards (`preserve_buffers`),
    so every run starts from the state the model had, also where forward replaces a buffer (a cache built on the first
    call)."""
    module.train(training)
    printed = io.StringIO()  # a failing GraphModule prints its generated code's traceback to stderr
    with preserve_buffers(module):
        with torch.random.fork_rng(devices=_devices(x)), torch.enable_grad(), contextlib.redirect_stderr(printed):
            torch.manual_seed(0)
            out = flatten(module(x))
            floats = [(i, v) for i, (_, v) in enumerate(out) if isinstance(v, torch.Tensor) and v.requires_grad]
            names = list(params)
            grads: dict = dict.fromkeys(names)
            if floats:
                loss = sum((v.float() * _weights(i, v).float()).sum() for i, v in floats)
                got = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                grads = dict(zip(names, got, strict=True))
        after = {k: b.detach().clone() for k, b in module.named_buffers()}
        sys.stderr.write(printed.getvalue())  # the model's own warnings, when it ran
    outputs = [(k, v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out]
    return Reference(outputs, grads, after)


def _diff(a, b, atol: float) -> str | None:
    """None when equal (within atol), else what differs."""
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return f"{type(a).__name__} vs {type(b).__name__}"
    if not isinstance(a, torch.Tensor):
        try:
            return None if a == b else f"{a!r} vs {b!r}"
        except Exception:
            return None
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    if torch.equal(a, b):
        return None
    if not a.is_floating_point():
        return "values differ"
    both_nan = a.isnan() & b.isnan()
    err = torch.where(both_nan, 0, (a.double() - b.double()).abs()).max().item()
    return None if err <= atol else f"max abs diff {err:.3g}"


def _grad_diff(a, b, atol: float) -> str | None:
    if a is None or b is None:
        return None if a is b else ("no gradient in the eager model" if a is None else "no gradient in the graph")
    return _diff(a, b, atol)


def difference(ref: Reference, got: Reference, mode: str, *, atol: float = 0.0) -> Mismatch | None:
    """The first difference between two runs: outputs, then buffers, then gradients."""
    if [k for k, _ in ref.outputs] != [k for k, _ in got.outputs]:
        ref_keys, got_keys = [k for k, _ in ref.outputs], [k for k, _ in got.outputs]
        return Mismatch(mode, "the output structure", f"{ref_keys[:4]} vs {got_keys[:4]}", False)
    for (k, a), (_, b) in zip(ref.outputs, got.outputs, strict=True):
        if (d := _diff(a, b, atol)) is not None:
            return Mismatch(mode, f"output {k}", d, False)
    for k, a in ref.buffers.items():
        if k in got.buffers and (d := _diff(a, got.buffers[k], atol)) is not None:
            return Mismatch(mode, f"buffer {k}", d, False)
    for k, a in ref.grads.items():
        if (d := _grad_diff(a, got.grads.get(k), atol)) is not None:
            return Mismatch(mode, f"gradient of {k}", d, True)
    return None


def _noise(ref: Reference, again: Reference) -> float:
    """The largest difference between two eager runs (0.0 for a deterministic model)."""
    pairs = [(a, b) for (_, a), (_, b) in zip(ref.outputs, again.outputs, strict=True)]
    pairs += [(a, again.grads[k]) for k, a in ref.grads.items() if a is not None and again.grads.get(k) is not None]
    err = 0.0
    for a, b in pairs:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.shape == b.shape:
            err = max(err, (a.double() - b.double()).abs().max().item())
    return err


def compare(
    model: nn.Module,
    graphs: dict[bool, nn.Module],
    example: torch.Tensor,
    *,
    params: dict[str, nn.Parameter] | None = None,
    references: dict | None = None,
    shrink: bool = True,
) -> Verdict:
    """Compares `graphs[training]` with `model` in eval and train mode.

    Args:
        model: the eager model.
        graphs: the graph to check for each mode (False: eval, True: train); may be one module twice.
        example: the example batch; see `verification_inputs` for the batches actually run.
        params: the parameters whose gradients are compared (default: the model's trainable ones).
        references: eager runs from an earlier `compare` on the same model, reused.
        shrink: try the shrunk example first; False verifies at the example's own size (a graph whose GC-ODE
            branches take tokens of one count only, which a smaller input would not give them).

    Returns:
        The verdict; the model's and the graphs' modes and buffers are as before.
    """
    params = params if params is not None else {k: p for k, p in model.named_parameters() if p.requires_grad}
    references = dict(references or {})
    inputs, notes, tolerance = {}, [], ""
    for training in (False, True):
        mode = "train" if training else "eval"
        ref = x = None
        for candidate in verification_inputs(example, shrink=shrink):
            key = (mode, tuple(candidate.shape))
            try:
                ref = references.get(key) or run(model, candidate, training=training, params=params)
            except Exception as e:  # the eager model does not run here: a fixed-size head, batch 1 with BatchNorm
                notes.append(f"{mode}: {type(e).__name__}")
                continue
            references[key], x = ref, candidate
            break
        if ref is None:
            return Verdict(None, f"not verified: the eager model does not run on the example ({notes[-1]})", {}, {})
        inputs[mode] = x
        try:
            got = run(graphs[training], x, training=training, params=params)
        except Exception as e:
            text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return Verdict(Mismatch(mode, "error", f"the graph raised {text}", False), "", references, inputs)
        mismatch = difference(ref, got, mode)
        if mismatch is not None:
            noise = _noise(ref, run(model, x, training=training, params=params))
            if noise == 0.0 or difference(ref, got, mode, atol=10 * noise) is not None:
                return Verdict(mismatch, "", references, inputs)
            tolerance = f" within {10 * noise:.2g} (10x the eager model's own run-to-run difference, {noise:.2g})"
    shapes = sorted({"x".join(map(str, x.shape)) for x in inputs.values()})
    what = f"outputs, buffers and {len(params)} parameter gradients"
    how = "bit-identical" if not tolerance else "equal" + tolerance
    return Verdict(
        None, f"eval and train mode: {what} {how} to the eager model on a {', '.join(shapes)} batch", references, inputs
    )


# -- finding where a graph diverges -----------------------------------------------------------------------


def _scope_blocks(gm: fx.GraphModule) -> dict[str, list[list[fx.Node]]]:
    """For each module scope, its calls: runs of consecutive graph nodes inside it."""
    blocks: dict[str, list[list[fx.Node]]] = {}
    last: dict[str, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        stack = node.meta.get("nn_module_stack") or {}
        for value in stack.values():
            path = value[0] if isinstance(value, tuple) else str(value)
            if not path:
                continue
            if last.get(path) == i - 1:
                blocks[path][-1].append(node)
            else:
                blocks.setdefault(path, []).append([node])
            last[path] = i
    return blocks


def first_divergence(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor, *, training: bool) -> str | None:
    """The first module (in the order eager calls finish, so innermost first) whose output the graph computes
    differently, or None when every module's output agrees."""
    calls: list[tuple[str, list]] = []
    _run_hooked(model, x, training, lambda name, out: calls.append((name, flatten(out))))
    values: dict[str, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = result = super().run_node(n)
            return result

    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_devices(x)):
            gm.train(training)
            torch.manual_seed(0)
            Recorder(gm).run(x)
    except Exception:
        pass  # the graph fails part-way: the modules before the failure still tell where it went wrong
    blocks, seen = _scope_blocks(gm), {}
    for name, outs in calls:
        k = seen[name] = seen.get(name, -1) + 1
        runs = blocks.get(name, [])
        if k >= len(runs):
            continue  # inside a leaf, or returns its input unchanged: no nodes of its own
        last = runs[k][-1].name
        if last not in values:
            return name  # the graph failed before this module's output
        eager = [v for _, v in outs if isinstance(v, torch.Tensor)]
        for _, v in flatten(values[last]):
            if isinstance(v, torch.Tensor) and not any(
                e.shape == v.shape and e.dtype == v.dtype and torch.equal(e, v) for e in eager
            ):
                return name
    return None


def likely_cause(module: nn.Module) -> str:
    """What in a module's forward usually makes torch.fx record another program, read off its source."""
    if "forward" in vars(module):
        return "its forward is replaced on the instance, which torch.fx does not call"
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        source = ""
    causes = (
        (("isinstance(", "torch.jit.isinstance", "type("), "an isinstance/type check on a traced value"),
        ((".apply(", "autograd.Function"), "a custom torch.autograd.Function"),
        (
            ("no_grad", "enable_grad", "set_grad_enabled", "inference_mode"),
            "a grad-mode block, which fx does not record",
        ),
        (("rand", "dropout", "bernoulli"), "randomness"),
        (("global ", "nonlocal ", "setattr("), "Python state read or written in forward"),
    )
    for words, cause in causes:
        if any(w in source for w in words):
            return cause
    return "data-dependent Python control flow that torch.fx records for one case only"


# -- tracing until the graph is right ---------------------------------------------------------------------


def _within(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def _ancestors(name: str) -> list[str]:
    """`name` and the modules around it, innermost first (the root excluded)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _call_order(model: nn.Module, x: torch.Tensor, *, training: bool) -> list[str]:
    """Module names in the order their eager calls finish (first call of each)."""
    order: list[str] = []
    _run_hooked(model, x, training, lambda name, out: order.append(name) if name not in order else None)
    return order


def _run_hooked(model: nn.Module, x: torch.Tensor, training: bool, on_output) -> None:
    """One eager forward (no grad, seed 0, RNG restored after) calling `on_output(name, output)` as each
    submodule's call finishes."""
    hooks = [
        m.register_forward_hook(lambda m, i, out, name=name: on_output(name, out))
        for name, m in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_devices(x)):
            model.train(training)
            torch.manual_seed(0)
            model(x)
    finally:
        for h in hooks:
            h.remove()


def candidates(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor, mismatch: Mismatch, bad: list[str]) -> list[str]:
    """Modules to try as leaves, most likely first.

    A forward mismatch: the first module whose output diverges, then the modules around it. A gradient-only
    mismatch: the modules around the last layer whose parameters got a wrong gradient (a grad-mode block), then
    the modules that run after it (gradients flow backward, so a culprit outside sits downstream).
    """
    training = mismatch.mode == "train"
    if not mismatch.grads_only:
        culprit = first_divergence(model, gm, x, training=training)
        return _ancestors(culprit) if culprit else []
    order = _call_order(model, x, training=training)
    owners = [o for o in order if o in {p.rpartition(".")[0] for p in bad}]
    if not owners:
        return order[:MAX_CANDIDATES]
    last = owners[-1]
    around = _ancestors(last)[1:]  # a grad-mode block around the parameter's layer
    later = [m for m in order[order.index(last) + 1 :] if m not in around]  # a Function after it
    return (around + later)[:MAX_CANDIDATES]


def wrong_gradients(model, gm, x, mismatch: Mismatch, params) -> list[str]:
    """Names of the parameters whose gradients differ between the eager model and `gm`."""
    training = mismatch.mode == "train"
    ref, got = run(model, x, training=training, params=params), run(gm, x, training=training, params=params)
    return [k for k, a in ref.grads.items() if _grad_diff(a, got.grads.get(k), 0.0) is not None]


def _graphs(traced: Traced) -> dict[bool, fx.GraphModule]:
    return {False: traced.eval, True: traced.train}


def verified_trace(
    model: nn.Module, traced: Traced, example: torch.Tensor, *, leaf_modules: tuple[str, ...]
) -> tuple[Traced, tuple[Leaf, ...], Verdict]:
    """Checks `traced` against `model`; on a mismatch, makes the diverging module a leaf and traces again.

    Args:
        model: the eager model.
        traced: its traced graphs (traced with `leaf_modules`).
        example: the example batch.
        leaf_modules: the qualified names already kept opaque.

    Returns:
        The graphs that compute what the model computes, the leaves verification added (with the reason),
        and the verdict (its summary says how it was verified).

    Raises:
        GCSurgeryError: no leaf makes the graph agree, naming the module, the likely cause and the fix.
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    names, leaves = list(leaf_modules), []
    verdict = compare(model, _graphs(traced), example, params=params)
    while verdict.mismatch is not None:
        mismatch = verdict.mismatch
        training, x = mismatch.mode == "train", verdict.inputs[mismatch.mode]
        gm = _graphs(traced)[training]
        bad = wrong_gradients(model, gm, x, mismatch, params) if mismatch.grads_only else []
        tried = [c for c in candidates(model, gm, x, mismatch, bad) if c not in names]
        if len(leaves) >= MAX_VERIFY_LEAVES:
            raise diverged(model, mismatch, tried[0] if tried else None, limit=len(leaves))
        fixed = None
        for c in tried:
            try:
                again = trace(model, leaf_modules=[*names, c])
            except GCSurgeryError:
                continue
            result = compare(model, _graphs(again), example, params=params, references=verdict.references)
            if result.mismatch is None or _moved(model, again, result, tried[0], c):
                fixed = c, again, result
                break
        if fixed is None:
            raise diverged(model, mismatch, tried[0] if tried else None)
        c, traced, verdict = fixed
        names.append(c)
        cause = likely_cause(model.get_submodule(c))
        leaves.append(Leaf(c, f"verification: traced inline, {mismatch}; likely {cause}"))
    return traced, tuple(leaves), verdict


def _moved(model: nn.Module, traced: Traced, verdict: Verdict, culprit: str, leaf: str) -> bool:
    """Whether a new leaf fixed the divergence it was made for, though another remains elsewhere."""
    mismatch = verdict.mismatch
    if mismatch.grads_only:
        return False
    training = mismatch.mode == "train"
    now = first_divergence(model, _graphs(traced)[training], verdict.inputs[mismatch.mode], training=training)
    return now is not None and now not in (culprit, leaf) and not _within(now, leaf)


def diverged(model: nn.Module, mismatch: Mismatch, culprit: str | None, *, limit: int = 0) -> GCSurgeryError:
    """The error for a graph that computes something else than the model, with the module and the fix."""
    name = type(model).__name__
    head = f"torch.fx records a different program from what {name} runs: {mismatch}"
    if culprit is None:
        where = (
            "it could not be traced to one submodule, so the top-level forward is the likely place "
            f"({likely_cause(model)})"
        )
    else:
        module = model.get_submodule(culprit)
        where = f"it first diverges in {culprit!r} ({type(module).__name__}), likely from {likely_cause(module)}"
    if limit:
        cls = type(model.get_submodule(culprit)).__name__ if culprit else "TheBlockClass"
        fix = (
            f"verification already made {limit} modules leaves (its limit); pass leaf_modules=[{cls}] (the class, "
            "not its instances) to keep every such block opaque"
        )
    else:
        fix = (
            "keeping it opaque (a leaf) did not make the graph agree; make that forward traceable (no isinstance "
            "checks on tensors, no grad-mode blocks), wrap the model in a module whose forward calls it, or pass "
            "verify=False if you know the difference is intended"
        )
    return GCSurgeryError(f"{head}; {where}. {fix[0].upper()}{fix[1:]}.")
