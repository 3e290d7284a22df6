"""GCOptimizer: GC-W (weight gradient correction) on top of any torch.optim optimizer, timm's too.

At every step, for each GC-W site, the corrector turns the gradient's history into a bounded
correction ΔG, the base optimizer steps on G + ΔG, and at the next step the corrector is trained on
the hypergradient ``-⟨P g_{t+1}, ΔG_t⟩`` (P: the base optimizer's elementwise preconditioner, 1 for
SGD). Corrections are damped by a per-site trust factor and a cumulative bound (see ``docs/gcw.md``).
"""

import difflib

import torch
from torch import Tensor, nn

from .errors import GCSurgeryError
from .gcw import (
    Corrector,
    GCWOptions,
    bounded_coefficients,
    correction,
    cumulative_scale,
    direction_weights,
    hyper_loss,
    masked_adam_,
    next_dots,
    row_features,
    row_gram,
    row_quadratic,
    trust_factor,
    unit_gram,
    update_trust,
)
from .wrappers import unwrap

__all__ = ["GCOptimizer"]

_DEFAULT_GCW = GCWOptions()
_BUFFERS = ("V", "e", "feats", "gram", "c", "f", "raw_norm", "valid", "trust", "adam_step")


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


class _Site:
    """One GC-W site: its parameter, corrector, corrector-Adam state and gradient history."""

    def __init__(self, name: str, param: nn.Parameter, group: int, opts: GCWOptions):
        self.name, self.param, self.group = name, param, group
        self.rows = param.shape[0]
        self.n = param.numel() // self.rows
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(opts.seed)  # CPU only; restored on exit
            corrector = Corrector(opts.n_features, opts.n_dirs, d_model=opts.d_model, hidden=opts.hidden)
        self.corrector = corrector.to(param.device)
        self.params = list(self.corrector.parameters())
        # the corrector's parameters are views of one flat vector: its Adam step is a handful of ops
        self.flat = torch.cat([p.detach().flatten() for p in self.params])
        offset = 0
        for p in self.params:
            p.data = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.exp_avg = [torch.zeros_like(self.flat)]
        self.exp_avg_sq = [torch.zeros_like(self.flat)]
        betas = [0.0, *(1 - 1 / h for h in opts.horizons), 0.0]
        self.ema_betas = torch.tensor(betas, device=param.device)  # (D,)
        self.pending = False  # a correction awaits the next gradient
        self.stats: dict[str, Tensor] = {}
        for key in _BUFFERS:
            setattr(self, key, None)

    def init_buffers(self, opts: GCWOptions):
        p, C, D = self.param, self.rows, opts.n_dirs
        f32 = {"device": p.device, "dtype": torch.float32}
        self.V = torch.zeros(C, D, self.n, device=p.device, dtype=p.dtype)  # (C, D, n): g, m_1..m_K, w
        self.e = torch.zeros(C, self.n, device=p.device, dtype=p.dtype)  # EMA of applied ΔG
        self.trust = torch.zeros(4, **f32)
        self.adam_step = torch.zeros((), **f32)


class GCOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer and corrects the gradients of the GC-W sites (`docs/gcw.md`).

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
        super().__init__(base.param_groups, base.defaults)
        self.base, self.gcw, self._step = base, gcw, 0
        self.param_groups, self.state = base.param_groups, base.state
        self._lr0 = [float(g.get("initial_lr", g["lr"])) for g in base.param_groups]
        self._sites = [_Site(n, named[n], group_of[id(named[n])], gcw) for n in names]

    def __repr__(self) -> str:
        return f"GCOptimizer(base={type(self.base).__name__}, sites={[s.name for s in self._sites]}, gcw={self.gcw})"

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._sites)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        swapped = []
        for site in self._sites:
            g = site.param.grad
            if g is None:
                continue
            group = self.param_groups[site.group]
            lr0 = group.get("initial_lr", self._lr0[site.group])
            lr_ratio = group["lr"] / lr0 if lr0 else 1.0
            dG = self._site_step(site, g, lr_ratio)  # (C, n)
            site.param.grad = g + dG.view(g.shape)
            swapped.append((site.param, g))
        try:
            self.base.step()
        finally:
            for p, g in swapped:
                p.grad = g
        self._step += 1
        return loss

    def _site_step(self, site: _Site, g: Tensor, lr_ratio) -> Tensor:
        opts, t, C = self.gcw, self._step, site.rows
        if site.V is None:
            site.init_buffers(opts)
        h = g.reshape(C, site.n)  # g_{t+1}: (C, n)
        ok = torch.isfinite(h).all()
        if site.pending:
            self._learn(site, h, ok, lr_ratio, train=t % opts.update_every == 0)
        self._remember(site, h, ok)
        return self._propose(site, ok, lr_ratio)

    def _learn(self, site: _Site, h: Tensor, ok: Tensor, lr_ratio, *, train: bool):
        """Measures the last correction against the new gradient; trains the corrector on it."""
        opts = self.gcw
        P = _preconditioner(self.base.state.get(site.param, {}), self.param_groups[site.group], site.param.shape)
        Ph = h if P is None else h * P.reshape(h.shape)  # (C, n)
        cos, norms = unit_gram(site.gram)  # of step t
        inv = torch.where(norms > 0, 1 / norms.clamp_min(1e-30), 0)
        B = next_dots(Ph, site.V) * inv * norms[:, :1]  # (C, D): ‖g_t‖ ⟨P g_{t+1}, v̂_j⟩
        ph_norm = torch.linalg.vector_norm(Ph).float()
        pair_ok = ok & site.valid & torch.isfinite(B).all() & torch.isfinite(ph_norm)
        B = torch.where(pair_ok, B, 0)
        row_dot = (site.c * B).sum(1)  # (C,) ⟨P g_{t+1}, ΔG_t proposed⟩ per row
        proposed = row_dot.sum()
        raw_norm = torch.linalg.vector_norm(site.raw_norm)
        r = proposed / (torch.where(pair_ok, ph_norm, 0) * raw_norm).clamp_min(1e-30)
        site.trust = update_trust(site.trust, r, pair_ok & (raw_norm > 0), beta=1 - 1 / opts.trust_horizon)
        site.stats.update(next_grad_dot=(site.f * row_dot).sum(), proposal_dot=proposed, cosine=r)
        if not train:
            return
        Z = torch.where(pair_ok, ph_norm * torch.linalg.vector_norm(norms[:, 0]), 1).clamp_min(1e-30)
        with torch.enable_grad():
            c = bounded_coefficients(site.corrector(site.feats), cos, rho=opts.rho)
            loss = hyper_loss(c, B / Z)
            grad = torch.cat([gr.flatten() for gr in torch.autograd.grad(loss, site.params)])
        total = torch.linalg.vector_norm(grad)
        step_ok = pair_ok & torch.isfinite(total)
        grad = torch.where(step_ok, grad * torch.clamp(opts.clip / (total + 1e-6), max=1.0), 0)
        masked_adam_(
            [site.flat], [grad], site.exp_avg, site.exp_avg_sq, site.adam_step,
            lr=opts.lr * lr_ratio, betas=opts.betas, ok=step_ok,
        )  # fmt: skip
        site.stats["corrector_loss"] = torch.where(step_ok, loss.detach(), 0)

    def _remember(self, site: _Site, h: Tensor, ok: Tensor):
        """Pushes g_{t+1} and W_{t+1} into the history; leaves it unchanged when g_{t+1} is not finite."""
        V = site.V
        h_safe = torch.where(ok, h, 0).to(V.dtype)
        V[:, 0].copy_(torch.where(ok, h, V[:, 0]))
        for k, horizon in enumerate(self.gcw.horizons, start=1):
            V[:, k].lerp_(h_safe, torch.where(ok, 1 / horizon, 0).to(V.dtype))
        V[:, -1].copy_(torch.where(ok, site.param.detach().reshape(site.rows, site.n), V[:, -1]))

    def _propose(self, site: _Site, ok: Tensor, lr_ratio) -> Tensor:
        """The correction for this step, damped by trust and the cumulative bound: (C, n)."""
        opts, t = self.gcw, self._step
        gram = row_gram(site.V)  # (C, D, D)
        cos, norms = unit_gram(gram)
        feats = row_features(gram, debias=1 / (1 - site.ema_betas ** (t + 1)), step=t, lr_ratio=lr_ratio)
        c = bounded_coefficients(site.corrector(feats), cos, rho=opts.rho)  # (C, D)
        raw_norm = norms[:, 0] * row_quadratic(c, cos).sqrt()  # (C,) ‖ΔG_row‖
        tau = trust_factor(site.trust, z=opts.trust_z, warmup=opts.trust_warmup) if opts.trust else norms.new_ones(())
        f, lam = tau.expand(site.rows), norms.new_ones(())  # f: (C,) applied fraction per row
        if opts.cumulative_bound is not None:
            beta = 1 - 1 / opts.horizons[-1]
            e_norm = torch.linalg.vector_norm(site.e, dim=1).float()
            lam = cumulative_scale(f * raw_norm, e_norm, norms[:, -2], beta=beta, bound=opts.cumulative_bound)
            f = f * lam
        dG = correction(direction_weights(c * f[:, None], norms), site.V)  # (C, n)
        valid = ok & torch.isfinite(dG).all()
        dG = torch.where(valid, dG, 0)
        if opts.cumulative_bound is not None:
            site.e.mul_(beta).add_(dG, alpha=1 - beta)
        site.feats, site.gram, site.c, site.f, site.raw_norm, site.valid = feats, gram, c, f, raw_norm, valid
        site.pending = True
        g_norm = torch.linalg.vector_norm(norms[:, 0])
        applied = torch.linalg.vector_norm(f * raw_norm)
        site.stats.update(
            ratio=torch.where(valid, applied / g_norm.clamp_min(1e-30), 0),
            trust=tau,
            bound_scale=lam.mean(),
            coef=(c * f[:, None]).mean(0),
        )
        return dG

    def gc_stats(self) -> dict[str, dict[str, float]]:
        """Per site, for logging (syncs): ``ratio`` ‖ΔG‖/‖G‖ of the last step; ``next_grad_dot``
        ⟨P g_{t+1}, ΔG_t⟩ of the last pair (> 0: the applied correction lowered the next loss to first
        order; P = 1 for SGD); ``proposal_dot`` and ``cosine`` for the undamped proposal; ``trust``;
        ``bound_scale`` (mean cumulative-bound factor); ``corrector_loss``; ``coef_<direction>``."""
        out = {}
        for site in self._sites:
            d = {}
            for key, v in site.stats.items():
                if key == "coef":
                    d.update({f"coef_{n}": float(x) for n, x in zip(self.gcw.direction_names, v.tolist(), strict=True)})
                else:
                    d[key] = float(v)
            out[site.name] = d
        return out

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus ``"gcw"``: options, sites, step, and per site the
        corrector, its Adam state and the gradient history."""
        sd = self.base.state_dict()
        sites = {}
        for s in self._sites:
            sites[s.name] = {
                "corrector": s.corrector.state_dict(),
                "exp_avg": list(s.exp_avg),
                "exp_avg_sq": list(s.exp_avg_sq),
                "pending": s.pending,
                "stats": dict(s.stats),
                **{k: getattr(s, k) for k in _BUFFERS},
            }
        sd["gcw"] = {"options": self.gcw.to_dict(), "step": self._step, "lr0": list(self._lr0), "sites": sites}
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
        self.param_groups, self.state = self.base.param_groups, self.base.state
        if gc is None:
            return
        self._step, self._lr0 = int(gc["step"]), [float(x) for x in gc["lr0"]]
        for s in self._sites:
            saved = gc["sites"][s.name]
            dev = s.param.device
            s.corrector.load_state_dict(saved["corrector"])
            s.exp_avg = [x.to(dev).clone() for x in saved["exp_avg"]]
            s.exp_avg_sq = [x.to(dev).clone() for x in saved["exp_avg_sq"]]
            s.pending = bool(saved["pending"])
            s.stats = {k: v.to(dev).clone() for k, v in saved["stats"].items()}
            for k in _BUFFERS:
                v = saved[k]
                if isinstance(v, Tensor) and k in ("V", "e"):
                    v = v.to(device=dev, dtype=s.param.dtype)
                setattr(s, k, None if v is None else v.to(dev).clone())
