"""Pass 1: symbolic tracing with torch.fx.

The tracer honours timm's not-trace registry (modules and functions timm marks as untraceable) and the
user's `leaf_modules`. When a submodule still fails to trace, it becomes a leaf and the model is traced
again; each such leaf is recorded with the reason, so the plan can say what it could not look inside.
Models whose forward branches on `self.training` trace to different graphs in train and eval mode: both
graphs are traced, the train graph's nodes are named after their eval-graph counterparts (so a node name
means the same op in both), and the caller decides whether they differ.
"""

import contextlib
import copy
import dataclasses
import difflib
import inspect
import os
import traceback

import torch
from torch import fx, nn

from .errors import GCSurgeryError
from .wrappers import wrapper_attr

__all__ = [
    "Leaf",
    "Traced",
    "check_bare",
    "check_leaf_modules",
    "leaf_names",
    "preserve_buffers",
    "preserve_modes",
    "trace",
]

MAX_FALLBACK_LEAVES = 16


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A submodule traced as one opaque call, and why."""

    module: str
    reason: str


@dataclasses.dataclass(frozen=True, eq=False)
class Traced:
    """The train- and eval-mode graphs of one model (the same object when the model traces identically)."""

    train: fx.GraphModule
    eval: fx.GraphModule
    leaves: tuple[Leaf, ...]

    @property
    def dual(self) -> bool:
        return self.train is not self.eval


def check_bare(model: nn.Module) -> None:
    """Refuses DDP, DataParallel and torch.compile wrappers: the order is gcify, then wrap."""
    attr = wrapper_attr(model)
    if attr == "module":
        raise GCSurgeryError(
            f"got a model wrapped in {type(model).__name__}; gcify the inner model (model.module) before wrapping it."
        )
    if attr == "_orig_mod":
        raise GCSurgeryError("got a torch.compile'd model; gcify the original model, then call torch.compile on it.")


def check_leaf_modules(leaf_modules) -> None:
    """Refuses a lone name or class where a collection of them is expected (a str would be read letter by letter)."""
    if isinstance(leaf_modules, str | type) or not isinstance(leaf_modules, list | tuple | set | frozenset):
        raise GCSurgeryError(
            f"leaf_modules must be a list or tuple of qualified names or module classes, got {leaf_modules!r}; "
            f"pass e.g. leaf_modules=[{leaf_modules!r}]."
        )


def leaf_names(model: nn.Module, leaf_modules) -> tuple[str, ...]:
    """The qualified names that `leaf_modules` (names or classes) covers in `model`, in module order."""
    check_leaf_modules(leaf_modules)
    types = tuple(m for m in leaf_modules if isinstance(m, type))
    names = {m for m in leaf_modules if isinstance(m, str)}
    return tuple(n for n, m in model.named_modules() if n and (n in names or (types and isinstance(m, types))))


@contextlib.contextmanager
def preserve_modes(model: nn.Module):
    """Restores the train/eval flag of every submodule on exit (tracing and shape propagation switch them)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def preserve_buffers(model: nn.Module):
    """Restores every buffer of every submodule on exit: the tensor itself and its values.

    A forward may replace a buffer instead of updating it: ConViT's GPSA keeps a (1, 1, 1, 3) placeholder for
    `rel_indices` and assigns the (1, N, N, 3) table on its first call. Copying the old values into the new tensor
    would broadcast the placeholder over the table, and the next run would read that instead of building it; so
    the old tensor is put back, and buffers registered during the run are removed.
    """
    saved = [(m, dict(m._buffers), set(m._non_persistent_buffers_set)) for m in model.modules()]
    tensors = {id(b): b for _, buffers, _ in saved for b in buffers.values() if b is not None}
    values = {k: b.detach().clone() for k, b in tensors.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers, non_persistent in saved:
                m._buffers.clear()
                m._buffers.update(buffers)
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(non_persistent)
            for k, b in tensors.items():
                b.copy_(values[k])


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but tracing plain torchvision models needs none of it
        return (), ()
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), functions


def _stochastic_depth_types() -> tuple[type, ...]:
    """Residual-dropping modules (timm's DropPath, torchvision's StochasticDepth), kept opaque.

    Traced inline, their train-mode ops (`new_empty`, `bernoulli_`) make a second graph of every model with a
    nonzero drop-path rate (NextViT by default); as leaves, train and eval mode trace to the same graph.
    """
    types = []
    for module, name in (("timm.layers", "DropPath"), ("torchvision.ops", "StochasticDepth")):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(types)


