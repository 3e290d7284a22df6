"""Pass 3: rewrite the traced graph per plan — insert GC-ODE branches, attach the plan for GC-W.

`gcify(model)` returns a `GCGraphModule`: a `torch.fx.GraphModule` whose original parameters keep
their state-dict keys, with every new parameter under `gc.ode.<k>.*` and the plan on `.gc_plan`
(the registry `GCOptimizer` reads). Models that trace to different graphs in train and eval mode keep
both graphs, rewritten the same way, and switch on `.train()`/`.eval()`. Each branch's gate starts at
zero, so the rewritten model computes exactly what the original did.
"""

import copy
import dataclasses

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY, _copy_attr

from ._version import __version__
from .errors import GCSurgeryError
from .gcode import GCODE, ODEOptions, neutral
from .gcode_nd import GCODEND
from .layouts import ND_LAYOUTS, spatial_size
from .plans import Plan, fingerprint_mismatch
from .stages import build_plan, check_instance_forward
from .trace import check_bare, check_leaf_modules, leaf_names, preserve_modes, trace
from .verify import compare
from .wrappers import wrapper_attr

__all__ = ["GCGraphModule", "gcify", "plan_mismatch", "strip", "is_gcified"]

BRANCH_PREFIX = "gc.ode"
GCIFIED, GCIFIED_TOO = "the gcified graph: ", "; the gcified graph too"


class GCGraphModule(fx.GraphModule):
    """A GraphModule with an optional separate eval-mode graph, swapped in by `.train(False)`."""

    def __init__(self, root, graph: fx.Graph, *, eval_graph: fx.Graph | None = None, class_name="GraphModule"):
        super().__init__(root, graph, class_name)
        self._gc_train_graph = graph if eval_graph is not None else None
        self._gc_eval_graph = eval_graph
        if eval_graph is not None:
            for node in eval_graph.nodes:
                if node.op in ("get_attr", "call_module"):
                    _copy_attr(root, self, node.target)
            eval_graph.owning_module = self
            if not self.training:
                self.graph = eval_graph

    def train(self, mode: bool = True):
        self._select_graph(mode)
        return super().train(mode)

    def _select_graph(self, mode: bool) -> None:
        """Sets this module's own flag and graph, leaving the submodules' modes as they are."""
        if self._gc_eval_graph is not None and mode != self.training:
            self.graph = self._gc_train_graph if mode else self._gc_eval_graph
        self.training = mode

    def _deepcopy_init(self):
        def init(res, fake, graph):
            d = fake.__dict__
            if d.get("_gc_eval_graph") is None:
                GCGraphModule.__init__(res, fake, graph, class_name=type(self).__name__)
            else:
                GCGraphModule.__init__(
                    res, fake, d["_gc_train_graph"], eval_graph=d["_gc_eval_graph"], class_name=type(self).__name__
                )

        return init

    @property
    def graphs(self) -> tuple[fx.Graph, ...]:
        """The graphs this module runs: one, or (train, eval)."""
        if self._gc_eval_graph is None:
            return (self.graph,)
        return (self._gc_train_graph, self._gc_eval_graph)

    def recompile_all(self):
        """Recompiles after editing `graphs` (the active one last, so it is what runs)."""
        for g in self.graphs:
            g.lint()
        self.recompile()


def _set_preserved(gm: fx.GraphModule, **attrs):
    """Sets attributes that survive deepcopy (torch.fx preserves meta['_user_preserved_attributes'])."""
    preserved = gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})
    for name, value in attrs.items():
        setattr(gm, name, value)
        preserved[name] = value


def is_gcified(model: nn.Module) -> bool:
    return isinstance(getattr(model, "gc_plan", None), Plan)


def _check_plan_type(plan) -> None:
    if isinstance(plan, dict | str):
        raise GCSurgeryError(
            f"plan must be a gcsurgery.Plan, got a {type(plan).__name__}; read saved plans with "
            "gcsurgery.Plan.from_dict(d) or gcsurgery.Plan.from_json(text)."
        )
    if isinstance(plan, torch.Tensor | tuple | list):  # torch.Size is a tuple
        what = f"a tensor of shape {tuple(plan.shape)}" if isinstance(plan, torch.Tensor) else f"{plan!r}"
        raise GCSurgeryError(
            f"plan must be a gcsurgery.Plan, got {type(plan).__name__} {what}; did you mean example_inputs=...? "
            f"The second positional argument is the plan; an example batch or its shape goes by keyword: "
            f"gcify(model, example_inputs={'x' if isinstance(plan, torch.Tensor) else repr(tuple(plan))}) "
            "(a shape tuple works as well as a tensor)."
        )
    if not isinstance(plan, Plan):
        raise GCSurgeryError(
            f"plan must be a gcsurgery.Plan, got {type(plan).__name__}; build one with gcsurgery.plan(model)."
        )


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise GCSurgeryError(f"{name} must be True or False, got {value!r}.")


