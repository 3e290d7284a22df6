"""Stages: the dataflow graph, its cut nodes, where the stages of a CNN begin and end, and the planner.

The dataflow is a `networkx.DiGraph` of the traced graph; *cut nodes* are the nodes every input→output path
passes through, i.e. the dominators of the output. Hidden states are cut nodes:
- for each resolution level, the state is the cut node just before the *block* that holds the first
  downsampling op out of that level, where the block is the innermost module scope around that op that
  starts after the previous state (so EfficientNet's next expansion conv and DenseNet's transition conv
  belong to the next stage, not to this one); the last level ends before global pooling;
- `h0`, the stem output, is the end of the first weighted layer's chain of norms, activations and pools,
  when it lies at the first state's level (CIFAR ResNets, ConvNeXt) — otherwise the first level state
  is itself the stem output (ResNet's `act1`, as timm's `feature_info` has it).
The GC-W site of state `h_i` (i ≥ 1) is the last weighted layer on the longest path (in weighted layers)
from `h_{i-1}` to `h_i`: the main path, not a projection shortcut.

`plan(model)` builds the automatic plan: trace → shapes → stages → `Plan`.
"""

import contextlib
import dataclasses
import io
import warnings

import networkx as nx
import torch
from torch import fx, nn

from .errors import GCSurgeryError
from .layouts import is_point
from .plans import GCWSite, Plan, State, body_entries, fingerprint
from .shapes import NodeInfo, holds_tensor, propagate
from .trace import check_bare, leaf_names, preserve_modes, trace
from .verify import verified_trace

__all__ = [
    "Planned",
    "StateInfo",
    "Stages",
    "build_plan",
    "check_instance_forward",
    "check_example_inputs",
    "cut_nodes",
    "dataflow_graph",
    "default_example_inputs",
    "find_stages",
    "plan",
]


@dataclasses.dataclass(frozen=True)
class StateInfo:
    """A hidden state found in the graph, and the GC-W site of the stage it ends."""

    node: str
    module: str
    info: NodeInfo
    gcw_module: str | None
    gcw_param: str | None


@dataclasses.dataclass(frozen=True, eq=False)
class Stages:
    """What `find_stages` found: the hidden states and notes for the plan."""

    states: tuple[StateInfo, ...]
    notes: tuple[str, ...]


# -- the dataflow graph and its cut nodes -----------------------------------------------------------------


def dataflow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """Nodes of `gm` as a DiGraph with an edge from each input to each user.

    get_attr nodes are left out, and so, once shapes are propagated, are nodes that compute no tensor: sizes
    read off a tensor (`x.shape[2] // 2`, MViTv2's `feat_size`) run beside the data and would hide cut nodes.
    """
    propagated = any("val" in n.meta or "tensor_meta" in n.meta for n in gm.graph.nodes)

    def skip(n: fx.Node) -> bool:
        if n.op == "get_attr":
            return True
        meta = n.meta.get("val", n.meta.get("tensor_meta"))
        return propagated and n.op not in ("placeholder", "output") and not holds_tensor(meta)

    g = nx.DiGraph()
    for i, node in enumerate(gm.graph.nodes):
        if skip(node):
            continue
        g.add_node(node.name, order=i, op=node.op)
        for arg in node.all_input_nodes:
            if not skip(arg):
                g.add_edge(arg.name, node.name)
    return g


def cut_nodes(g: nx.DiGraph, sources: list[str], sink: str) -> list[str]:
    """Nodes that every path from any source to `sink` passes through, in topological order."""
    g = g.copy()
    root = "__gc_source__"
    g.add_edges_from((root, s) for s in sources)
    idom = nx.immediate_dominators(g, root)
    if sink not in idom:
        return []
    chain, node = [], sink
    while node != root:
        chain.append(node)
        node = idom[node]
    return chain[::-1]


# -- stages -----------------------------------------------------------------------------------------------


