"""Arms: the ways to train one model that a benchmark compares, each from a spec such as ``gcgd:ode.gate_init=0.1``.

=========  ==========================  =====================================================
arm        model                       optimizer
=========  ==========================  =====================================================
baseline   the plain model             the base optimizer
gcw        the plain model             `GCOptimizer` on the automatic plan's GC-W sites
gcode      `gcify(model)`              the base optimizer (it also trains the GC-ODE branches)
gcgd       `gcify(model)`              `GCOptimizer` (GC-W and GC-ODE: the paper's GCGD)
lookahead  the plain model             timm's Lookahead (k=5, alpha=0.5) over the base optimizer
sam        the plain model             pytorch-optimizer's SAM (rho=0.05) over the base optimizer
                                       (two forward-backward passes per step)
gradcent   the plain model             the base optimizer on centralised gradients (Gradient
                                       Centralization: pytorch-optimizer's ``centralize_gradient``
                                       on every weight of 2 or more dimensions before each step)
=========  ==========================  =====================================================

The peers (lookahead, sam, gradcent) are what a user might pick instead of gradient correction; sam and
gradcent need ``pip install pytorch-optimizer`` (the ``bench`` extra).

A *variant* of gcw, gcode or gcgd changes their options: ``ARM:KEY=VALUE,...`` with keys ``ode.<field>``
(an `ODEOptions` field), ``gcw.<field>`` (a `GCWOptions` field), ``sites=plan|convs`` (GC-W on the
plan's sites, or on every convolution's weight) and ``peer=lookahead|gradcent`` (the arm's optimizer wrapped
as that peer's is, so that gradient correction can be tried on top of a peer), e.g.
``gcgd:ode.gate_init=0.1,gcw.horizons=(5,50)`` or ``gcw:peer=gradcent`` (GC-W on centralised gradients).
``gcode:ode.mode=gradient`` trains the exact original network with the branches' gradients injected, and
``gcode:ode.solver=none`` replaces the ODE by a linear shortcut (`ODEOptions`). The baseline takes one key,
``site_lr=X``: plain SGD/AdamW with the learning rate of the plan's GC-W sites (and only theirs) times X, no
corrector — the control for "GC-W is a longer step on those layers" (``baseline:site_lr=1.12``).

Build the model under the seed first, then the arm: GC-ODE branches and GC-W correctors are initialised
from their own seeds, so every arm starts from the same weights of the original model and the global RNG
is left where it was.
"""

import ast
import dataclasses
import difflib
import re

import torch
from torch import nn

from ..errors import GCSurgeryError
from ..gcode import ODEOptions
from ..gcw import GCWOptions
from ..optim import GCOptimizer
from ..rewrite import gcify
from ..stages import plan
from ..wrappers import unwrap

__all__ = [
    "ALL_ARMS",
    "ARMS",
    "OPTIMIZERS",
    "PEERS",
    "ArmSpec",
    "arm_spec",
    "build_arm",
    "build_optimizer",
    "check_optimizer",
    "gcw_site_names",
    "parse_arm",
    "parse_options",
]

ARMS = ("baseline", "gcw", "gcode", "gcgd")  # the paper's four
PEERS = ("lookahead", "sam", "gradcent")  # what a user might pick instead
ALL_ARMS = (*ARMS, *PEERS)
VARIED = ("gcw", "gcode", "gcgd")  # the arms that take option overrides
SITES = ("plan", "convs")
STACKED_PEERS = ("lookahead", "gradcent")  # the peers a variant can add (SAM's two passes do not take GC-W)
LOOKAHEAD = {"k": 5, "alpha": 0.5}
SAM_RHO = 0.05
OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}  # the rest: timm's create_optimizer_v2 names


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """An arm and its option overrides, parsed from ``ARM[:KEY=VALUE,...]``."""

    spec: str
    arm: str
    ode: ODEOptions = ODEOptions()  # noqa: RUF009 (frozen, hence safe)
    gcw: GCWOptions = GCWOptions()  # noqa: RUF009
    sites: str = "plan"
    peer: str | None = None  # a peer of STACKED_PEERS wrapping the arm's optimizer
    site_lr: float = 1.0  # baseline only: the lr factor of the plan's GC-W sites (no corrector)

    @property
    def optimizer_peer(self) -> str | None:
        """The peer `build_optimizer` wraps the arm's optimizer as: the arm itself, or a variant's ``peer=``."""
        return self.arm if self.arm in PEERS else self.peer

    @property
    def filename(self) -> str:
        return "".join(c if c.isalnum() or c in "._=-" else "_" for c in self.spec)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return float(text)  # inf, which Python writes as no literal
    except ValueError:
        return text  # a bare word: a string option such as solver=rk4


