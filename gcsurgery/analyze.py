"""Pass 2: shapes, layouts and the dataflow graph; where the stages of a CNN begin and end.

One shape propagation gives every node's output shape. Each 4-D (or square-token 3-D) tensor gets a
layout (NCHW, NHWC or NLC) and a spatial size, hence a *reduction* relative to the input, rounded to a
power of two (Inception's 8.5/17.6/37.4 become 8/16/32). The dataflow is a `networkx.DiGraph`; *cut
nodes* are the nodes every input→output path passes through, i.e. the dominators of the output.

Hidden states are cut nodes:
- for each resolution level, the state is the cut node just before the *block* that holds the first
  downsampling op out of that level, where the block is the innermost module scope around that op that
  starts after the previous state (so EfficientNet's next expansion conv and DenseNet's transition conv
  belong to the next stage, not to this one); the last level ends before global pooling;
- `h0`, the stem output, is the end of the first weighted layer's chain of norms, activations and pools,
  when it lies at the first state's level (CIFAR ResNets, ConvNeXt) — otherwise the first level state
  is itself the stem output (ResNet's `act1`, as timm's `feature_info` has it).
The GC-W site of state `h_i` (i ≥ 1) is the last weighted layer on the longest path (in weighted layers)
from `h_{i-1}` to `h_i`: the main path, not a projection shortcut.
"""

import dataclasses
import math

import networkx as nx
import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp

from .errors import GCSurgeryError

__all__ = ["Analysis", "NodeInfo", "analyze"]

PERMUTE_TO_NHWC = (0, 2, 3, 1)
PERMUTE_TO_NCHW = (0, 3, 1, 2)


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """What the analysis knows of one node's output."""

    shape: tuple[int, ...] | None  # full tensor shape, batch included; None for non-tensors
    layout: str | None = None  # "NCHW" | "NHWC" | "NLC" for spatial tensors
    hw: tuple[int, int] | None = None
    reduction: int | None = None  # input size / spatial size, rounded to a power of two

    @property
    def channels(self) -> int | None:
        if self.layout == "NCHW":
            return self.shape[1]
        if self.layout in ("NHWC", "NLC"):
            return self.shape[-1]
        return None


@dataclasses.dataclass(frozen=True)
class StateInfo:
    node: str
    module: str
    info: NodeInfo
    gcw_module: str | None
    gcw_param: str | None


@dataclasses.dataclass(frozen=True, eq=False)
class Analysis:
    gm: fx.GraphModule
    dataflow: nx.DiGraph
    infos: dict[str, NodeInfo]
    cut_nodes: tuple[str, ...]
    states: tuple[StateInfo, ...]
    notes: tuple[str, ...]


# -- shapes and layouts -----------------------------------------------------------------------------------


def _shape_of(node: fx.Node):
    meta = node.meta.get("val", node.meta.get("tensor_meta"))
    return tuple(meta.shape) if isinstance(meta, torch.Tensor) or hasattr(meta, "dtype") else None


def _reduction(in_hw, hw) -> int:
    ratio = math.sqrt((in_hw[0] * in_hw[1]) / (hw[0] * hw[1]))
    return 2 ** max(0, round(math.log2(ratio))) if ratio > 0 else 1


def _plausible(in_hw, h, w) -> bool:
    """Whether (h, w) can be a spatial size of a network fed `in_hw` (same aspect ratio, not larger).

    Halving a size k times rounds it down or up, which skews the aspect ratio of small maps: a 22x32 input has
    2x4 maps at /8 (ratios 11 and 8), so those sizes count too.
    """
    if h < 1 or w < 1 or h > in_hw[0] or w > in_hw[1]:
        return False
    rh, rw = in_hw[0] / h, in_hw[1] / w
    if max(rh, rw) / min(rh, rw) < 1.35 or (h <= 2 and w <= 2):
        return True
    n, m = in_hw
    return any(h in (n >> k, -(-n >> k)) and w in (m >> k, -(-m >> k)) for k in range(1, max(n, m).bit_length()))


def _permute_dims(node: fx.Node):
    dims = None
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 else None
        dims = dims or node.kwargs.get("dims")
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    return tuple(dims) if isinstance(dims, list | tuple) and all(isinstance(d, int) for d in dims) else None


def _infer_layout(node, shape, in_hw, parent_layout):
    """Layout of a tensor from its shape, the producing op and the layout of its first tensor input."""
    if len(shape) == 4:
        _, a, b, c = shape
        nchw, nhwc = _plausible(in_hw, b, c), _plausible(in_hw, a, b)
        dims = _permute_dims(node)
        if dims is not None and parent_layout in ("NCHW", "NHWC"):
            flipped = {PERMUTE_TO_NHWC: "NHWC", PERMUTE_TO_NCHW: "NCHW"}.get(tuple(d % 4 for d in dims))
            if flipped and (nhwc if flipped == "NHWC" else nchw):
                return flipped
        if nchw and nhwc:
            if parent_layout in ("NCHW", "NHWC"):
                return parent_layout
            return "NCHW" if c > 1 or a == 1 else "NHWC"
        if nchw:
            return "NCHW"
        if nhwc:
            return "NHWC"
        return None
    if len(shape) == 3 and parent_layout in ("NCHW", "NHWC", "NLC"):
        side = math.isqrt(shape[1])
        if side * side == shape[1] and side > 1 and _plausible(in_hw, side, side):
            return "NLC"
    return None


def _hw(layout, shape):
    if layout == "NCHW":
        return shape[2], shape[3]
    if layout == "NHWC":
        return shape[1], shape[2]
    side = math.isqrt(shape[1])
    return side, side