def _weight_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The qualified name of the conv/linear weight (ndim ≥ 2) a node applies, if any."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() >= 2 and not isinstance(mod, nn.Embedding):
            return f"{node.target}.weight"
        return None
    if node.op in ("call_function", "call_method"):
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                try:
                    value = gm.get_parameter(arg.target)
                except AttributeError:
                    continue
                if value.dim() >= 2:
                    return arg.target
    return None


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = next(reversed(stack.values()))
    return last[0] if isinstance(last, tuple) else str(last)


def _scopes(node: fx.Node) -> list[str]:
    """Module scopes enclosing a node, innermost first (a call_module node's own module excluded)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return [p for p in reversed(paths) if p]


def _owner_module(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    return _module_path(node)


def find_stages(gm: fx.GraphModule, example: torch.Tensor) -> Stages:
    """Finds hidden states and GC-W sites of a traced CNN. See the module docstring for the rules."""
    infos = propagate(gm, example)
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    g = dataflow_graph(gm)
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n.name for n in gm.graph.nodes if n.op == "output")
    live = set(nx.descendants(g, inputs[0])) | {inputs[0]}
    live &= set(nx.ancestors(g, output)) | {output}
    g = g.subgraph(live).copy()
    cuts = cut_nodes(g, [inputs[0]], output)
    dense = _dense_output(gm, infos)
    notes: list[str] = []

    # the spatial body: cut nodes with a spatial layout, up to global pooling
    body: list[str] = []
    for name in cuts:
        info = infos[name]
        if name in inputs or nodes[name].op == "output":
            continue  # a state at the output node would get a branch after the output, which never runs
        if info.layout is None:
            if body and info.shape is not None and len(info.shape) == 2:
                break  # (B, C): pooled features, the head
            continue
        if body and is_point(info.hw) and not is_point(infos[body[-1]].hw):
            break  # global pooling
        body.append(name)
    weighted = {n: _weight_of(gm, nodes[n]) for n in g.nodes}
    # resolutions the weighted layers work at: more than one means a hierarchy, wherever it lives
    any_levels = sorted({infos[n].reduction for n in g.nodes if weighted[n] and infos[n].reduction is not None})
    if not body:
        _refuse(gm, example, any_levels, "no feature map that every input-to-output path passes through", dense=dense)
    levels = sorted({infos[n].reduction for n in body})
    # nothing finer than the body's first feature map (the stem) is a resolution level: CaiT's talking-heads
    # linears mix (B, N, N, heads) attention maps, whose N×N reads as an image at reduction 1
    any_levels = [lv for lv in any_levels if lv >= levels[0]]
    if len(levels) < 2 and len(any_levels) < 2:  # isotropic (ViTs without a class token, ConvMixer): no pairs
        _refuse(gm, example, any_levels or levels, "")
    downsamplers = _downsampling_ops(g, infos, nodes)
    scopes = _scope_index(nodes)

    states: list[str] = []
    for level in levels:
        at_level = [n for n in body if infos[n].reduction == level]
        first, last = order[at_level[0]], at_level[-1]
        out_ops = [d for d in downsamplers if order[d] > first and infos[d].reduction > level]
        out_ops = [d for d in out_ops if all(infos[a].reduction == level for a in _spatial_inputs(nodes[d], infos))]
        # the stream goes down only where the next cut node is as coarse: pooled keys and values (MViTv2, PVT's
        # spatial reduction) are attended to by the finer queries, and the block's output stays fine
        out_ops = [d for d in out_ops if infos[_next_cut(body, order, d)].reduction >= infos[d].reduction]
        state = last
        if out_ops and level != levels[-1]:
            d = min(out_ops, key=order.get)
            floor = max(first, order[states[-1]] if states else -1)
            start = _block_start(nodes[d], scopes, order, weighted, infos, level, floor=floor)
            before = [n for n in at_level if order[n] < start]
            state = before[-1] if before else None
        if state is None or state in states or (states and order[state] <= order[states[-1]]):
            continue
        states.append(state)
    all_levels = {infos[n].reduction for n in g.nodes if infos[n].reduction is not None and not is_point(infos[n].hw)}
    missing = sorted(lv for lv in all_levels - {infos[s].reduction for s in states} if lv > levels[0])
    if missing and dense is not None and len(states) < 2:  # a U-Net's skips leave one level: say why
        _refuse(
            gm,
            example,
            any_levels,
            f"no node at reduction {', '.join(map(str, missing))} that every path passes through",
            dense=dense,
        )
    if missing:
        notes.append(
            f"no hidden state at reduction {', '.join(map(str, missing))}: no node there lies on every "
            f"input-to-output path (parallel streams or a stage skipped over), so no GC-ODE pair ends there"
        )

    stem = _stem_output(gm, g, nodes, body, order)
    if stem is not None and stem not in states and order[stem] < order[states[0]]:
        if infos[stem].reduction == infos[states[0]].reduction:
            states.insert(0, stem)
    if len(states) < 2:
        _refuse(gm, example, any_levels, f"hidden states only at reduction {levels}", dense=dense)

    result = []
    for i, name in enumerate(states):
        site = _last_weighted(g, _main_path(weighted, infos, name), states[i - 1], name, order) if i > 0 else None
        mod = _owner_module(nodes[site]) if site else None
        result.append(StateInfo(name, _owner_module(nodes[name]), infos[name], mod, weighted[site] if site else None))
    return Stages(tuple(result), tuple(notes))


def _dense_output(gm: fx.GraphModule, infos) -> int | None:
    """The reduction of the output when it is a feature map finer than the coarsest one (a dense prediction)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    arg = output.args[0]
    first = arg if isinstance(arg, fx.Node) else next(iter(getattr(arg, "values", lambda: arg)()), None)
    info = infos.get(first.name) if isinstance(first, fx.Node) else None
    levels = [i.reduction for i in infos.values() if i.reduction is not None]
    if info is None or info.reduction is None or not levels or info.reduction >= max(levels):
        return None
    return info.reduction