def _check_plan(model: nn.Module, plan: Plan, graphs) -> None:
    why = fingerprint_mismatch(model, plan, graphs[-1])
    if why:
        raise GCSurgeryError(
            f"this plan was made for a {plan.model} [fingerprint {plan.fingerprint}], but the model is a {why}; "
            f"build a plan for this model with gcsurgery.plan(model)."
        )
    for g in graphs:
        names = {n.name for n in g.nodes}
        absent = [s.node for s in plan.states if s.node not in names]
        if absent:
            raise GCSurgeryError(
                f"the plan's states {absent} are not nodes of {type(model).__name__}'s traced graph; the plan was made "
                f"for another model or with other leaf_modules. Build it anew with gcsurgery.plan(model)."
            )
    params = dict(model.named_parameters())
    bad = [s.param for s in plan.gcw_sites if s.param not in params]
    if bad:
        raise GCSurgeryError(f"GC-W sites {bad} are not parameters of {type(model).__name__}; rebuild the plan.")
    if not plan.ode_pairs and not plan.gcw_sites:
        raise GCSurgeryError("the plan inserts nothing (no GC-ODE pairs, no GC-W sites); use the model as it is.")


def plan_mismatch(model: nn.Module, plan: Plan) -> str | None:
    """Why `plan` does not fit the plain `model` by its fingerprint (None when it fits); traces the model."""
    if not plan.fingerprint or plan.fingerprint_format == 1 or type(model).__name__ != plan.model:
        return fingerprint_mismatch(model, plan, None)
    leaves = plan.leaf_modules + tuple(leaf.module for leaf in plan.leaves)
    with preserve_modes(model):
        traced = trace(model, leaf_modules=tuple(dict.fromkeys(leaves)))
    return fingerprint_mismatch(model, plan, traced.eval.graph)


def _insert_branches(graph: fx.Graph, plan: Plan, *, early_source: bool) -> None:
    """Inserts `h_b <- gc.ode.k(h_a, h_b)` after `h_b` for each pair; with `early_source`, the branch reads `h_a`
    through a view taken right after `h_a` is computed (`_source_view`)."""
    nodes = {n.name: n for n in graph.nodes}
    current = {i: nodes[s.node] for i, s in enumerate(plan.states)}
    for k, (a, b) in sorted(enumerate(plan.ode_pairs), key=lambda kv: (kv[1][1], kv[0])):
        dst, src = current[b], current[a]
        if early_source:
            src = _source_view(graph, src, k)
        with graph.inserting_after(dst):
            new = graph.create_node("call_module", f"{BRANCH_PREFIX}.{k}", (src, dst))
        dst.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        current[b] = new
    graph.lint()


def _source_view(graph: fx.Graph, src: fx.Node, k: int) -> fx.Node:
    """`src.view_as(src)`, inserted right after `src`: what branch k reads as its source.

    In backward, autograd sums the gradients a tensor gets from its readers into the buffer of the first one that
    arrives, in place, so the sum keeps that gradient's memory layout. A branch read at its destination runs after
    the whole stage and sends its gradient first: its layout (src's own strides) would then replace the one the
    network's gradients have, and kernels further back sum in another order (LeViT's stem BatchNorm got a weight
    gradient 3e-11 off through the tokens' transpose). The view's autograd node is older than every other reader's,
    so its gradient arrives last and is added into the network's, whose layout stays: with the gate at zero every
    gradient is bit-identical. A view copies nothing, and the branch still reads the value it read before."""
    with graph.inserting_after(src):
        view = graph.create_node("call_method", "view_as", (src, src), name=f"gc_ode_{k}_src")
    view.meta.update({key: src.meta[key] for key in ("nn_module_stack", "stack_trace") if key in src.meta})
    return view


def _is_source_view(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_method"
        and node.target == "view_as"
        and len(node.args) == 2
        and node.args[0] is node.args[1]
    )


