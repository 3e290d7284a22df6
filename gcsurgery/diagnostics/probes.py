"""Where the plan's hidden states and stages are in a model's graph, and a graph with probes on them.

A *probe* is a zero tensor added to a hidden state: the gradient of the loss with respect to it is the
gradient with respect to the state. `probed(model, plan)` returns a `torch.fx.GraphModule` that shares the
model's parameters and takes, besides the model's inputs, keyword inputs ``gc_probe_h<i>`` (one per state)
and ``gc_probe_ode<k>`` (one per GC-ODE branch, added to the branch's source only, so its gradient is the
part of h_{a}'s gradient that comes back through the branch).
"""

import copy
import dataclasses

import torch
from torch import fx, nn

from ..errors import GCSurgeryError
from ..plans import Plan
from ..rewrite import gcify, is_gcified
from ..wrappers import unwrap

__all__ = ["Probed", "probed", "stage_groups", "graph_of"]


def add_probe(x, probe):
    """``x + probe``, or ``x`` when no probe is passed (the probed graph then computes what the model does)."""
    return x if probe is None else x + probe


def _branch_target(k: int) -> str:
    return f"gc.ode.{k}"  # where gcify puts the branch of plan.ode_pairs[k]


def graph_of(model: nn.Module, plan: Plan | None) -> tuple[fx.GraphModule, Plan]:
    """The eval-mode GraphModule of `model` with the plan's state nodes, sharing the model's parameters.

    A gcified model is its own graph. A plain one is gcified in place (its modules and parameters are shared,
    the model itself is left as it was) with the plan's GC-W sites only; without sites, with the plan's GC-ODE
    pairs, whose zero gates leave the function and every gradient of the original parameters unchanged.
    """
    net = unwrap(model)
    if is_gcified(net):
        if plan is not None and plan.states != net.gc_plan.states:
            raise GCSurgeryError(
                "plan= differs from the gcified model's own gc_plan (other hidden states); leave plan=None for a "
                "gcified model, or pass the plain model."
            )
        return net, net.gc_plan
    if plan is None:
        raise GCSurgeryError(
            f"{type(net).__name__} is not gcified and no plan was given; pass plan=gcsurgery.plan(model, "
            "example_inputs=...)."
        )
    if not isinstance(plan, Plan):
        raise GCSurgeryError(
            f"plan must be a gcsurgery.Plan, got {type(plan).__name__}; build one with gcsurgery.plan."
        )
    if not plan.ode_pairs and not plan.gcw_sites:
        raise GCSurgeryError(
            "the plan has no GC-ODE pairs and no GC-W sites, so gcsurgery cannot build its graph; use the automatic "
            "plan, gcsurgery.plan(model, example_inputs=...)."
        )
    slim = plan.without(pairs=range(len(plan.ode_pairs))) if plan.gcw_sites else plan
    training = {m: m.training for m in net.modules()}
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    with torch.random.fork_rng(devices=[]):
        gm = gcify(net, slim, inplace=True)
    for m, mode in training.items():
        m.training = mode
    with torch.no_grad():
        for k, b in net.named_buffers():
            b.copy_(buffers[k])
    return gm, plan


def _eval_graph(gm: fx.GraphModule) -> fx.Graph:
    graphs = getattr(gm, "graphs", (gm.graph,))
    return graphs[-1]  # GCGraphModule: (train, eval) or (graph,)


def _state_tensors(graph: fx.Graph, plan: Plan) -> list[fx.Node]:
    """For each state, the node that later layers read: the state node, or the last branch added to it."""
    nodes = {n.name: n for n in graph.nodes}
    out = []
    for s in plan.states:
        if s.node not in nodes:
            raise GCSurgeryError(f"the plan's state {s.node!r} is not a node of the model's graph; rebuild the plan.")
        node = nodes[s.node]
        while True:
            nxt = [u for u in node.users if u.op == "call_module" and str(u.target).startswith("gc.ode.")]
            nxt = [u for u in nxt if len(u.args) > 1 and u.args[1] is node]
            if not nxt:
                break
            node = nxt[0]
        out.append(node)
    return out