def _refuse(gm, example, levels: list[int], why: str, *, dense: int | None = None):
    name, shape = type(gm).__name__, tuple(example.shape)
    if dense is not None and len(levels) >= 2:
        raise GCSurgeryError(
            f"{name} has feature maps at reductions {levels} (input {shape}) but {why}: its output is a feature map "
            f"at reduction {dense}, a dense prediction (segmentation, a U-Net), whose skip connections carry each "
            f"encoder level around the coarser ones, so no node between them lies on every input-to-output path. "
            f"Plan the encoder alone (gcsurgery.gcify(model.encoder), the decoder kept as it is), or build a Plan "
            f"by hand with gcsurgery.Plan."
        )
    if len(levels) < 2:
        raise GCSurgeryError(
            f"{name} has no spatial downsampling (input {shape}, feature maps at reduction {levels or 'none'}); "
            f"GC-ODE pairs need at least two resolution levels. MLPs and plain ViTs are not supported; "
            f"for a CNN, check that the example input is large enough."
        )
    raise GCSurgeryError(
        f"{name} has feature maps at reductions {levels} (input {shape}) but {why}: its resolutions live in "
        f"parallel streams or in token layouts with extra tokens (a class token), so no hidden state chain exists. "
        f"Build a plan by hand with gcsurgery.Plan, or pass leaf_modules= to hide the parallel parts."
    )


def _next_cut(body: list[str], order, d: str) -> str:
    """The first body node at or after `d` in graph order (`d` itself past the body's end)."""
    return next((b for b in body if order[b] >= order[d]), d)


def _spatial_inputs(node, infos):
    return [a.name for a in node.all_input_nodes if infos.get(a.name) and infos[a.name].reduction is not None]