def _check_leaf_modules(model: nn.Module, plan: Plan, leaf_modules) -> None:
    """gcify(model, plan) traces with the plan's leaf_modules; other ones given beside it are refused."""
    check_leaf_modules(leaf_modules)
    if leaf_modules and leaf_names(model, leaf_modules) != plan.leaf_modules:
        raise GCSurgeryError(
            f"leaf_modules={list(leaf_modules)!r} cover {list(leaf_names(model, leaf_modules))}, but the plan was made "
            f"with leaf_modules covering {list(plan.leaf_modules)}; gcify(model, plan) uses the plan's, so pass none "
            "(or the same), or build the plan again with gcsurgery.plan(model, leaf_modules=...)."
        )


def _verify_rewrite(source: nn.Module, gm: GCGraphModule, plan: Plan, example, references: dict) -> Plan:
    """Checks the rewritten graph against the eager model; returns the plan saying so."""
    if example is None:
        param = next(iter(source.parameters()), None)
        kw = {"device": param.device, "dtype": param.dtype} if param is not None else {}
        example = torch.randn(plan.input_shape, generator=torch.Generator().manual_seed(0)).to(**kw)
    params = {k: p for k, p in source.named_parameters() if p.requires_grad}
    # a branch takes NLC tokens of the plan's count only (layouts.matches): a smaller input would make it refuse
    shrink = not any(plan.states[i].layout == "NLC" for pair in plan.ode_pairs for i in pair)
    # gate_init != 0 (and a gradient-mode branch's injection) changes the function on purpose: check without
    with neutral(gm.gc.ode), preserve_modes(source):
        verdict = compare(source, {False: gm, True: gm}, example, params=params, references=references, shrink=shrink)
    if verdict.mismatch is not None:
        raise GCSurgeryError(
            f"the gcified {type(source).__name__} does not compute what the model computes: {verdict.mismatch}. "
            "With its gates at zero every branch adds exact zeros, so this is a plan that does not fit the model "
            "(build it anew with gcsurgery.plan(model)) or a bug in gcsurgery; pass verify=False to skip this check."
        )
    base = plan.verified.split(GCIFIED_TOO)[0]  # a plan from a gcified model (a checkpoint) says it already
    base = "" if base.startswith(GCIFIED) else base
    too = GCIFIED_TOO
    if not shrink and verdict.inputs:  # the plan's check may have run on the shrunk batch: say where this one ran
        shape = "x".join(map(str, verdict.inputs["eval"].shape))
        too += f" on a {shape} batch (its branches take tokens)"
    return dataclasses.replace(plan, verified=base + too if base else f"{GCIFIED}{verdict.summary}")