@dataclasses.dataclass
class Probed:
    module: fx.GraphModule  # takes the model's inputs and the probes as keywords
    plan: Plan
    states: dict[str, str]  # probe name → the node adding it, one per state
    branches: dict[str, tuple[int, int, str, str]]  # probe name → (src, dst, branch module, node adding it)
    groups: dict[str, list[str]]  # stage name → weight names, see `stage_groups`

    def shapes(self, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """Each probe's shape (without batch) when the model runs on `x`'s first sample."""
        wanted = {node: name for name, node in self.states.items()}
        wanted.update({v[3]: name for name, v in self.branches.items()})
        out = {}

        class Shapes(fx.Interpreter):
            def run_node(self, n):
                result = super().run_node(n)
                if n.name in wanted:
                    out[wanted[n.name]] = tuple(result.shape[1:])
                return result

        with torch.no_grad():
            Shapes(self.module).run(x[:1])
        return out


def probed(model: nn.Module, plan: Plan | None) -> Probed:
    """The model's eval graph with a zero probe added to each hidden state and to each GC-ODE branch's input."""
    gcified = is_gcified(unwrap(model))
    gm, plan = graph_of(model, plan)
    graph = copy.deepcopy(_eval_graph(gm))
    tensors = _state_tensors(graph, plan)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    states, branches = {}, {}
    for i, node in enumerate(tensors):
        name = f"gc_probe_h{i}"
        with graph.inserting_before(first):
            ph = graph.placeholder(name, default_value=None)
        with graph.inserting_after(node):
            add = graph.call_function(add_probe, (node, ph))
        node.replace_all_uses_with(add, delete_user_cb=lambda user, add=add: user is not add)
        states[name] = add.name
    by_target = {str(n.target): n for n in graph.nodes if n.op == "call_module"}
    for k, (a, b) in enumerate(plan.ode_pairs):
        node = by_target.get(_branch_target(k)) if gcified else None
        if node is None:
            continue  # a plain model has no branches (its graph may carry zero-gated ones, see graph_of)
        name = f"gc_probe_ode{k}"
        with graph.inserting_before(first):
            ph = graph.placeholder(name, default_value=None)
        with graph.inserting_before(node):
            add = graph.call_function(add_probe, (node.args[0], ph))
        node.update_arg(0, add)
        branches[name] = (a, b, _branch_target(k), add.name)
    graph.lint()
    module = fx.GraphModule(gm, graph, class_name=f"Probed{type(unwrap(model)).__name__}")
    return Probed(module, plan, states, branches, _groups(gm, plan, dict(unwrap(model).named_parameters())))


def stage_groups(model: nn.Module, plan: Plan | None) -> tuple[dict[str, list[str]], Plan]:
    """Trainable weights (ndim ≥ 2) by stage, in the model's parameter names.

    ``stem`` holds the layers up to h0, ``stage<i>`` those between h_{i-1} and h_i, ``head`` those after h_N,
    in graph order (the states are cut nodes, so every layer falls in one). GC-ODE branches are left out.
    """
    gm, plan = graph_of(model, plan)
    return _groups(gm, plan, dict(unwrap(model).named_parameters())), plan


def _groups(gm: fx.GraphModule, plan: Plan, params: dict) -> dict[str, list[str]]:
    graph = _eval_graph(gm)
    state_nodes = set(_state_tensors(graph, plan))
    n = len(plan.states)
    names = ["stem", *(f"stage{i}" for i in range(1, n)), "head"]
    groups = {k: [] for k in names}
    seen, stage = set(), 0
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and not str(node.target).startswith("gc."):
            target = str(node.target)
            obj = gm.get_submodule(target) if node.op == "call_module" else None
            found = obj.named_parameters(prefix=target) if obj is not None else [(target, None)]
            for pname, _ in found:
                p = params.get(pname)
                if p is not None and pname not in seen and p.requires_grad and p.ndim >= 2:
                    seen.add(pname)
                    groups[names[stage]].append(pname)
        if node in state_nodes:
            stage += 1
    return {k: v for k, v in groups.items() if v}