def _downsampling_ops(g, infos, nodes) -> list[str]:
    """Nodes whose output is at a coarser resolution level than all their spatial inputs."""
    out = []
    for name in g.nodes:
        info = infos[name]
        if info.reduction is None:
            continue
        ins = _spatial_inputs(nodes[name], infos)
        if ins and info.reduction > max(infos[a].reduction for a in ins) and not is_point(info.hw):
            out.append(name)
    return out


def _scope_index(nodes) -> dict[str, list[fx.Node]]:
    """Every module scope and the nodes inside it (nested scopes included)."""
    index: dict[str, list[fx.Node]] = {}
    for node in nodes.values():
        path = _owner_module(node)
        while path:
            index.setdefault(path, []).append(node)
            path = path.rpartition(".")[0]
    return index


def _block_start(d: fx.Node, scopes, order, weighted, infos, level: int, *, floor: int) -> int:
    """Graph position where the block holding downsampler `d` starts.

    The block is the outermost module scope around `d` that starts after `floor` and holds at most one weighted
    layer at the current resolution level (an expansion or bottleneck conv): a whole stage list would hold many.
    Without such a scope (a flat Sequential like VGG's `features`), the block is `d` itself.
    """
    start = order[d.name]
    for scope in _scopes(d):
        members = scopes.get(scope, [])
        first = min((order[n.name] for n in members), default=start)
        at_level = [n for n in members if weighted.get(n.name) and infos[n.name].reduction == level]
        if first <= floor or len(at_level) > 1:
            break
        start = min(start, first)
    return start


def _stem_output(gm, g, nodes, body, order) -> str | None:
    """End of the chain that starts at the first weighted layer: norms, activations and pools up to a fork."""
    first = next((n for n in body if _weight_of(gm, nodes[n])), None)
    if first is None:
        return None
    node = first
    while True:
        succ = list(g.successors(node))
        if len(succ) != 1:
            return node
        nxt = succ[0]
        if nxt not in body or _weight_of(gm, nodes[nxt]) or len(list(g.predecessors(nxt))) != 1:
            return node
        node = nxt


def _main_path(weighted: dict, infos: dict, state: str) -> dict:
    """The weighted layers that can be a stage's GC-W site: those whose output is a feature map like the state's.

    A squeeze-excitation gate's convs or linears work on (B, C, 1, 1) or (B, C) pooled features, a side branch
    that scales the main path; the longest path through such a gate runs through more weighted layers than the
    main path, but its last layer is not the layer before downsampling.
    """
    hw = infos[state].hw
    return {
        n: w
        for n, w in weighted.items()
        if w and infos[n].layout is not None and (not is_point(infos[n].hw) or is_point(hw))
    }


def _last_weighted(g, weighted, src: str, dst: str, order) -> str | None:
    """The last weighted node on the path from src to dst with the most weighted nodes."""
    region = (nx.descendants(g, src) & nx.ancestors(g, dst)) | {dst}
    depth: dict[str, int] = {src: 0}
    best: dict[str, str | None] = {src: None}
    for n in sorted(region, key=order.get):
        preds = [p for p in g.predecessors(n) if p in depth]
        if not preds:
            continue
        p = max(preds, key=lambda q: (depth[q], order[q]))
        depth[n] = depth[p] + (1 if weighted.get(n) else 0)
        best[n] = n if weighted.get(n) else best[p]
    return best.get(dst)


# -- the planner -----------------------------------------------------------------------------------------


DEFAULT_SIZE = (224, 224)