def _items(text: str) -> list[str]:
    return list(filter(None, re.split(r",(?=[\w.]+=)", text)))  # a comma inside a value, as in (5,50), stays


def parse_options(text: str, options: type, *, what: str) -> dict:
    """``KEY=VALUE,...`` as a dict of fields of the dataclass ``options`` (``--gcw`` and ``--ode`` of the recipes).

    Values are Python literals (``0.1``, ``(5,50)``, ``True``) or bare words (``rk4``); ``seed`` comes from
    the run's seed and cannot be set here.
    """
    fields = {f.name for f in dataclasses.fields(options)} - {"seed"}
    out = {}
    for item in _items(text):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise GCSurgeryError(
                f"{what}: cannot read {item!r}; write KEY=VALUE,... with KEY one of {sorted(fields)}, "
                f"e.g. {what} {sorted(fields)[0]}=..."
            )
        out[key] = _literal(value)
    return out


def parse_arm(spec: str, *, seed: int = 0) -> ArmSpec:
    """The `ArmSpec` of ``spec`` with the option seeds set to ``seed``; GCSurgeryError on a bad spec."""
    arm, _, rest = spec.partition(":")
    if arm not in ALL_ARMS:
        raise GCSurgeryError(f"unknown arm {arm!r} in {spec!r}; choose one of {list(ALL_ARMS)}, e.g. gcgd:gcw.lr=0.01")
    if arm == "baseline" and rest:
        return _baseline_variant(spec, rest)
    if rest and arm not in VARIED:
        raise GCSurgeryError(
            f"{spec!r}: only {list(VARIED)} take options (and baseline site_lr=X); write {arm!r} alone"
        )
    over = {"ode": {"seed": seed}, "gcw": {"seed": seed}}
    sites, peer = "plan", None
    for item in _items(rest):
        key, eq, value = item.partition("=")
        group, dot, field = key.partition(".")
        fields = {f.name for f in dataclasses.fields(ODEOptions if group == "ode" else GCWOptions)} - {"seed"}
        if key == "sites" and eq and value in SITES:
            sites = value
        elif key == "peer" and eq and value in STACKED_PEERS:
            peer = value
        elif eq and dot and group in over and field in fields:
            over[group][field] = _literal(value)
        else:
            raise GCSurgeryError(
                f"{spec!r}: cannot read {item!r}; write KEY=VALUE with KEY sites ({'|'.join(SITES)}), peer "
                f"({'|'.join(STACKED_PEERS)}), ode.<field> (fields of ODEOptions) or gcw.<field> (fields of "
                "GCWOptions), e.g. gcgd:ode.gate_init=0.1"
            )
    if sites != "plan" and arm == "gcode":
        raise GCSurgeryError(f"{spec!r}: sites= sets GC-W sites, which the gcode arm has none of; use gcw or gcgd")
    return ArmSpec(spec, arm, ODEOptions(**over["ode"]), GCWOptions(**over["gcw"]), sites, peer)


def _baseline_variant(spec: str, rest: str) -> ArmSpec:
    key, eq, value = rest.partition("=")
    factor = _literal(value) if key == "site_lr" and eq else None
    if not (isinstance(factor, int | float) and not isinstance(factor, bool) and 0 < factor < float("inf")):
        raise GCSurgeryError(
            f"{spec!r}: the baseline takes one option, site_lr=X (X > 0: the lr factor of the plan's GC-W sites), "
            f"got {rest!r}; e.g. baseline:site_lr=1.12"
        )
    return ArmSpec(spec, "baseline", site_lr=float(factor))


