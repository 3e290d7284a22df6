"""GCOptimizer: GC-W (weight gradient correction) on top of any torch.optim optimizer, timm's too.

At every step the corrector of each GC-W site turns the gradient's history into a bounded correction ΔG,
the base optimizer steps on G + ΔG, and at the next step the corrector is trained on the hypergradient
``-⟨P g_{t+1}, ΔG_t⟩`` (P: the base optimizer's elementwise preconditioner, 1 for SGD). All of the math
is `gcsurgery.gcw.gcw_step` and `record_step`; this class gathers their inputs, swaps the corrected
gradients in around the base step, and keeps GC-W's state (see ``docs/gcw.md``).
"""

import difflib
from collections import defaultdict

import torch
from torch import Tensor, nn

from .errors import GCSurgeryError
from .gcw import STATS, GCWOptions, GCWState, Layout, SiteTensors, gcw_step, record_step
from .wrappers import unwrap

__all__ = ["GCOptimizer", "format_stats", "needs_closure"]

_DEFAULT_GCW = GCWOptions()


def _site_names(net: nn.Module, sites) -> list[str]:
    if sites is None:
        plan = getattr(net, "gc_plan", None)
        if plan is None:
            raise GCSurgeryError(
                f"{type(net).__name__} is not gcified (no gc_plan) and no sites= were given; pass "
                "sites=[parameter names, e.g. 'layer1.2.conv2.weight'] or gcify the model first."
            )
        sites = plan.gcw_sites
        if not sites:
            raise GCSurgeryError(
                f"the plan of this {type(net).__name__} has no GC-W sites (none was found, or Plan.without removed "
                "them), so GCOptimizer would only run the base optimizer; use the base optimizer itself, or pass "
                "sites=."
            )
    if isinstance(sites, str):
        sites = [sites]
    if isinstance(sites, torch.Tensor) or not hasattr(sites, "__iter__"):
        raise GCSurgeryError(
            f"sites must be a list of parameter names, got {type(sites).__name__}; "
            "pass e.g. sites=['layer4.1.conv2.weight']."
        )
    params = dict(net.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    names = []
    for site in sites:
        name = getattr(site, "param", site)
        if isinstance(name, torch.Tensor):
            hint = f"its name is {by_id[id(name)]!r}" if id(name) in by_id else "it is not a parameter of the model"
            raise GCSurgeryError(
                f"a GC-W site must be a parameter name (str), got a tensor of shape {tuple(name.shape)}; {hint}."
            )
        if not isinstance(name, str):
            raise GCSurgeryError(f"a GC-W site must be a parameter name (str), got {site!r}.")
        if name not in params and f"{name}.weight" in params:
            name = f"{name}.weight"
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=3, cutoff=0.5)
            hint = f"did you mean {close}?" if close else "see model.named_parameters() for valid names."
            raise GCSurgeryError(f"unknown GC-W site {name!r}: the model has no such parameter; {hint}")
        p = params[name]
        if p.ndim < 2:
            raise GCSurgeryError(
                f"GC-W site {name!r} has shape {tuple(p.shape)}; GC-W corrects weights with rows "
                "(Linear or conv weights, ndim >= 2): pick a weight."
            )
        if not p.requires_grad:
            raise GCSurgeryError(f"GC-W site {name!r} is frozen (requires_grad=False); unfreeze it or drop it.")
        if name in names:
            raise GCSurgeryError(f"GC-W site {name!r} is listed twice; list each site once.")
        names.append(name)
    if not names:
        raise GCSurgeryError(
            "sites is empty, so GCOptimizer would only run the base optimizer; use the base optimizer itself, or "
            "name the weights to correct, e.g. sites=['layer4.1.conv2.weight']."
        )
    return names


def _build_base(model: nn.Module, base, base_kwargs: dict) -> torch.optim.Optimizer:
    if isinstance(base, GCOptimizer) or (isinstance(base, type) and issubclass(base, GCOptimizer)):
        raise GCSurgeryError("base is already a GCOptimizer; wrap the plain optimizer only once.")
    if isinstance(base, torch.optim.Optimizer):
        if base_kwargs:
            raise GCSurgeryError(
                f"base is an optimizer instance, so its options are set already; drop {sorted(base_kwargs)} "
                "or pass the optimizer class instead."
            )
        return base
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        try:
            return base(model.parameters(), **base_kwargs)
        except (TypeError, ValueError) as e:
            raise GCSurgeryError(
                f"{base.__name__}(model.parameters(), **{base_kwargs}) failed: {e}; see "
                f"help({base.__module__}.{base.__name__}) for its options."
            ) from e
    raise GCSurgeryError(
        f"base must be a torch.optim.Optimizer class (e.g. torch.optim.SGD) or an optimizer instance "
        f"(e.g. from timm.optim.create_optimizer_v2), got {base!r}."
    )