def _first_conv(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first convolution in module order."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, tuple(CONVS.values()))), None)


def _input_conv(model: nn.Module, gm: fx.GraphModule) -> tuple[str, nn.Module] | None:
    """The first convolution the input goes into directly: a conv module called on the input, or one whose own
    forward reads it (a same-padding conv pads it first, a weight-standardized conv calls F.conv2d on it)."""
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for node in gm.graph.nodes:
        owner = _owner_module(node) if x in node.all_input_nodes else ""
        try:
            mod = model.get_submodule(owner) if owner else None
        except AttributeError:
            continue
        if isinstance(mod, tuple(CONVS.values())):
            return owner, mod
    return None


def declared_input_sizes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Input sizes (C, H, W) the model carries: timm's `pretrained_cfg` / `default_cfg`, torchvision weights."""
    out = []
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        out.append(("timm's pretrained_cfg['input_size']", tuple(int(d) for d in cfg["input_size"])))
    weights = getattr(model, "weights", None)  # a torchvision WeightsEnum kept on the model
    if weights is not None and callable(getattr(weights, "transforms", None)) and hasattr(weights, "meta"):
        crop = getattr(weights.transforms(), "crop_size", None)
        if crop:
            crop = list(crop) * (2 // len(crop))
            out.append((f"the torchvision weights {weights}", (3, *map(int, crop))))
    return out


def _channels(model: nn.Module, gm: fx.GraphModule, hw, declared) -> tuple[int, str]:
    """The input's channel count and where it came from (see `default_input`)."""
    reader = _input_conv(model, gm)
    if reader is not None:
        chans = reader[1].in_channels
        return chans, f"{chans} channel{'s' * (chans != 1)} from the first convolution {reader[0]!r}"
    conv = _first_conv(model)
    if conv is None:  # an MLP or a ViT: nothing to check the count against
        chans = declared[0][1][0] if declared else 3
        return chans, f"{chans} channel{'s' * (chans != 1)} {f'from {declared[0][0]}' if declared else 'assumed'}"
    # the input goes through something else first (a DCT stem, space-to-depth): the first count the model runs on
    sources = [(size[0], f"from {src}") for src, size in declared[:1]]
    sources += [(conv[1].in_channels, f"from the first convolution {conv[0]!r}")]
    sources += [(3, "assumed (an RGB image)"), (1, "assumed (a one-channel image)")]
    param = next(iter(model.parameters()), None)
    like = {"device": param.device, "dtype": param.dtype} if param is not None and param.is_floating_point() else {}
    tried, failure = [], ""
    for chans, src in sources:
        if chans in tried:
            continue
        tried.append(chans)
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # a failing graph prints its traceback
                propagate(gm, torch.randn(1, chans, *hw, **like))
        except GCSurgeryError as e:
            failure = failure or _short(str(e.__cause__ or e))
            continue
        failed = f", not on {', '.join(map(str, tried[:-1]))}" if len(tried) > 1 else ""
        return chans, (
            f"{chans} channel{'s' * (chans != 1)} {src}: the input reaches no convolution directly (the first, "
            f"{conv[0]!r}, takes {conv[1].in_channels}) and the model runs on {chans}{failed}"
        )
    raise GCSurgeryError(
        f"{type(model).__name__}: no example_inputs given, and the input channels are not known: the input reaches no "
        f"convolution directly (the first, {conv[0]!r}, takes {conv[1].in_channels}), and the model runs on none of "
        f"{tried} channels at {hw[0]}x{hw[1]} (with {tried[0]}: {failure}); pass example_inputs=(1, C, H, W) with "
        f"the input your model takes."
    )


def _short(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def default_input(model: nn.Module, *, graph: fx.GraphModule | None = None) -> tuple[tuple[int, ...], str]:
    """The example shape used when none is given, and a plan note saying where it came from.

    The spatial size comes from what the model declares (timm's `pretrained_cfg`, torchvision weights kept on the
    model), else 224x224; warns when two declared sizes differ. The channels come from the convolution the input
    goes into (found in the traced graph: `resnet18(in_chans=1)` takes 1 channel, whatever its `pretrained_cfg`
    says). Where the input goes through something else first (CSATv2's DCT stem, TResNet's space-to-depth), they
    are the first of the declared count, the first convolution's, 3 and 1 that the model runs on.

    Args:
        model: the network.
        graph: its traced eval-mode graph, where the caller has one; else the model is traced.
    """
    declared = declared_input_sizes(model)
    if declared:
        source, size = declared[0]
        others = [f"{src} says {s}" for src, s in declared[1:] if s[1:] != size[1:]]
        if others:
            warnings.warn(
                f"{type(model).__name__}: {source} declares input size {size}, but {'; '.join(others)}; planning "
                f"at {size[1]}x{size[2]}. Pass example_inputs= with the size you will train at.",
                stacklevel=3,
            )
        hw, where = size[1:], f"from {source} {size}"
    else:
        hw, where = DEFAULT_SIZE, "assumed: the model declares no input size"
    if graph is None:
        with preserve_modes(model):
            graph = trace(model).eval
    chans, from_where = _channels(model, graph, hw, declared)
    shape = (1, chans, *hw)
    note = (
        f"no example_inputs given: input {'x'.join(map(str, shape))} (size {where}, {from_where}); the plan depends "
        f"on the input size (which levels exist, which maps are 1x1): pass example_inputs=(1, {chans}, H, W) for yours"
    )
    return shape, note


def default_example_inputs(model: nn.Module) -> torch.Tensor:
    """An example batch of `default_input(model)`'s shape."""
    return torch.randn(default_input(model)[0])


def _check_channels(model: nn.Module, gm: fx.GraphModule, example: torch.Tensor) -> None:
    """The convolution the input goes into directly must take the example's channel count."""
    reader = _input_conv(model, gm)
    if reader is not None and reader[1].in_channels != example.shape[1]:
        name, expects = reader[0], reader[1].in_channels
        raise GCSurgeryError(
            f"example_inputs has {example.shape[1]} channels (shape {tuple(example.shape)}), but the "
            f"model's first convolution {name!r} expects {expects}; pass an input with {expects} channels."
        )


CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _dimensionality(model: nn.Module) -> int:
    """2 for a CNN with 2-D convolutions (or none), else 1 or 3: the dimensionality of its Conv1d / Conv3d layers."""
    dims = {d for m in model.modules() for d, conv in CONVS.items() if isinstance(m, conv)}
    return 2 if not dims or 2 in dims else min(dims)


def check_example_inputs(model: nn.Module, example) -> torch.Tensor:
    """Validates (or builds, from a shape) the example batch for tracing and shape propagation."""
    if example is None:
        example = default_example_inputs(model)
    if isinstance(example, tuple | list) and all(isinstance(d, int) for d in example):
        example = torch.randn(*example)
    if isinstance(example, tuple | list) and len(example) == 1 and isinstance(example[0], torch.Tensor):
        example = example[0]
    if not isinstance(example, torch.Tensor):
        raise GCSurgeryError(
            f"example_inputs must be a tensor (or a shape tuple), got {type(example).__name__}; "
            "pass e.g. torch.randn(2, 3, 224, 224)."
        )
    d = _dimensionality(model)
    if d != 2 and example.dim() != d + 2:
        batch = "(B, C, L)" if d == 1 else "(B, C, D, H, W)"
        raise GCSurgeryError(
            f"{type(model).__name__} is a {d}-D CNN (Conv{d}d layers), which takes {batch} batches, but "
            f"example_inputs has shape {tuple(example.shape)}; pass a batch of that rank, e.g. "
            f"torch.randn({'2, 1, 16000' if d == 1 else '2, 1, 32, 64, 64'})."
        )
    if d == 2 and example.dim() != 4:
        raise GCSurgeryError(
            f"example_inputs must be a 4-D image batch (B, C, H, W), got shape {tuple(example.shape)}; "
            "add the batch dimension with x.unsqueeze(0) or pass e.g. torch.randn(2, 3, 224, 224)."
        )
    if not example.is_floating_point():
        raise GCSurgeryError(f"example_inputs must be floating point, got {example.dtype}; use x.float().")
    param = next(iter(model.parameters()), None)
    if param is not None:
        if not param.is_floating_point():
            raise GCSurgeryError(f"the model's parameters are {param.dtype}; gcsurgery needs a float model.")
        example = example.to(device=param.device, dtype=param.dtype)
    return example


def _cross_check(model: nn.Module, states: tuple[State, ...], input_shape: tuple[int, ...]) -> list[str]:
    """Notes comparing the states with timm's `feature_info`, with the reason for each difference."""
    info = getattr(model, "feature_info", None)
    try:
        stages = [(f["num_chs"], f["reduction"], f.get("module", "")) for f in info]
    except (TypeError, KeyError):
        return []
    if not stages:
        return []
    have = {(s.num_chs, s.reduction) for s in states}
    missing = [(c, r, m) for c, r, m in stages if (c, r) not in have]
    if not missing and len(stages) == len(states):
        return [f"matches all {len(stages)} stages of timm's feature_info"]
    if not missing:
        return [
            f"timm's feature_info has {len(stages)} stages, this plan {len(states)} states; "
            "each stage's (channels, reduction) is among the states"
        ]
    hw = tuple(input_shape[2:])
    size = "x".join(map(str, hw))
    intended, other = [], []
    for c, r, m in missing:
        what = f"{m} ({c} ch, /{r})"
        at = [s for s in states if s.reduction == r]
        if at and r == states[-1].reduction and at[-1] is states[-1]:
            s = at[-1]
            intended.append(
                f"{what}: the plan's last state is {s.module or s.node} ({s.num_chs} ch, /{r}), the last feature map "
                f"before global pooling, so the last stage's GC-ODE pair and GC-W site cover the layers after {m} too"
            )
        elif at:
            s = at[-1]
            other.append(
                f"{what}: the plan's state at /{r} is {s.module or s.node} ({s.num_chs} ch), by the state rule (the "
                f"cut node before the block that leaves /{r}, or the stem output; docs/design.md)"
            )
        elif hw and all(d // r <= 1 for d in hw):
            other.append(
                f"{what} not a state: its map is 1x1 at this input size ({size}), read as pooled features, not a "
                f"resolution level; plan with example_inputs of at least {2 * r}x{2 * r} to have it"
            )
        else:
            other.append(f"{what} not a state: no node at /{r} lies on every input-to-output path")
    notes = []
    if intended:
        notes.append(f"differs from timm's feature_info as intended at: {'; '.join(intended)}")
    if other:
        notes.append(f"differs from timm's feature_info at: {'; '.join(other)}")
    return notes


def plan(model: nn.Module, example_inputs=None, *, leaf_modules=(), verify: bool = True) -> Plan:
    """Builds the automatic insertion plan for a CNN.

    Args:
        model: a timm, torchvision or user CNN (left untouched; its train/eval mode is restored).
        example_inputs: an example batch (or its shape). Without it: the channel count of the convolution the
            input goes into (see `default_input`), the size timm's `pretrained_cfg` (or torchvision weights on the
            model) declares, else 224x224; the plan's first note says which.
        leaf_modules: submodules to keep opaque when tracing: qualified names or classes.
        verify: check the traced graph against the eager model (outputs, buffers and parameter gradients in
            eval and train mode) and make diverging modules leaves; False skips the check.

    Returns:
        The plan: hidden states h0..hN, GC-ODE pairs (h_{i-1}, h_i), and one GC-W site per stage.
    """
    return build_plan(model, example_inputs, leaf_modules=leaf_modules, verify=verify).plan


@dataclasses.dataclass(frozen=True, eq=False)
class Planned:
    """A plan with what verifying it ran: the example batch and the eager model's runs (reused by gcify)."""

    plan: Plan
    example: torch.Tensor
    references: dict


def check_instance_forward(model: nn.Module) -> None:
    """Refuses a model whose forward is replaced on the instance: torch.fx traces the class's forward."""
    if "forward" in vars(model):
        name = type(model).__name__
        raise GCSurgeryError(
            f"{name}'s forward is replaced on the instance (model.forward = ...), and torch.fx traces the class's "
            f"forward instead, a different program. Wrap it in a module whose forward calls it:\n"
            f"    class Wrapped(torch.nn.Module):\n"
            f"        def __init__(self, net): super().__init__(); self.net = net\n"
            f"        def forward(self, x): return self.net(x)\n"
            f"then plan/gcify Wrapped(model) (its parameters are named net.*)."
        )


def build_plan(model: nn.Module, example_inputs=None, *, leaf_modules=(), verify: bool = True) -> Planned:
    """`plan`, keeping the example batch and the eager runs of verification."""
    if not isinstance(model, nn.Module):
        raise GCSurgeryError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself.")
    if not isinstance(verify, bool):
        raise GCSurgeryError(f"verify must be True or False, got {verify!r}.")
    check_bare(model)
    check_instance_forward(model)
    assumed, traced = [], None
    if example_inputs is None:  # the channels come from the traced graph
        with preserve_modes(model):
            traced = trace(model, leaf_modules=leaf_modules)
        example_inputs, note = default_input(model, graph=traced.eval)
        assumed.append(note)
    example = check_example_inputs(model, example_inputs)
    references, verified, checked = {}, "", ()
    with preserve_modes(model):
        if traced is None:
            traced = trace(model, leaf_modules=leaf_modules)
        names = leaf_names(model, leaf_modules)
        if verify:
            traced, checked, verdict = verified_trace(model, traced, example, leaf_modules=names)
            references, verified = verdict.references, verdict.summary
        _check_channels(model, traced.eval, example)
        result = find_stages(traced.eval, example)
    states = tuple(
        State(s.node, s.module, tuple(s.info.shape[1:]), s.info.layout, s.info.channels, s.info.reduction)
        for s in result.states
    )
    notes = assumed + list(result.notes)
    if traced.dual:
        train_nodes = {n.name: n for n in traced.train.graph.nodes}
        eval_nodes = {n.name: n for n in traced.eval.graph.nodes}
        absent = [
            s.node
            for s in states
            if s.node not in train_nodes or train_nodes[s.node].target != eval_nodes[s.node].target
        ]
        if not absent:  # same names can mean other nodes when the graphs differ: compare the shapes too
            try:
                with preserve_modes(model):
                    train_infos = propagate(traced.train, example, training=True)
                absent = [s.node for s in result.states if train_infos[s.node].shape != s.info.shape]
            except GCSurgeryError:
                notes.append("the train-mode graph could not be run on the example; states matched by name only")
        if absent:
            raise GCSurgeryError(
                f"{type(model).__name__} traces to different graphs in train and eval mode, and the hidden states "
                f"{absent} of the eval graph have no counterpart in the train graph; pass leaf_modules= naming the "
                f"blocks whose forward branches on self.training."
            )
        notes.append("traces differently in train and eval mode; the states exist in both graphs")
    notes += _cross_check(model, states, tuple(example.shape))
    sites = tuple(GCWSite(s.gcw_module, s.gcw_param, i) for i, s in enumerate(result.states) if s.gcw_param)
    depends_on = body_entries(model, traced.eval.graph, states[-1].node)
    p = Plan(
        model=type(model).__name__,
        input_shape=tuple(example.shape),
        states=states,
        ode_pairs=tuple((i - 1, i) for i in range(1, len(states))),
        gcw_sites=sites,
        leaves=traced.leaves + checked,
        notes=tuple(notes),
        fingerprint=fingerprint(model, depends_on),
        leaf_modules=names,
        verified=verified,
        fingerprint_format=2,
        depends_on=depends_on,
    )
    return Planned(p, example, references)