def gcw_site_names(model: nn.Module, example_inputs: torch.Tensor) -> tuple[str, ...]:
    """The parameter names of the automatic plan's GC-W sites (the last weighted layer of each stage)."""
    with torch.random.fork_rng(devices=[]):
        return tuple(s.param for s in plan(model, example_inputs).gcw_sites)


def arm_spec(cfg) -> ArmSpec:
    """The `ArmSpec` of a `RunConfig`: its ``arm`` with the run's seed, and ``gcw`` / ``ode`` options on top."""
    spec = parse_arm(cfg.arm, seed=cfg.seed)
    groups = {"gcw": (cfg.gcw, GCWOptions, ("gcw", "gcgd")), "ode": (cfg.ode, ODEOptions, ("gcode", "gcgd"))}
    for group, (text, options, arms) in groups.items():
        if not text:
            continue
        if spec.arm not in arms:
            raise GCSurgeryError(
                f"--{group} {text!r} sets options of the {' and '.join(arms)} arms, but the arm is {spec.arm!r}; "
                f"pass --arm {arms[-1]} (or drop --{group})"
            )
        spec = dataclasses.replace(
            spec,
            **{group: dataclasses.replace(getattr(spec, group), **parse_options(text, options, what=f"--{group}"))},
        )
    return spec


def build_arm(
    model: nn.Module,
    arm: "str | ArmSpec",
    *,
    example_inputs: torch.Tensor,
    ode: ODEOptions | None = None,
) -> tuple[nn.Module, tuple[str, ...]]:
    """Prepares the model of an arm, leaving the global RNG untouched.

    Args:
        model: the plain model, on the CPU (it is copied for gcode and gcgd, left as is otherwise).
        arm: an arm name (`ALL_ARMS`) or a parsed `ArmSpec`.
        example_inputs: an example batch for the plan, e.g. ``torch.zeros(2, C, H, W)``.
        ode: options of the GC-ODE branches (gcode, gcgd); default: the spec's.

    Returns:
        ``(model, sites)``: the model to train (gcified for gcode and gcgd) and the names of the
        parameters GC-W corrects (empty for baseline, gcode and the peers).
    """
    spec = arm if isinstance(arm, ArmSpec) else parse_arm(arm)
    if spec.arm in ("baseline", *PEERS):
        return model, ()
    with torch.random.fork_rng(devices=[]):
        if spec.arm == "gcw":
            out = model
            sites = gcw_site_names(model, example_inputs)
        else:
            out = gcify(model, example_inputs=example_inputs, ode=ode or spec.ode)
            sites = tuple(s.param for s in out.gc_plan.gcw_sites) if spec.arm == "gcgd" else ()
    if sites and spec.sites == "convs":  # gcify keeps the original parameter names
        sites = tuple(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    model.train()  # tracing may leave submodules in eval mode
    out.train()
    return out, sites


def check_optimizer(name: str) -> None:
    """GCSurgeryError unless ``name`` is sgd, adamw or one of timm's optimizer names, with close matches."""
    if name in OPTIMIZERS:
        return
    import timm.optim

    names = timm.optim.list_optimizers()
    if name not in names:
        close = difflib.get_close_matches(name, [*OPTIMIZERS, *names], n=3)
        raise GCSurgeryError(
            f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)} (torch.optim) or a name of "
            f"timm.optim.list_optimizers()" + (f"; did you mean {', '.join(close)}?" if close else "")
        )