def _preconditioner(state: dict, group: dict, shape: torch.Size) -> Tensor | None:
    """Elementwise 1/(√v̂ + ε) of Adam-, RMSprop- and Adagrad-like optimizers; None for SGD-like ones."""
    for key in ("exp_avg_sq", "square_avg", "sum"):
        v = state.get(key)
        if isinstance(v, Tensor) and v.shape == shape:
            eps = group.get("eps", 1e-8)
            eps = eps if isinstance(eps, float) else 1e-8
            betas, step = group.get("betas"), state.get("step")
            if key == "exp_avg_sq" and isinstance(betas, (tuple, list)) and step is not None:
                v = v / (1 - betas[1] ** step)
            return 1 / (v.sqrt() + eps)
    return None


def _state_owner(opt):
    """The optimizer whose ``state`` holds the moments: the inner optimizer of a wrapper such as a Lookahead
    (pytorch-optimizer's keeps it as ``optimizer``, timm's as ``_base_optimizer``), else ``opt``."""
    for attr in ("optimizer", "base_optimizer", "_base_optimizer"):
        inner = getattr(opt, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
            return _state_owner(inner)
    return opt


def _two_pass(opt) -> bool:
    """Whether ``opt`` steps in two passes with a closure between them (SAM and its kin)."""
    return callable(getattr(opt, "first_step", None)) and callable(getattr(opt, "second_step", None))


def needs_closure(opt) -> bool:
    """Whether ``opt.step`` needs a closure that recomputes the loss and the gradients: a two-pass
    optimizer such as pytorch-optimizer's SAM, alone or under a `GCOptimizer`."""
    return _two_pass(opt) or _two_pass(getattr(opt, "base", None))


def _is_sharded(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without torch.distributed
        return False
    return isinstance(p, DTensor)


def _moment_kind(group: dict) -> str | None:
    """'adam' when the base keeps Adam's ``exp_avg``, 'sgd' for SGD's ``momentum_buffer``, else None."""
    if isinstance(group.get("betas"), (tuple, list)):
        return "adam"
    if "nesterov" in group and isinstance(group.get("momentum"), (int, float)) and group["momentum"] > 0:
        return "sgd"
    return None


_MOMENT_KEY = {"adam": "exp_avg", "sgd": "momentum_buffer"}


def _state_words(d: dict[str, float], opts: GCWOptions) -> str:
    if d.get("observations", 0.0) == 0.0 and d["ratio"] == 0.0:
        return "no observation yet"
    if opts.trust and d["trust"] < 1 and d["observations"] < opts.trust_warmup:
        return f"warming up ({d['observations']:.0f} of {opts.trust_warmup} observations)"
    if opts.trust and d["trust"] == 0:
        why = "harmful" if d["cosine"] < 0 else "not yet significant"
        return f"damped: trust 0.0, last cosine {d['cosine']:+.3f} ({why})"
    bound = d["bound_scale"]
    limited = f", bound at {bound:.2f}" if bound < 0.995 else ""
    return f"acting: trust {d['trust']:.2f}{limited}" if opts.trust else f"acting: trust off{limited}"


def format_stats(stats: dict[str, dict[str, float]], opts: GCWOptions = _DEFAULT_GCW) -> str:
    """A readable table of `GCOptimizer.gc_stats` output: per site its state in words ("warming up (3 of 20
    observations)", "damped: trust 0.0, ...", "acting: trust 0.92"), ‖ΔG‖/‖G‖, trust, bound scale and the
    last next-gradient cosine of its proposal."""
    if not isinstance(stats, dict) or not all(isinstance(v, dict) and "ratio" in v for v in stats.values()):
        raise GCSurgeryError(f"format_stats takes the dict from GCOptimizer.gc_stats(), got {type(stats).__name__}.")
    rows = [(name, _state_words(d, opts), d) for name, d in stats.items()]
    w_name = max([len("site"), *(len(n) for n, _, _ in rows)])
    w_state = max([len("state"), *(len(s) for _, s, _ in rows)])
    head = f"{'site':{w_name}}  {'state':{w_state}}  {'|dG|/|G|':>8}  {'trust':>5}  {'bound':>5}  {'cosine':>7}"
    lines = [head, "-" * len(head)]
    for name, words, d in rows:
        lines.append(
            f"{name:{w_name}}  {words:{w_state}}  {d['ratio']:8.3f}  {d['trust']:5.2f}  {d['bound_scale']:5.2f}  "
            f"{d['cosine']:+7.3f}"
        )
    return "\n".join(lines)


class _Site:
    """A GC-W site: which parameter, in which param group, and whether its first EMA is the base's moment."""

    def __init__(self, name: str, param: nn.Parameter, group: int, kind: str | None):
        self.name, self.param, self.group, self.kind = name, param, group, kind
        self.rows = param.shape[0]
        self.n = param.numel() // self.rows


class GCOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer and corrects the gradients of the GC-W sites (`docs/gcw.md`).

    ``param_groups`` are the base optimizer's own (LR schedulers drive both); ``state`` is GC-W's own
    (per site: its history and small state), like timm's Lookahead, so `torch.optim.Optimizer`'s loader
    maps and moves it.

    Args:
        model: the model (gcified, or plain with explicit ``sites``); DDP, DataParallel and compiled wrappers
            are fine.
        base: a ``torch.optim.Optimizer`` class, built over ``model.parameters()`` with ``base_kwargs``,
            or an optimizer already built over all of the model's trainable parameters (it may hold others
            too, e.g. a head outside a gcified backbone passed as ``model``).
        sites: parameter names to correct (e.g. ``"layer3.2.conv2.weight"``) or objects with ``.param``;
            default: the model's ``gc_plan.gcw_sites``.
        gcw: the corrector's options.
        **base_kwargs: options of ``base`` when it is a class (lr, momentum, ...).
    """

    def __init__(self, model: nn.Module, base, *, sites=None, gcw: GCWOptions = _DEFAULT_GCW, **base_kwargs):
        if not isinstance(model, nn.Module):
            raise GCSurgeryError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(gcw, GCWOptions):
            raise GCSurgeryError(f"gcw must be a GCWOptions, got {gcw!r}; build one with GCWOptions(rho=...).")
        net = unwrap(model)
        base = _build_base(model, base, base_kwargs)
        names = _site_names(net, sites)
        named = dict(net.named_parameters())
        group_of = {id(p): i for i, g in enumerate(base.param_groups) for p in g["params"]}
        missing = [n for n, p in named.items() if p.requires_grad and id(p) not in group_of]
        if missing:
            raise GCSurgeryError(
                f"{len(missing)} trainable parameter(s) of the model are not in the base optimizer, e.g. "
                f"{missing[:5]}; build the optimizer over all model.parameters() (or freeze those)."
            )
        sharded = [n for n in names if _is_sharded(named[n])]
        if sharded:
            raise GCSurgeryError(
                f"the GC-W site(s) {sharded} are sharded (DTensor parameters, e.g. from FSDP2's fully_shard): GC-W's "
                "corrector attends over all rows of a weight, and sharding splits the rows across ranks. Train a "
                "sharded model with the base optimizer (its GC-ODE branches train as usual: the gcode arm), use DDP "
                "for GC-W, or leave those modules unsharded and pass sites= that exclude the sharded ones."
            )
        devices = {str(named[n].device) for n in names}
        if len(devices) > 1:
            raise GCSurgeryError(
                f"the GC-W sites {names} live on several devices {sorted(devices)}; GC-W batches its sites on one "
                "device: pass the sites of one device (or move the model)."
            )
        super().__init__(base.param_groups, base.defaults)
        self.base, self.gcw, self._step = base, gcw, 0
        self.param_groups = base.param_groups
        self.state = defaultdict(dict)
        self._lr0 = [float(g.get("initial_lr", g["lr"])) for g in base.param_groups]
        self._layout = Layout.of(gcw)
        self._sites = []
        for n in names:
            gi = group_of[id(named[n])]
            self._sites.append(_Site(n, named[n], gi, _moment_kind(base.param_groups[gi])))
        self._cache: dict = {}
        self._reset_state()

    # --- state ------------------------------------------------------------------------------------

    def _hist_dtype(self, p: Tensor) -> torch.dtype:
        return torch.bfloat16 if self.gcw.history_dtype == "bfloat16" else p.dtype

    def _reset_state(self) -> None:
        dev = self._sites[0].param.device
        self._gcw = GCWState.fresh(self._layout, self.gcw, [s.rows for s in self._sites], dev)
        D = self._layout.n_dirs
        for s in self._sites:
            hd = self._hist_dtype(s.param)
            st = {"hist": torch.zeros(s.rows, D, s.n, dtype=hd, device=dev)}
            if self.gcw.cumulative_bound is not None:
                st["e"] = torch.zeros(s.rows, s.n, dtype=hd, device=dev)
            self.state[s.param] = st
        self._link()

    def _link(self) -> None:
        """Points each site's ``site`` and ``rows`` entries at its slice of the stacked small state."""
        for i, s in enumerate(self._sites):
            self.state[s.param]["site"] = self._gcw.site[i]
            self.state[s.param]["rows"] = self._gcw.rows[i, : s.rows]

    _OWN = ("base", "gcw", "_step", "_lr0", "_layout", "_sites", "_gcw")

    def __getstate__(self) -> dict:  # torch.optim.Optimizer keeps only defaults, state and param_groups
        return super().__getstate__() | {k: self.__dict__[k] for k in self._OWN}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.param_groups, self._cache = self.base.param_groups, {}
        self._link()

    def site_state(self, name: str) -> dict[str, Tensor]:
        """Named views of one site's GC-W state (``psi``, ``exp_avg``, ``trust_stats``, ``feats``, ``hist``...)."""
        if name not in self.sites:
            raise GCSurgeryError(f"unknown GC-W site {name!r}; the sites are {list(self.sites)}.")
        st = self.state[self._sites[self.sites.index(name)].param]
        out = {k: st["site"][sl] for k, sl in self._layout.site.items()}
        out |= {k: st["rows"][:, sl] for k, sl in self._layout.rows.items()}
        return out | {k: st[k] for k in ("hist", "e") if k in st}

    def __repr__(self) -> str:
        return f"GCOptimizer(base={type(self.base).__name__}, sites={[s.name for s in self._sites]}, gcw={self.gcw})"

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._sites)

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group to the base optimizer (its parameters are not GC-W sites)."""
        if "base" not in self.__dict__:  # Optimizer.__init__ registering the base's groups
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)
        g = self.base.param_groups[-1]
        self._lr0.append(float(g.get("initial_lr", g["lr"])))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    # --- the step ---------------------------------------------------------------------------------

    def _moment(self, site: _Site) -> Tensor | None:
        if site.kind is None:
            return None
        v = _state_owner(self.base).state.get(site.param, {}).get(_MOMENT_KEY[site.kind])
        return v.reshape(site.rows, site.n) if isinstance(v, Tensor) and v.shape == site.param.shape else None

    def _direction_scales(self, t: int) -> tuple[Tensor, Tensor]:
        """(S, D) EMA scales and de-biasing factors of the directions at step t (see `gcw_step`)."""
        D, horizons = self._layout.n_dirs, self.gcw.horizons
        key = []
        for s in self._sites:
            g = self.param_groups[s.group]
            key.append(
                (s.kind, float(g["momentum"]), float(g.get("dampening", 0.0)))
                if s.kind == "sgd"
                else (s.kind, float(g["betas"][0]), 0.0)
                if s.kind == "adam"
                else (None, 0.0, 0.0)
            )
        key = tuple(key)
        if self._cache.get("scale_key") != key:
            scale, beta, offset = [], [], []
            for kind, mu, damp in key:
                sc, be, of = [1.0] * D, [0.0] * D, [0] * D
                own = horizons
                if kind is not None:
                    sc[1] = (1 - mu) / (1 - damp) if kind == "sgd" and damp < 1 else 1.0
                    be[1], own = mu, horizons[1:]
                for k, h in enumerate(own, start=D - 1 - len(own)):
                    be[k], of[k] = 1 - 1 / h, 1  # GC-W's EMAs have seen g_{t+1} already
                scale.append(sc)
                beta.append(be)
                offset.append(of)
            dev = self._gcw.site.device  # host-to-device copies that never wait (no stream sync on a GPU)
            self._cache.update(
                scale_key=key,
                scale=torch.tensor(scale).to(dev, non_blocking=True),
                beta=torch.tensor(beta).to(dev, non_blocking=True),
                offset=torch.tensor(offset, dtype=torch.float32).to(dev, non_blocking=True),
            )
        c = self._cache
        debias = 1 / (1 - c["beta"] ** (c["offset"] + t).clamp_min(1))
        return c["scale"], debias

    def _lr_ratio(self) -> float | Tensor:
        ratios = []
        for s in self._sites:
            g = self.param_groups[s.group]
            lr0 = g.get("initial_lr", self._lr0[s.group])
            ratios.append(g["lr"] / lr0 if lr0 else 1.0)
        if all(isinstance(r, float) for r in ratios):
            if len(set(ratios)) == 1:
                return ratios[0]
            return torch.tensor(ratios).to(self._gcw.site.device, non_blocking=True)
        dev = self._gcw.site.device
        return torch.stack([torch.as_tensor(r, dtype=torch.float32).to(dev, non_blocking=True) for r in ratios])

    @torch.no_grad()
    def step(self, closure=None):
        """One step. ``closure`` (recomputes the loss and the gradients) is optional, except over a two-pass
        base such as pytorch-optimizer's SAM (it has ``first_step`` and ``second_step``): there the gradients
        are computed before the call, as SAM asks, the base perturbs the weights, ``closure`` recomputes the
        gradients at the perturbed weights, and GC-W corrects those before the base's update."""
        loss = None
        base_step = self.base.step
        if _two_pass(self.base):
            if closure is None:
                raise GCSurgeryError(
                    f"the base {type(self.base).__name__} takes two passes per step, so step() needs a closure that "
                    "recomputes the loss and the gradients (compute them once before the call, as for the base)."
                )
            self.base.first_step(zero_grad=True)
            base_step = self.base.second_step
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        views: list[SiteTensors | None] = []
        for s in self._sites:
            p = s.param
            if p.grad is None:
                views.append(None)
                continue
            st = self.state[p]
            P = _preconditioner(_state_owner(self.base).state.get(p, {}), self.param_groups[s.group], p.shape)
            views.append(
                SiteTensors(
                    grad=p.grad.reshape(s.rows, s.n),
                    weight=p.detach().reshape(s.rows, s.n),
                    moment=self._moment(s),
                    base_moment=s.kind is not None,
                    precond=None if P is None else P.reshape(s.rows, s.n),
                    hist=st["hist"],
                    e=st.get("e"),
                )
            )
        if all(v is None for v in views):
            base_step()
            self._step += 1
            return loss
        t = self._step
        scale, debias = self._direction_scales(t)
        corrected, _, before = gcw_step(
            self._layout, self.gcw, views, self._gcw, step=t, lr_ratio=self._lr_ratio(), scale=scale,
            debias=debias, train=t % self.gcw.update_every == 0,
        )  # fmt: skip
        swapped = []
        for s, g in zip(self._sites, corrected, strict=True):
            if g is not None:
                swapped.append((s.param, s.param.grad))
                s.param.grad = g.view(s.param.shape)
        try:
            base_step()
        finally:
            for p, g in swapped:
                p.grad = g
        after = [
            None if v is None else (s.param.detach().reshape(s.rows, s.n), self._moment(s))
            for s, v in zip(self._sites, views, strict=True)
        ]
        record_step(views, before, after)
        self._step += 1
        return loss

    def gc_stats(self) -> dict[str, dict[str, float]]:
        """Per site, for logging (one host sync): ``ratio`` ‖ΔG‖/‖G‖ of the last step; ``next_grad_dot``
        ⟨P g_{t+1}, ΔG_t⟩ of the last pair (> 0: the applied correction lowered the next loss to first
        order; P = 1 for SGD); ``proposal_dot`` and ``cosine`` for the undamped proposal; ``trust``;
        ``bound_scale`` (mean cumulative-bound factor); ``corrector_loss``; ``coef_<direction>``."""
        sv = self._gcw.site.detach().cpu()
        L, out = self._layout.site, {}
        for i, s in enumerate(self._sites):
            d = {name: float(sv[i, L[name]][0]) for name in STATS}
            coef = sv[i, L["coef"]].tolist()
            d |= {f"coef_{n}": float(x) for n, x in zip(self.gcw.direction_names, coef, strict=True)}
            w, w2 = sv[i, L["trust_stats"]][:2].tolist()
            d["observations"] = w * w / w2 if w2 > 0 else 0.0  # effective number of trust observations
            out[s.name] = d
        return out

    def format_stats(self) -> str:
        """`gc_stats` as an aligned table with a plain-words state per site (one host sync)."""
        return format_stats(self.gc_stats(), self.gcw)

    # --- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus ``"gcw"``: options, sites, step, initial lrs and GC-W's
        per-site state, keyed by parameter index like the base's."""
        sd = self.base.state_dict()
        own = torch.optim.Optimizer.state_dict(self)["state"]
        sd["gcw"] = {
            "options": self.gcw.to_dict(),
            "sites": list(self.sites),
            "step": self._step,
            "lr0": list(self._lr0),
            "state": own,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a GCOptimizer state dict (exact resume), or a plain base optimizer's state dict (then the
        GC-W state is left as it is: fresh for a new optimizer)."""
        if not isinstance(state_dict, dict):
            raise GCSurgeryError(
                f"load_state_dict expects the dict from optimizer.state_dict(), got {type(state_dict).__name__}."
            )
        state_dict = dict(state_dict)
        gc = state_dict.pop("gcw", None)
        if gc is not None:
            if not isinstance(gc, dict) or "state" not in gc:
                raise GCSurgeryError(
                    "this checkpoint's 'gcw' entry is not from this version of GCOptimizer (no 'state'); resume "
                    "it with the gcsurgery version that wrote it, or load only the base state (drop 'gcw')."
                )
            if gc["options"] != self.gcw.to_dict():
                raise GCSurgeryError(
                    f"the checkpoint's GCWOptions {gc['options']} differ from this optimizer's {self.gcw.to_dict()}; "
                    "build the GCOptimizer with GCWOptions.from_dict(checkpoint['gcw']['options'])."
                )
            if list(gc["sites"]) != list(self.sites):
                raise GCSurgeryError(
                    f"the checkpoint has GC-W sites {list(gc['sites'])}, this optimizer {list(self.sites)}; "
                    "build it with the same sites."
                )
        try:
            self.base.load_state_dict(state_dict)
        except (KeyError, ValueError) as e:
            raise GCSurgeryError(
                f"this optimizer state does not fit the {type(self.base).__name__} over this model ({e}); it was "
                "saved for another model or other parameter groups: build the optimizer as it was when saved."
            ) from e
        self.param_groups = self.base.param_groups
        if gc is None:
            return
        # torch's loader maps the saved parameter indices to parameters and moves each tensor to its parameter's
        # device; it would also cast it to the parameter's dtype (lossy for float32 state of a bfloat16 weight),
        # so it loads into float64 stand-ins of the parameters, and each entry then gets its own dtype back
        stand_ins = [
            [torch.empty(0, dtype=torch.float64, device=p.device) for p in g["params"]] for g in self.param_groups
        ]
        proxy = torch.optim.Optimizer([{"params": ps} for ps in stand_ins], {})
        proxy.load_state_dict({"state": gc["state"], "param_groups": state_dict["param_groups"]})
        real = {
            id(x): p
            for xs, g in zip(stand_ins, self.param_groups, strict=True)
            for x, p in zip(xs, g["params"], strict=True)
        }
        loaded = {real[id(x)]: st for x, st in proxy.state.items()}
        self._step, self._lr0 = int(gc["step"]), [float(x) for x in gc["lr0"]]
        D = self._layout.n_dirs
        for s in self._sites:
            st = dict(loaded.get(s.param, {}))
            want = {"hist": (self._hist_dtype(s.param), (s.rows, D, s.n))}
            if self.gcw.cumulative_bound is not None:
                want["e"] = (self._hist_dtype(s.param), (s.rows, s.n))
            want |= {"site": (torch.float32, (self._layout.site_size,))}
            want |= {"rows": (torch.float32, (s.rows, self._layout.rows_size))}
            if set(st) != set(want):
                raise GCSurgeryError(
                    f"the checkpoint's GC-W state of {s.name!r} has entries {sorted(st)}, expected {sorted(want)}; "
                    "it was saved by another GCOptimizer configuration."
                )
            for k, (dtype, shape) in want.items():
                if tuple(st[k].shape) != shape:
                    raise GCSurgeryError(
                        f"the checkpoint's GC-W {k!r} of {s.name!r} has shape {tuple(st[k].shape)}, expected {shape}; "
                        "it was saved for another model."
                    )
                st[k] = st[k].to(dtype)
            self.state[s.param] = st
        site = torch.stack([self.state[s.param]["site"] for s in self._sites])
        rows = torch.nn.utils.rnn.pad_sequence([self.state[s.param]["rows"] for s in self._sites], batch_first=True)
        self._gcw = GCWState(site, rows, self._gcw.counts, self._gcw.mask.to(site.device))
        self._link()