def gcify(
    model: nn.Module,
    plan: Plan | None = None,
    *,
    example_inputs=None,
    ode: ODEOptions = ODEOptions(),  # noqa: B008 (frozen, hence safe)
    leaf_modules=(),
    inplace: bool = False,
    verify: bool = True,
) -> GCGraphModule:
    """Inserts GC-ODE branches into `model` and marks its GC-W sites.

    Args:
        model: a CNN (timm, torchvision or your own).
        plan: the insertion plan; built with `gcsurgery.plan(model, example_inputs)` when None.
        example_inputs: example batch (or its shape) used to build the plan when none is given.
        ode: options of every GC-ODE branch.
        leaf_modules: submodules to keep opaque when tracing (names or classes); with a plan, the plan's own
            (`plan.leaf_modules`) are used, and other ones are refused.
        inplace: share the model's modules and parameters instead of copying them first.
        verify: check the traced and the rewritten graph against the eager model (outputs, buffers and parameter
            gradients, eval and train mode); False skips the checks.

    Returns:
        A `GCGraphModule` computing exactly what `model` computes, with `.gc_plan` set.
    """
    if not isinstance(model, nn.Module):
        raise GCSurgeryError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    if is_gcified(model):
        raise GCSurgeryError(
            "this model is already gcified; use it as it is, or gcsurgery.strip(model, keep_ode=False) first."
        )
    check_bare(model)
    if not isinstance(ode, ODEOptions):
        raise GCSurgeryError(f"ode must be a gcsurgery.ODEOptions, got {type(ode).__name__}.")
    _check_flag("inplace", inplace)
    _check_flag("verify", verify)
    holder = getattr(model, "gc", None)
    if isinstance(holder, nn.Module):
        raise GCSurgeryError(
            f"{type(model).__name__} already has a submodule 'gc' ({type(holder).__name__}), where gcify puts its "
            "branches (a model stripped with keep_ode=True has its old ones there); gcify the model from before, "
            "strip it with keep_ode=False, or rename that submodule."
        )
    example, references = None, {}
    if plan is None:
        planned = build_plan(model, example_inputs, leaf_modules=leaf_modules, verify=verify)
        plan, example, references = planned.plan, planned.example, planned.references
    elif example_inputs is not None:
        raise GCSurgeryError("pass either plan= or example_inputs= (which builds a plan), not both.")
    else:
        _check_plan_type(plan)
        _check_leaf_modules(model, plan, leaf_modules)
        check_instance_forward(model)
    source = model if inplace else copy.deepcopy(model)
    leaves = plan.leaf_modules + tuple(leaf.module for leaf in plan.leaves)
    with preserve_modes(source):
        traced = trace(source, leaf_modules=tuple(dict.fromkeys(leaves)))
    _check_plan(source, plan, (traced.train.graph, traced.eval.graph))

    train_graph, eval_graph = traced.train.graph, (traced.eval.graph if traced.dual else None)
    gm = GCGraphModule(source, train_graph, eval_graph=eval_graph, class_name=f"GC{type(model).__name__}")
    param = next(iter(source.parameters()), None)
    branches = nn.ModuleList()
    for k, (a, b) in enumerate(plan.ode_pairs):
        src, dst = plan.states[a], plan.states[b]
        options = ode if ode.seed is None else dataclasses.replace(ode, seed=ode.seed + k)  # distinct inits
        sizes = spatial_size(src.layout, src.shape), spatial_size(dst.layout, dst.shape)
        if src.layout in ND_LAYOUTS or dst.layout in ND_LAYOUTS:  # 1-D and 3-D states: a branch of their own
            branches.append(GCODEND(src.num_chs, dst.num_chs, *sizes, options=options))
            continue
        branches.append(
            GCODE(src.num_chs, dst.num_chs, *sizes, in_layout=src.layout, out_layout=dst.layout, options=options)
        )
    if param is not None:
        branches.to(device=param.device, dtype=param.dtype)
    holder = nn.Module()
    holder.ode = branches
    gm.gc = holder
    for g in gm.graphs:
        _insert_branches(g, plan, early_source=ode.mode == "branch")  # gradient mode reads src itself (its hook)
    gm.recompile_all()
    if verify:
        plan = _verify_rewrite(source, gm, plan, example, references)
    holder.train(model.training)
    gm._select_graph(model.training)  # submodules keep their own modes (e.g. frozen BatchNorm)

    _set_preserved(gm, gc_plan=plan, gc_ode=ode, gc_version=__version__)
    return gm


def strip(gc_model: nn.Module, *, keep_ode: bool = True) -> fx.GraphModule:
    """A plain module without the GC machinery.

    Args:
        gc_model: a module returned by `gcify`.
        keep_ode: keep the GC-ODE branches as ordinary layers (the function is unchanged). With False the
            branches are removed, which changes the function unless every gate is still zero.

    Returns:
        A new GraphModule without `.gc_plan` (GCOptimizer then finds no GC-W sites by itself).
    """
    attr = wrapper_attr(gc_model)
    if attr is not None and is_gcified(getattr(gc_model, attr)):
        raise GCSurgeryError(
            f"got the gcified model wrapped in {type(gc_model).__name__}; strip the module inside: strip(model.{attr})."
        )
    if not is_gcified(gc_model):
        raise GCSurgeryError(f"expected a module returned by gcsurgery.gcify, got {type(gc_model).__name__}.")
    _check_flag("keep_ode", keep_ode)
    out = copy.deepcopy(gc_model)
    preserved = out.meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {})
    for name in ("gc_plan", "gc_ode", "gc_version"):
        preserved.pop(name, None)
        if name in out.__dict__:
            delattr(out, name)
    if not keep_ode:
        for g in out.graphs:
            for node in list(g.nodes):
                if node.op == "call_module" and str(node.target).startswith(BRANCH_PREFIX + "."):
                    src = node.args[0]
                    node.replace_all_uses_with(node.args[1])
                    g.erase_node(node)
                    if _is_source_view(src) and not src.users:  # the view the branch read its source through
                        g.erase_node(src)
        del out.gc
        out.recompile_all()
    return out