def build_optimizer(
    model: nn.Module,
    *,
    sites: tuple[str, ...] = (),
    name: str = "sgd",
    gcw: GCWOptions | None = None,
    peer: str | None = None,
    scaled: tuple[tuple[str, ...], float] | None = None,
    **kwargs,
) -> torch.optim.Optimizer:
    """The base optimizer over all of ``model``'s parameters, wrapped in `GCOptimizer` when there are sites.

    Args:
        model: the arm's model (DDP or compiled wrappers are fine).
        sites: GC-W parameter names from `build_arm`; empty gives the plain base optimizer.
        name: ``sgd`` or ``adamw`` (torch.optim, over one parameter group) or any other name timm's
            ``create_optimizer_v2`` knows (``lamb``, ``lion``, ...; timm's parameter groups).
        gcw: options of the GC-W correctors.
        peer: None, or a peer arm of `PEERS`: "lookahead" wraps the result in timm's Lookahead (k=5,
            alpha=0.5), "sam" builds pytorch-optimizer's SAM (rho=0.05) over the base (sgd or adamw), and
            "gradcent" centralises the gradients before each step (a step pre-hook).
        scaled: ``(names, factor)``: those parameters in a second group at ``factor`` times the lr (sgd or
            adamw, no sites, no peer): the baseline's ``site_lr`` control.
        **kwargs: options of the base optimizer (lr, momentum, weight_decay, ...).
    """
    check_optimizer(name)
    if peer is not None and peer not in PEERS:
        raise GCSurgeryError(f"unknown peer {peer!r}; choose one of {list(PEERS)} or None")
    bare = unwrap(model)
    if scaled is not None:
        return _scaled_groups(bare, name, sites, peer, scaled, kwargs)
    if peer in ("sam", "gradcent"):
        po = _pytorch_optimizer(peer)
    if peer == "sam":
        if name not in OPTIMIZERS or sites:
            raise GCSurgeryError(
                f"the sam arm runs SAM over {list(OPTIMIZERS)} without GC-W; got optimizer {name!r}"
                + (f" and {len(sites)} GC-W sites" if sites else "")
                + "; pick --opt sgd or adamw"
            )
        return po.SAM(bare.parameters(), OPTIMIZERS[name], rho=SAM_RHO, **kwargs)
    if name in OPTIMIZERS:
        base = OPTIMIZERS[name]
        opt = GCOptimizer(bare, base, sites=list(sites), gcw=gcw or GCWOptions(), **kwargs) if sites else None
        opt = opt or base(bare.parameters(), **kwargs)
    else:
        from timm.optim import create_optimizer_v2

        kwargs.pop("nesterov", None)  # timm's names say it: sgd is Nesterov, momentum is not
        base = create_optimizer_v2(bare, opt=name, **kwargs)
        opt = GCOptimizer(bare, base, sites=list(sites), gcw=gcw or GCWOptions()) if sites else base
    if peer == "lookahead":
        from timm.optim import Lookahead

        opt = Lookahead(opt, **LOOKAHEAD)
    elif peer == "gradcent":

        def centralize(optimizer, args, kwargs):  # in place, on every weight of 2+ dimensions (conv and linear)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        po.centralize_gradient(p.grad, gc_conv_only=False)

        opt.register_step_pre_hook(centralize)
    return opt


def _scaled_groups(bare: nn.Module, name: str, sites, peer, scaled, kwargs) -> torch.optim.Optimizer:
    names, factor = scaled
    if name not in OPTIMIZERS or sites or peer is not None:
        raise GCSurgeryError(
            f"a site_lr group runs plain {list(OPTIMIZERS)} (no GC-W, no peer); got optimizer {name!r}, "
            f"{len(sites)} GC-W sites, peer {peer!r}; use baseline:site_lr=X with --opt sgd or adamw"
        )
    params = dict(bare.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise GCSurgeryError(f"site_lr names parameters the model does not have: {unknown or list(names)}")
    rest = [p for n, p in params.items() if n not in names]
    groups = [{"params": rest}, {"params": [params[n] for n in names], "lr": kwargs["lr"] * factor}]
    return OPTIMIZERS[name](groups, **kwargs)


def _pytorch_optimizer(arm: str):
    try:
        import pytorch_optimizer
    except ImportError as e:
        raise GCSurgeryError(
            f"the {arm} arm uses pytorch-optimizer, which is not installed; pip install pytorch-optimizer "
            "(or pip install -e '.[bench]')"
        ) from e
    return pytorch_optimizer