class GCTracer(fx.Tracer):
    """An fx tracer with extra leaves by type and by qualified name, that remembers where tracing failed."""

    def __init__(self, *, leaf_types: tuple[type, ...], leaf_names: frozenset[str], autowrap_functions: tuple):
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.failed_module: str | None = None
        self.unregistered: str | None = None  # class of a module called in forward that is not a submodule

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None and self.unregistered is None:  # the innermost module fails first
                try:
                    self.failed_module = self.path_of_module(m)
                except NameError:  # not a submodule: built inside forward (`self.features[:5](x)`)
                    self.unregistered = type(m).__name__
            raise


_FUNCTION_CALLS: dict[type, object] = {}


def function_call(cls: type):
    """The graph-node target that stands for `cls.apply` of a custom autograd Function (one per class)."""
    call = _FUNCTION_CALLS.get(cls)
    if call is None:

        def call(*args, **kwargs):
            return cls.apply(*args, **kwargs)

        call.__name__ = call.__qualname__ = f"{cls.__name__}_apply"
        _FUNCTION_CALLS[cls] = call
    return call


@contextlib.contextmanager
def opaque_autograd_functions():
    """While tracing, `SomeFunction.apply(traced value, ...)` records one call node instead of tracing the
    Function's forward, so its custom backward is kept (gradient reversal, straight-through estimators,
    memory-efficient Swish)."""
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        proxies = []
        fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
        if not proxies:
            return original.__get__(None, cls)(*args, **kwargs)
        return proxies[0].tracer.create_proxy("call_function", function_call(cls), args, kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original


def _trace_once(model: nn.Module, leaf_types, leaf_names, functions) -> fx.GraphModule:
    tracer = GCTracer(leaf_types=leaf_types, leaf_names=leaf_names, autowrap_functions=functions)
    try:
        with opaque_autograd_functions():
            graph = tracer.trace(model, concrete_args=_optional_args(model))
    except Exception as e:
        e.gc_failed_module = tracer.failed_module
        e.gc_unregistered = tracer.unregistered
        raise
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _optional_args(model: nn.Module) -> dict | None:
    """Forward arguments after the image that have defaults (masks, flags) are fixed at those defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    optional = {
        p.name: p.default
        for p in params[1:]
        if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    return optional or None


def _short_reason(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _where(e: Exception) -> str:
    ours = os.path.dirname(os.path.abspath(__file__))
    frames = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if "/torch/fx/" not in f.filename and os.path.dirname(os.path.abspath(f.filename)) != ours
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({f.line})"


def _trace_mode(model: nn.Module, training: bool, leaf_types, names: set[str], functions, leaves: list[Leaf]):
    model.train(training)
    while True:
        try:
            return _trace_once(model, leaf_types, frozenset(names), functions)
        except Exception as e:
            failed, name = getattr(e, "gc_failed_module", None), type(model).__name__
            unregistered = getattr(e, "gc_unregistered", None)
            if unregistered:
                raise GCSurgeryError(
                    f"{name}'s forward calls a {unregistered} that is not one of its submodules{_where(e)}: a module "
                    f"built inside forward (self.features[:5](x) makes a new Sequential on every call), which torch.fx "
                    f"cannot call. Build it once in __init__ (self.head = self.features[:5]) and call that, or pass "
                    f"leaf_modules= naming the submodule whose forward does this."
                ) from e
            if failed and failed not in names and len(leaves) >= MAX_FALLBACK_LEAVES:
                cls = type(model.get_submodule(failed)).__name__
                raise GCSurgeryError(
                    f"torch.fx cannot trace {name}: the fallback already made {len(leaves)} modules leaves (its "
                    f"limit), and {failed!r} ({cls}) fails too: {_short_reason(e)}. Pass leaf_modules=[{cls}] (the "
                    f"class: every {cls} becomes a leaf), with the classes of the leaves listed in the plan."
                ) from e
            if not failed or failed in names:
                where = f"module {failed!r}" if failed else f"the top-level {name}.forward"
                fix = (
                    "Pass leaf_modules=[...] naming the submodules that use data-dependent Python control flow, "
                    "or make the forward traceable (torch.fx.wrap for helper functions)."
                )
                if not failed:  # leaves cannot help the top level: keyword arguments, a ModelOutput, a branch
                    fix = (
                        "leaf_modules= cannot help here. If the forward takes keyword arguments or returns a dict or "
                        "a ModelOutput, wrap the model in a module whose forward(x) calls it and returns a tensor "
                        "(return self.net(pixel_values=x).logits); else make that forward traceable."
                    )
                raise GCSurgeryError(
                    f"torch.fx cannot trace {name} ({'train' if training else 'eval'} mode): "
                    f"tracing failed in {where}{_where(e)}: {_short_reason(e)}. {fix}"
                ) from e
            names.add(failed)
            leaves.append(Leaf(failed, _short_reason(e)))


def trace(model: nn.Module, *, leaf_modules=()) -> Traced:
    """Traces `model` in train and eval mode, restoring its mode afterwards.

    Args:
        model: the network.
        leaf_modules: submodules to keep opaque, given as qualified names (`"layer1.0"`) or module types.

    Returns:
        The traced graphs and the leaves added by the fallback.

    Raises:
        GCSurgeryError: the model is not an `nn.Module`, or still cannot be traced after the fallback.
    """
    if not isinstance(model, nn.Module):
        raise GCSurgeryError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself.")
    if isinstance(model, fx.GraphModule) and hasattr(model, "gc_plan"):
        raise GCSurgeryError(
            "this model is already gcified (it carries a gc_plan); use it as it is, or gcsurgery.strip() it first."
        )
    check_bare(model)
    check_leaf_modules(leaf_modules)
    leaf_types, functions = _timm_notrace()
    user_types = tuple(m for m in leaf_modules if isinstance(m, type))
    user_names = {m for m in leaf_modules if isinstance(m, str)}
    bad = [m for m in leaf_modules if not isinstance(m, str | type)]
    if bad:
        raise GCSurgeryError(f"leaf_modules must hold qualified names or module classes, got {bad!r}.")
    known = {name for name, _ in model.named_modules()}
    unknown = sorted(user_names - known)
    if unknown:
        raise GCSurgeryError(
            f"leaf_modules names {unknown} that are not submodules of {type(model).__name__}; "
            f"valid names are those of model.named_modules(), e.g. {sorted(known - {''})[:5]}."
        )
    leaf_types = leaf_types + _stochastic_depth_types() + user_types
    leaves: list[Leaf] = []
    names = set(user_names)
    was_training = model.training
    try:
        with torch.no_grad():
            eval_gm = _trace_mode(model, False, leaf_types, names, functions, leaves)
            train_gm = _trace_mode(model, True, leaf_types, names, functions, leaves)
            if len(leaves) and any(leaf.module not in _call_targets(eval_gm) for leaf in leaves):
                eval_gm = _trace_mode(model, False, leaf_types, names, functions, leaves)
    finally:
        model.train(was_training)
    if train_gm.code != eval_gm.code:
        train_gm = _named_like(train_gm, eval_gm)
    if train_gm.code == eval_gm.code:
        train_gm = eval_gm
    return Traced(train=train_gm, eval=eval_gm, leaves=tuple(leaves))


def _call_targets(gm: fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "call_module"}


def _node_key(node: fx.Node) -> tuple:
    scopes = tuple(v[0] if isinstance(v, tuple) else str(v) for v in (node.meta.get("nn_module_stack") or {}).values())
    return node.op, node.target if isinstance(node.target, str) else repr(node.target), scopes


def _named_like(gm: fx.GraphModule, reference: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` whose nodes carry the names of their counterparts in `reference`.

    fx numbers nodes in graph order (`mul`, `mul_1`, ...), so ops that only the train graph runs (a stochastic depth
    mask) shift the names of every later node, and one name would mean different ops in the two graphs. Counterparts
    are the nodes matched in order by op, target and enclosing modules; the others get names `reference` does not use.
    """
    mine, theirs = list(gm.graph.nodes), list(reference.graph.nodes)
    keys, reference_keys = [_node_key(n) for n in mine], [_node_key(n) for n in theirs]
    names = {}
    for i, j, size in difflib.SequenceMatcher(None, keys, reference_keys, autojunk=False).get_matching_blocks():
        names.update((mine[i + k], theirs[j + k].name) for k in range(size))
    taken = {n.name for n in theirs}
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    for node in mine:
        name = names.get(node)
        if name is None:
            name = f"{node.name}_train"
            while name in taken:
                name += "_"
            taken.add(name)
        args, kwargs = fx.map_arg(node.args, env.__getitem__), fx.map_arg(node.kwargs, env.__getitem__)
        env[node] = graph.create_node(node.op, node.target, args, kwargs, name=name, type_expr=node.type)
        env[node].meta = copy.copy(node.meta)
        assert env[node].name == name
    graph.lint()
    return fx.GraphModule(gm, graph, type(gm).__name__)