def propagate(gm: fx.GraphModule, example: torch.Tensor, *, training: bool = False) -> dict[str, NodeInfo]:
    """Runs the model once on `example` (no grad; eval mode unless `training`) and describes every node's output."""
    was_training = gm.training
    gm.train(training)
    try:
        with torch.no_grad():
            try:  # fake tensors: shapes without compute
                FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(example)
            except Exception:
                for node in gm.graph.nodes:
                    node.meta.pop("val", None)
                ShapeProp(gm).propagate(example)
    except Exception as e:
        raise GCSurgeryError(
            f"running {type(gm).__name__} on an example input of shape {tuple(example.shape)} failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"Pass example_inputs= of the size the model expects (e.g. torch.randn(2, 3, 224, 224))."
        ) from e
    finally:
        gm.train(was_training)
    in_hw = tuple(example.shape[-2:])
    infos: dict[str, NodeInfo] = {}
    flat: set[str] = set()
    for node in gm.graph.nodes:
        shape = _shape_of(node)
        if shape is None:
            infos[node.name] = NodeInfo(None)
            continue
        if node.op != "placeholder" and (not shape or shape[0] != example.shape[0]):
            infos[node.name] = NodeInfo(shape)  # batch folded with windows, heads or TNT's pixel tokens: no state
            continue
        parent = next((a for a in node.all_input_nodes if infos.get(a.name, NodeInfo(None)).layout), None)
        parent_layout = infos[parent.name].layout if parent is not None else None
        if parent is None and any(a.name in flat for a in node.all_input_nodes):
            parent_layout = "NLC"  # the transpose of a flattened feature map (B, C, H*W) is tokens
        if parent_layout == "NCHW" and shape == (*infos[parent.name].shape[:2], math.prod(infos[parent.name].hw)):
            infos[node.name] = NodeInfo(shape)
            flat.add(node.name)  # (B, C, H*W): a flattened feature map, not tokens, even where C is a square
            continue
        layout = "NCHW" if node.op == "placeholder" else _infer_layout(node, shape, in_hw, parent_layout)
        if layout is None:
            infos[node.name] = NodeInfo(shape)
            continue
        hw = _hw(layout, shape)
        infos[node.name] = NodeInfo(shape, layout, hw, _reduction(in_hw, hw))
    return infos


# -- the dataflow graph and its cut nodes -----------------------------------------------------------------


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor) or type(value).__name__ == "TensorMetadata":
        return True
    if isinstance(value, list | tuple):
        return any(_holds_tensor(v) for v in value)
    return isinstance(value, dict) and any(_holds_tensor(v) for v in value.values())


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
        return propagated and n.op not in ("placeholder", "output") and not _holds_tensor(meta)

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


def analyze(gm: fx.GraphModule, example: torch.Tensor) -> Analysis:
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
    notes: list[str] = []

    # the spatial body: cut nodes with a spatial layout, up to global pooling
    body: list[str] = []
    for name in cuts:
        info = infos[name]
        if name in inputs:
            continue
        if info.layout is None:
            if body and info.shape is not None and len(info.shape) == 2:
                break  # (B, C): pooled features, the head
            continue
        if body and info.hw == (1, 1) and infos[body[-1]].hw != (1, 1):
            break  # global pooling
        body.append(name)
    weighted = {n: _weight_of(gm, nodes[n]) for n in g.nodes}
    # resolutions the weighted layers work at: more than one means a hierarchy, wherever it lives
    any_levels = sorted({infos[n].reduction for n in g.nodes if weighted[n] and infos[n].reduction is not None})
    if not body:
        _refuse(gm, example, any_levels, "no feature map that every input-to-output path passes through")
    levels = sorted({infos[n].reduction for n in body})
    # nothing finer than the body's first feature map (the stem) is a resolution level: CaiT's talking-heads
    # linears mix (B, N, N, heads) attention maps, whose N×N reads as an image at reduction 1
    any_levels = [lv for lv in any_levels if lv >= levels[0]]
    if len(levels) < 2 and len(any_levels) < 2:  # isotropic (ViTs without a class token, ConvMixer): no pairs
        _refuse(gm, example, any_levels or levels, "")
    downsamplers = _downsampling_ops(gm, g, infos, nodes)
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
    all_levels = {infos[n].reduction for n in g.nodes if infos[n].reduction is not None and infos[n].hw != (1, 1)}
    missing = sorted(lv for lv in all_levels - {infos[s].reduction for s in states} if lv > levels[0])
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
        _refuse(gm, example, any_levels, f"hidden states only at reduction {levels}")

    result = []
    for i, name in enumerate(states):
        site = _last_weighted(g, weighted, states[i - 1], name, order) if i > 0 else None
        mod = _owner_module(nodes[site]) if site else None
        result.append(StateInfo(name, _owner_module(nodes[name]), infos[name], mod, weighted[site] if site else None))
    return Analysis(gm, g, infos, tuple(cuts), tuple(result), tuple(notes))


def _refuse(gm, example, levels: list[int], why: str):
    name, shape = type(gm).__name__, tuple(example.shape)
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


def _downsampling_ops(gm, g, infos, nodes) -> list[str]:
    """Nodes whose output is at a coarser resolution level than all their spatial inputs."""
    out = []
    for name in g.nodes:
        info = infos[name]
        if info.reduction is None:
            continue
        ins = _spatial_inputs(nodes[name], infos)
        if ins and info.reduction > max(infos[a].reduction for a in ins) and info.hw != (1, 1):
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


def _in_scope(node: fx.Node, scope: str) -> bool:
    path = _owner_module(node)
    return path == scope or path.startswith(scope + ".")


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
