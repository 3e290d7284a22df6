"""GC-W: the corrector network and all of the update math of weight gradient correction.

For a site weight W with C output rows, every row is a token with D directions: the current gradient g,
gradient EMAs m_k (the first normally *is* the base optimizer's momentum or Adam first moment), and W.
From the per-row Gram matrix of the directions (norms and cosines: one batched matmul per site) the
corrector predicts bounded coefficients c over the unit directions and the correction is
``ΔG_row = ‖g_row‖ · Σ_j c_j v̂_j``.

`gcw_step` holds the whole step for all sites at once: the weight-sized work is a few passes per site,
everything small (features, the corrector's forward and backward, its Adam, trust, bounds) runs once on
tensors stacked over sites, so its op count does not grow with the number of sites. `record_step`
updates the stored history after the base optimizer stepped. Both read and write only the tensors they
are given (`SiteTensors`, `GCWState`); `GCOptimizer` is a thin loop around them. The trust and
cumulative-bound helpers implement the "do no harm" damping described in ``docs/gcw.md``.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import GCSurgeryError

__all__ = [
    "GCWOptions",
    "Corrector",
    "Layout",
    "SiteTensors",
    "GCWState",
    "gcw_step",
    "record_step",
    "corrector_forward",
    "row_gram",
    "unit_gram",
    "row_features",
    "row_quadratic",
    "bounded_coefficients",
    "direction_weights",
    "correction",
    "next_dots",
    "hyper_loss",
    "update_trust",
    "trust_factor",
    "cumulative_scale",
    "masked_adam_",
]

_TINY = 1e-30
STATS = ("ratio", "next_grad_dot", "proposal_dot", "cosine", "trust", "bound_scale", "corrector_loss")


@dataclass(frozen=True, kw_only=True)
class GCWOptions:
    """Knobs of the GC-W corrector. Defaults are chosen to do no harm (see ``docs/gcw.md``).

    Attributes:
        rho: per-row bound, ``‖ΔG_row‖ ≤ rho · ‖g_row‖``.
        lr: the corrector's Adam learning rate at the base optimizer's initial lr; it follows the
            base lr schedule (scaled by ``lr_t / lr_0``).
        betas: the corrector's Adam betas.
        clip: max gradient norm of each site's corrector per update.
        update_every: train the corrector every k steps (the hypergradient of the latest pair).
        horizons: EMA horizons of the gradient history in steps (beta = 1 - 1/h), increasing. The first EMA
            direction is the base optimizer's own first moment when it keeps one (SGD's ``momentum_buffer``,
            Adam's ``exp_avg``: its horizon is then the base's, and the first horizon is not used); the others
            are kept by GC-W. The last one is also the horizon of the cumulative bound.
        d_model: width of the attention's Q, K, V.
        hidden: width of the MLP after the attention.
        trust: damp each site's correction by a trust factor learnt from its measured effect.
        trust_horizon: window (steps) of the trust statistics.
        trust_z: the t-statistic of the mean next-gradient cosine at which trust starts rising;
            full trust at twice that.
        trust_warmup: effective number of observations before full trust is possible.
        cumulative_bound: bound on the EMA of applied corrections relative to the EMA of
            gradients at the longest horizon, per row; None turns the bound off.
        seed: seed of the corrector's initialisation (a private generator; the global RNG is untouched).
        history_dtype: dtype of the stored history, ``"bfloat16"`` (half the bytes of a float32 weight) or
            ``"param"`` (the parameter's dtype).
    """

    rho: float = 0.5
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0
    update_every: int = 1
    horizons: tuple[int, ...] = (10,)
    d_model: int = 16
    hidden: int = 32
    trust: bool = True
    trust_horizon: int = 100
    trust_z: float = 2.0
    trust_warmup: int = 20
    cumulative_bound: float | None = 0.25
    seed: int = 0
    history_dtype: str = "bfloat16"

    def __post_init__(self):
        def bad(name, rule):
            value = getattr(self, name)
            raise GCSurgeryError(f"GCWOptions.{name} must be {rule}, got {value!r}; pass a valid value.")

        def positive(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                bad(name, "a positive finite number")

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "a positive int")

        for name in ("rho", "lr", "clip", "trust_z"):
            positive(name)
        for name in ("update_every", "d_model", "hidden", "trust_horizon", "trust_warmup"):
            positive_int(name)
        if not isinstance(self.trust, bool):
            bad("trust", "True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", "an int")
        if self.cumulative_bound is not None:
            positive("cumulative_bound")
        b = self.betas
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(x, float) and 0 <= x < 1 for x in b)):
            bad("betas", "two floats in [0, 1), like (0.9, 0.999)")
        h = self.horizons
        if not (
            isinstance(h, (tuple, list))
            and 1 <= len(h) <= 4
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 2 for x in h)
            and all(x < y for x, y in zip(h, h[1:], strict=False))
        ):
            bad("horizons", "1 to 4 increasing ints >= 2 (EMA horizons in steps), like (10,) or (10, 100)")
        if self.history_dtype not in ("bfloat16", "param"):
            bad("history_dtype", "'bfloat16' or 'param'")
        object.__setattr__(self, "betas", tuple(b))
        object.__setattr__(self, "horizons", tuple(h))

    @property
    def n_dirs(self) -> int:
        """Directions per row: the gradient, one EMA per horizon, the weight."""
        return len(self.horizons) + 2

    @property
    def n_features(self) -> int:
        """Features per row token (see `row_features`)."""
        d = self.n_dirs
        return d * (d - 1) // 2 + (d - 1) + 1 + 2

    @property
    def direction_names(self) -> tuple[str, ...]:
        return ("grad", *(f"ema{h}" for h in self.horizons), "weight")

    def to_dict(self) -> dict:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GCWOptions":
        valid = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict):
            raise GCSurgeryError(f"GCWOptions.from_dict needs a dict like GCWOptions().to_dict(), got {d!r}.")
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise GCSurgeryError(f"unknown GCWOptions field(s) {unknown}; valid fields are {valid}.")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


class Corrector(nn.Module):
    """Rows attend to each other, then a tiny MLP emits raw per-row coefficients (zero at init).

    This module is the reference (and the initialiser) of one site's corrector; the optimizer runs all
    sites' correctors at once with `corrector_forward` on their parameters stacked into one tensor.

    Args:
        n_features: features per row token.
        n_dirs: directions per row.
        d_model: width of Q, K, V.
        hidden: width of the MLP.
    """

    def __init__(self, n_features: int, n_dirs: int, *, d_model: int, hidden: int):
        super().__init__()
        for name, v in (("n_features", n_features), ("n_dirs", n_dirs), ("d_model", d_model), ("hidden", hidden)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GCSurgeryError(f"Corrector {name} must be a positive int, got {v!r}.")
        self.qkv = nn.Linear(n_features, 3 * d_model)
        self.mlp = nn.Linear(n_features + d_model, hidden)
        self.out = nn.Linear(hidden, n_dirs)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:  # (C, F) -> (C, D)
        if x.dim() != 2 or x.shape[1] != self.qkv.in_features:
            raise GCSurgeryError(
                f"Corrector takes (rows, {self.qkv.in_features}) features, got shape {tuple(x.shape)}; "
                "build it with n_features=x.shape[1]."
            )
        q, k, v = self.qkv(x).unsqueeze(0).chunk(3, dim=-1)  # 3 × (1, C, d)
        a = F.scaled_dot_product_attention(q, k, v)[0]  # softmax(QKᵀ/√d)V: (C, d)
        return self.out(F.gelu(self.mlp(torch.cat([x, a], dim=-1))))


def _slots(sizes: dict[str, int]) -> tuple[dict[str, slice], int]:
    out, at = {}, 0
    for name, n in sizes.items():
        out[name] = slice(at, at + n)
        at += n
    return out, at


@dataclass(frozen=True)
class Layout:
    """Where each per-site quantity lives in GC-W's two small float32 tensors per site.

    ``site`` (L,): the corrector's parameters ``psi`` (flat, in `Corrector.named_parameters` order), their
    Adam moments and step, the trust statistics, the pending/valid flags of the last proposal and the
    logged statistics. ``rows`` (C, K): per row, what step t's proposal was built from, kept for its
    hypergradient at step t+1: features, cosines, norms, coefficients, applied fraction, ‖ΔG_row‖.
    """

    n_dirs: int
    n_features: int
    params: tuple[tuple[str, tuple[int, ...]], ...]  # the corrector's (name, shape)
    site: dict[str, slice]
    rows: dict[str, slice]
    site_size: int
    rows_size: int

    @classmethod
    def of(cls, opts: "GCWOptions") -> "Layout":
        with torch.random.fork_rng(devices=[]):  # only the shapes are wanted: leave the global RNG alone
            ref = Corrector(opts.n_features, opts.n_dirs, d_model=opts.d_model, hidden=opts.hidden)
        params = tuple((n, tuple(p.shape)) for n, p in ref.named_parameters())
        P = sum(math.prod(s) for _, s in params)
        D, Fe = opts.n_dirs, opts.n_features
        site, site_size = _slots(
            {"psi": P, "exp_avg": P, "exp_avg_sq": P, "adam_step": 1, "trust_stats": 4, "valid": 1, "pending": 1}
            | {name: 1 for name in STATS}
            | {"coef": D}
        )
        rows, rows_size = _slots({"feats": Fe, "cos": D * D, "norms": D, "c": D, "f": 1, "raw_norm": 1})
        return cls(D, Fe, params, site, rows, site_size, rows_size)

    def init_site(self, opts: "GCWOptions", device=None) -> Tensor:
        """A fresh site vector: the corrector initialised from ``opts.seed`` (global RNG untouched), all else 0."""
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(opts.seed)  # CPU only; restored on exit
            ref = Corrector(opts.n_features, opts.n_dirs, d_model=opts.d_model, hidden=opts.hidden)
        v = torch.zeros(self.site_size)
        v[self.site["psi"]] = torch.cat([p.detach().flatten() for p in ref.parameters()])
        return v.to(device)

    def corrector_params(self, psi: Tensor) -> dict[str, Tensor]:
        """Views of stacked flat parameters (S, P) as (S, *shape) per corrector parameter."""
        out, at = {}, 0
        for name, shape in self.params:
            n = math.prod(shape)
            out[name] = psi[:, at : at + n].reshape(psi.shape[0], *shape)
            at += n
        return out


def corrector_forward(layout: Layout, psi: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """All sites' correctors at once: `Corrector.forward` per site, on rows padded to a common count.

    Args:
        layout: the `Layout` of the options.
        psi: (S, P) flat corrector parameters, one row per site.
        x: (S, R, F) features; rows past a site's own count are padding.
        mask: (S, R) bool, True on real rows (padding is never attended to).

    Returns:
        (S, R, D) raw coefficients (garbage on padding rows).
    """
    w = layout.corrector_params(psi)
    qkv = torch.baddbmm(w["qkv.bias"][:, None], x, w["qkv.weight"].transpose(1, 2))  # (S, R, 3d)
    q, k, v = qkv.chunk(3, dim=-1)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, :])  # (S, R, d)
    h = F.gelu(torch.baddbmm(w["mlp.bias"][:, None], torch.cat([x, a], dim=-1), w["mlp.weight"].transpose(1, 2)))
    return torch.baddbmm(w["out.bias"][:, None], h, w["out.weight"].transpose(1, 2))


def row_gram(V: Tensor) -> Tensor:
    """Per-row Gram matrix of the directions, in float32: (C, D, n) -> (C, D, D)."""
    return torch.bmm(V, V.transpose(1, 2)).float()


def unit_gram(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Cosines and norms from Gram matrices (..., D, D); a zero direction has cosine 0 with everything.

    Returns:
        (cos (..., D, D), norms (..., D)).
    """
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # (..., D)
    inv = torch.where(norms > 0, 1 / norms.clamp_min(_TINY), 0)
    return gram * inv[..., :, None] * inv[..., None, :], norms


def row_features(
    gram: Tensor, *, debias: Tensor, step: float, lr_ratio: float | Tensor, mask: Tensor | None = None
) -> Tensor:
    """Scale-free features of each row token: cosines, log-norm ratios, step and lr schedule.

    Args:
        gram: (..., C, D, D) per-row Gram matrix of (g, m_1..m_K, w).
        debias: broadcastable to (..., C, D): factors that bring each direction to the scale of a
            de-biased gradient EMA (1 for g and w).
        step: the step count.
        lr_ratio: the base optimizer's lr now over its initial lr (a float, or broadcastable to (..., C, 1)).
        mask: (..., C) bool, the real rows (the others are padding, left out of the layer mean).

    Returns:
        (..., C, F) finite features, F = D(D-1)/2 + (D-1) + 3.
    """
    D = gram.shape[-1]
    cos, norms = unit_gram(gram)
    iu = torch.triu_indices(D, D, 1, device=gram.device)
    f_cos = cos[..., iu[0], iu[1]]  # (..., C, D(D-1)/2)
    logn = torch.log(norms * debias + _TINY)  # (..., C, D)
    f_rel = (logn[..., 1:] - logn[..., :1]) / 4  # log ‖v_j‖/‖g‖
    if mask is None:
        mean = logn[..., :1].mean(-2, keepdim=True)
    else:
        m = mask[..., None].to(logn.dtype)
        mean = (logn[..., :1] * m).sum(-2, keepdim=True) / m.sum(-2, keepdim=True).clamp_min(1)
    f_row = (logn[..., :1] - mean) / 4  # the row's gradient scale within the layer
    f_t = torch.full_like(logn[..., :1], math.log1p(step) / math.log(1e4))
    f_lr = torch.zeros_like(logn[..., :1]) + lr_ratio
    x = torch.cat([f_cos, f_rel.clamp(-5, 5), f_row.clamp(-5, 5), f_t, f_lr], dim=-1)
    return torch.nan_to_num(x, nan=0.0, posinf=5.0, neginf=-5.0)


def row_quadratic(c: Tensor, cos: Tensor) -> Tensor:
    """cᵀ·cos·c per row, i.e. ‖Σ_j c_j v̂_j‖²: (..., D), (..., D, D) -> (...)."""
    return (torch.matmul(cos, c[..., None])[..., 0] * c).sum(-1).clamp_min(0)


def bounded_coefficients(raw: Tensor, cos: Tensor, *, rho: float) -> Tensor:
    """Maps raw outputs to coefficients c with ``‖Σ_j c_j v̂_j‖ ≤ rho`` per row.

    Args:
        raw: (..., D) corrector outputs.
        cos: (..., D, D) cosines of the unit directions.
        rho: the per-row bound.

    Returns:
        (..., D) coefficients; zero where raw is zero.
    """
    c = rho * torch.tanh(raw)
    q = row_quadratic(c, cos)  # ‖Σ c_j v̂_j‖²
    return c * torch.clamp(rho / torch.sqrt(q + 1e-12), max=1.0)[..., None]


def direction_weights(c: Tensor, norms: Tensor) -> Tensor:
    """Weights a on the raw directions so that ``Σ_j a_j V_j = ‖g‖ Σ_j c_j v̂_j``: (..., D), (..., D) -> (..., D)."""
    inv = torch.where(norms > 0, 1 / norms.clamp_min(_TINY), 0)
    return c * norms[..., :1] * inv


def correction(a: Tensor, V: Tensor) -> Tensor:
    """ΔG = Σ_j a_j V_j per row: (C, D), (C, D, n) -> (C, n)."""
    return torch.bmm(a.to(V.dtype)[:, None, :], V)[:, 0]


def next_dots(h: Tensor, V: Tensor) -> Tensor:
    """Inner products ⟨h_row, V_j,row⟩: (C, n), (C, D, n) -> (C, D) float32."""
    return torch.bmm(V, h.to(V.dtype)[:, :, None])[..., 0].float()


def hyper_loss(c: Tensor, B: Tensor) -> Tensor:
    """The corrector's loss for one pair of steps, ``-⟨P g_{t+1}, ΔG_t(c)⟩``.

    Args:
        c: (C, D) bounded coefficients of step t (a function of the corrector's parameters).
        B: (C, D) ``‖g_t,row‖ · ⟨P g_{t+1,row}, v̂_j,row⟩``, a constant.
    """
    return -(c * B).sum()


def update_trust(stats: Tensor, r: Tensor, valid: Tensor, *, beta: float) -> Tensor:
    """EMA statistics of the next-gradient cosine r, updated only where valid.

    Args:
        stats: (..., 4) [Σw, Σw², Σw·r, Σw·r²] of the exponentially weighted observations.
        r: (...) the cosine ⟨P g_{t+1}, ΔG_t⟩ / (‖P g_{t+1}‖ ‖ΔG_t‖).
        valid: (...) bool.
        beta: EMA decay.

    Returns:
        (..., 4) new statistics (the old ones where not valid).
    """
    r = torch.where(valid, r, 0).float()
    one = torch.ones_like(r)
    obs = torch.stack([one, one * (1 - beta), r, r * r], dim=-1) * (1 - beta)
    decay = torch.stack([one, one * beta, one, one], dim=-1) * beta
    return torch.where(valid[..., None], stats * decay + obs, stats)


def trust_factor(stats: Tensor, *, z: float, warmup: int) -> Tensor:
    """Trust in [0, 1]: 0 until the mean cosine is z standard errors above 0, 1 at 2z and warmed up.

    Args:
        stats: (..., 4) from `update_trust`.
        z: t-statistic where trust starts rising.
        warmup: effective observations needed for full trust.

    Returns:
        (...) trust factor.
    """
    w, w2, s1, s2 = stats.unbind(-1)
    n_eff = w * w / w2.clamp_min(_TINY)
    mean = s1 / w.clamp_min(_TINY)
    var = (s2 / w.clamp_min(_TINY) - mean * mean).clamp_min(0)
    t = mean * torch.sqrt(n_eff) / torch.sqrt(var + 1e-6)
    tau = (t / z - 1).clamp(0, 1) * (n_eff / warmup).clamp(0, 1)
    return torch.where(w > 0, tau, 0)


def cumulative_scale(step_norm: Tensor, e_norm: Tensor, m_norm: Tensor, *, beta: float, bound: float) -> Tensor:
    """Per-row factor λ in [0, 1] keeping ‖EMA of applied ΔG‖ ≤ bound · ‖EMA of g‖ after this step.

    With e ← β e + (1-β) λ ΔG, the triangle inequality gives ‖e'‖ ≤ β‖e‖ + (1-β) λ ‖ΔG‖. Where e is
    already over the bound (the gradient EMA shrank), λ = 0 and e decays.

    Args:
        step_norm: (...) ‖ΔG_row‖ of the proposed step.
        e_norm: (...) ‖e_row‖ before the step.
        m_norm: (...) ‖m_row‖ of the gradient EMA with the same β.
    """
    room = bound * m_norm - beta * e_norm
    return (room / ((1 - beta) * step_norm).clamp_min(_TINY)).clamp(0, 1)


def masked_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    step: Tensor,
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    ok: Tensor,
    eps: float = 1e-8,
) -> None:
    """Adam step that is an exact no-op where ``ok`` is False (no host sync).

    Grads must be finite. ``step`` counts the steps taken; ``ok``, ``step`` and ``lr`` broadcast against
    the parameters (e.g. () for one corrector, (S, 1) for S stacked ones).
    """
    okf = ok.float()
    b1, b2 = betas
    step.add_(okf)
    s = step.clamp_min(1)
    bc1, bc2 = 1 - b1**s, 1 - b2**s
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq, strict=True):
        m.add_((g - m) * (okf * (1 - b1)))
        v.add_((g * g - v) * (okf * (1 - b2)))
        p.add_(m / ((v / bc2).sqrt() + eps) * (-okf * lr / bc1))


@dataclass
class SiteTensors:
    """One site's tensors for one step, each viewed as rows. Only ``hist`` and ``e`` belong to GC-W.

    Attributes:
        grad: (C, n) the gradient g_{t+1}.
        weight: (C, n) the weight now.
        moment: (C, n) the base optimizer's first moment now, as it keeps it, or None (none kept, or not yet).
        base_moment: True when history slot 1 is the base's first moment (else all EMA slots are GC-W's).
        precond: (C, n) the base's elementwise preconditioner P (Adam's 1/(√v̂ + ε)), or None (SGD).
        hist: (C, D, n) the stored history: slot 0 g_t; the base-moment slot m_t − m_{t+1}; GC-W's own EMA
            slots m_k; the last slot w_t − w_{t+1}. With the new step's m_{t+1} and w_{t+1} it gives
            every direction of step t exactly.
        e: (C, n) the EMA of applied corrections (the cumulative bound), or None.
    """

    grad: Tensor
    weight: Tensor
    moment: Tensor | None
    base_moment: bool
    precond: Tensor | None
    hist: Tensor
    e: Tensor | None


@dataclass
class GCWState:
    """The small state of all sites, stacked: ``site`` (S, L) and ``rows`` (S, R, K) float32 (see `Layout`).

    ``counts`` are the rows of each site (R is the largest) and ``mask`` (S, R) marks the real rows.
    """

    site: Tensor
    rows: Tensor
    counts: tuple[int, ...]
    mask: Tensor

    @classmethod
    def fresh(cls, layout: Layout, opts: "GCWOptions", counts, device=None) -> "GCWState":
        counts = tuple(int(c) for c in counts)
        R = max(counts)
        site = layout.init_site(opts, device).repeat(len(counts), 1)
        rows = torch.zeros(len(counts), R, layout.rows_size, device=device)
        mask = torch.arange(R, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
        return cls(site, rows, counts, mask)


def _pad(tensors: list[Tensor]) -> Tensor:
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)


CHUNK = 2**18  # numbers per (rows, D, n) block of the weight-sized work: it stays in the CPU's cache


def _row_chunks(s: SiteTensors, D: int) -> list[slice]:
    C, n = s.grad.shape
    step = max(1, CHUNK // (D * n))
    return [slice(i, min(i + step, C)) for i in range(0, C, step)]


def _own_slots(s: SiteTensors, opts: "GCWOptions") -> list[tuple[int, int]]:
    """(history slot, horizon) of the EMAs GC-W keeps itself."""
    first = 2 if s.base_moment else 1
    return list(enumerate(opts.horizons[1:] if s.base_moment else opts.horizons, start=first))


def _directions(s: SiteTensors, r: slice, D: int) -> Tensor:
    """(rows, D, n) directions of the new step, g_{t+1}, its EMAs and w_{t+1}, for rows r."""
    h = s.grad[r]
    parts = [h]
    if s.base_moment:
        parts.append(torch.zeros_like(h) if s.moment is None else s.moment[r].to(h.dtype))
    first = 2 if s.base_moment else 1
    parts += list(s.hist[r, first : D - 1].to(h.dtype).unbind(1))
    parts.append(s.weight[r].to(h.dtype))
    return torch.stack(parts, dim=1)


def _site_pass(s: SiteTensors, opts: "GCWOptions"):
    """The weight-sized work of one site before its correction, block by block of rows: the stored history's
    products with the new gradient (the hypergradient of step t), GC-W's own EMAs, the new Gram matrix."""
    D = opts.n_dirs
    grams, dots, ph2, e_norms = [], [], [], []
    own = _own_slots(s, opts)
    for r in _row_chunks(s, D):
        h = s.grad[r]
        Ph = None if s.precond is None else h * s.precond[r]
        if own:  # m_{t+1} = lerp(m_t, g_{t+1}) after m_t's products are taken (below, from a copy); rows of a
            past = s.hist[r].to(h.dtype)  # non-finite g keep m_t
            fin = torch.isfinite(h).all(1, keepdim=True)
            for k, horizon in own:
                m = s.hist[r, k]
                m.lerp_(torch.where(fin, h, m).to(m.dtype), 1 / horizon)
        else:
            past = s.hist[r].to(h.dtype)
        V = _directions(s, r, D)  # (rows, D, n)
        W = V if Ph is None else torch.cat([V, Ph[:, None, :]], dim=1)  # P g_{t+1} as an extra row
        gram = torch.bmm(V, W.transpose(1, 2)).float()  # (rows, D, D[+1]): one small gemm per block
        d = torch.bmm(past, W.transpose(1, 2))[..., -1 if Ph is not None else 0].float()  # ⟨P g_{t+1}, slot⟩
        nxt = gram[..., -1 if Ph is not None else 0]  # ⟨P g_{t+1}, v_j,t+1⟩
        p2 = gram[:, 0, 0].sum() if Ph is None else torch.dot(Ph.reshape(-1), Ph.reshape(-1)).float()
        gram = gram[..., :D]
        # the directions of step t are those of step t+1 plus the stored step, for the slots that moved
        d[:, -1] += nxt[:, -1]
        if s.base_moment:
            d[:, 1] += nxt[:, 1]
        grams.append(gram)
        dots.append(d)
        ph2.append(p2)
        if s.e is not None:
            e_norms.append(
                torch.linalg.vector_norm(s.e[r], dim=1, dtype=torch.promote_types(s.e.dtype, torch.float32)).float()
            )
    gram = torch.cat(grams)
    ok = torch.isfinite(gram[:, 0, 0]).all()  # ‖g_row‖² is finite iff the row of g_{t+1} is
    return gram, torch.cat(dots), torch.stack(ph2).sum(), ok, torch.cat(e_norms) if e_norms else None


def _site_correct(s: SiteTensors, a: Tensor, valid: Tensor, opts: "GCWOptions", before) -> Tensor:
    """Ĝ = G + Σ_j a_j V_j for one site, block by block, with the cumulative bound's EMA, g_t's slot and the
    snapshots of w and m that `record_step` needs, all while each block is in cache."""
    D = opts.n_dirs
    beta = 1 - 1 / opts.horizons[-1]
    a = a.to(s.grad.dtype)
    one = torch.zeros_like(a)
    one[:, 0] = 1
    ghat = torch.empty_like(s.grad)
    w_then, m_then = before
    for r in _row_chunks(s, D):
        V = _directions(s, r, D)
        torch.bmm((a[r] + one[r])[:, None, :], V, out=ghat[r][:, None, :])  # 1·g + ΔG; exactly g where a = 0
        if s.e is not None:
            dG = torch.where(valid, torch.bmm(a[r][:, None, :], V)[:, 0], 0)
            s.e[r] = s.e[r].float().mul_(beta).add_(dG, alpha=1 - beta).to(s.e.dtype)
        s.hist[r, 0] = s.grad[r].to(s.hist.dtype)  # g_t for the next step (slot 0 was read in pass 1)
        w_then[r] = V[:, -1]
        if m_then is not None:
            m_then[r] = V[:, 1]
    return ghat


def gcw_step(
    layout: Layout,
    opts: "GCWOptions",
    sites: list[SiteTensors | None],
    state: GCWState,
    *,
    step: int,
    lr_ratio: float | Tensor,
    scale: Tensor,
    debias: Tensor,
    train: bool,
) -> tuple[list[Tensor | None], Tensor]:
    """One GC-W step for all sites: train each corrector on its last proposal, then propose the next one.

    Args:
        layout: the `Layout` of ``opts``.
        opts: the options.
        sites: per site its `SiteTensors`, or None for a site without a gradient this step (left untouched).
        state: the stacked small state, updated in place (``hist`` and ``e`` of each site too).
        step: the step count t (0 at the first step).
        lr_ratio: the base lr over its initial lr, a float or (S,) per site.
        scale: (S, D) factors bringing each raw direction to the scale of a gradient EMA (SGD's momentum
            buffer times (1 - μ)/(1 - dampening); 1 elsewhere).
        debias: (S, D) the EMAs' de-biasing factors 1/(1 - β^k) (1 for g and w).
        train: train the correctors at this step (``update_every``).

    Returns:
        ``(corrected, ok, before)``: per site the corrected gradient Ĝ = G + ΔG as (C, n) (or None); (S,) bool,
        the gradient was finite; per site the weight and the base's moment as they are now, for `record_step`
        after the base optimizer's step.
    """
    S, R, _ = state.rows.shape
    D, L, K = layout.n_dirs, layout.site, layout.rows
    sv, rw, mask = state.site, state.rows, state.mask
    dev = sv.device
    active = [s is not None for s in sites]
    passes = []
    for s, C in zip(sites, state.counts, strict=True):
        if s is None:
            z = torch.zeros((), device=dev)
            passes.append(
                (z.new_zeros(C, D, D), z.new_zeros(C, D), z, torch.zeros((), dtype=torch.bool, device=dev), None)
            )
        else:
            passes.append(_site_pass(s, opts))
    gram = _pad([p[0] for p in passes])  # (S, R, D, D)
    dots = _pad([p[1] for p in passes])  # (S, R, D)
    ph_norm = torch.stack([p[2] for p in passes]).clamp_min(0).sqrt()  # (S,)
    ok = torch.stack([p[3] for p in passes])  # (S,)
    e_norm = None
    if opts.cumulative_bound is not None:
        e_norm = _pad(
            [torch.zeros(C, device=dev) if p[4] is None else p[4] for p, C in zip(passes, state.counts, strict=True)]
        )
    act = None if all(active) else torch.tensor(active).to(dev, non_blocking=True)
    if isinstance(lr_ratio, Tensor):
        lr_ratio = lr_ratio.reshape(S, 1, 1)

    # --- learn: the hypergradient of step t's proposal, from what was stored with it
    feats_t, cos_t = rw[..., K["feats"]], rw[..., K["cos"]].unflatten(-1, (D, D))
    norms_t, c_t, f_t, rawn_t = (
        rw[..., K["norms"]],
        rw[..., K["c"]],
        rw[..., K["f"]][..., 0],
        rw[..., K["raw_norm"]][..., 0],
    )
    pending, valid_t = sv[:, L["pending"]][:, 0] > 0, sv[:, L["valid"]][:, 0] > 0
    inv_t = torch.where(norms_t > 0, 1 / norms_t.clamp_min(_TINY), 0)
    B = dots * inv_t * norms_t[..., :1]  # (S, R, D): ‖g_t‖ ⟨P g_{t+1}, v̂_j,t⟩
    pair_ok = ok & pending & valid_t & torch.isfinite(B).all(-1).all(-1) & torch.isfinite(ph_norm)
    B = torch.where(pair_ok[:, None, None], B, 0)
    row_dot = (c_t * B).sum(-1)  # (S, R) ⟨P g_{t+1}, ΔG_t proposed⟩ per row
    proposed = row_dot.sum(-1)
    raw_norm_t = torch.linalg.vector_norm(rawn_t, dim=-1)
    r = proposed / (torch.where(pair_ok, ph_norm, 0) * raw_norm_t).clamp_min(_TINY)
    trust = update_trust(sv[:, L["trust_stats"]], r, pair_ok & (raw_norm_t > 0), beta=1 - 1 / opts.trust_horizon)
    next_grad_dot = (f_t * row_dot).sum(-1)
    psi = sv[:, L["psi"]]
    corrector_loss = sv[:, L["corrector_loss"]][:, 0]
    if train:
        Z = torch.where(pair_ok, ph_norm * torch.linalg.vector_norm(norms_t[..., 0], dim=-1), 1).clamp_min(_TINY)
        leaf = psi.detach().clone().requires_grad_()
        with torch.enable_grad():
            c = bounded_coefficients(corrector_forward(layout, leaf, feats_t, mask), cos_t, rho=opts.rho)
            loss = -(c * (B / Z[:, None, None])).sum((-2, -1))  # (S,) `hyper_loss` per site
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        total = torch.linalg.vector_norm(grad, dim=-1)
        step_ok = pair_ok & torch.isfinite(total)
        grad = torch.where(step_ok[:, None], grad * torch.clamp(opts.clip / (total + 1e-6), max=1.0)[:, None], 0)
        lr = opts.lr * (lr_ratio.reshape(S, 1) if isinstance(lr_ratio, Tensor) else lr_ratio)
        masked_adam_(
            [psi], [grad], [sv[:, L["exp_avg"]]], [sv[:, L["exp_avg_sq"]]], sv[:, L["adam_step"]],
            lr=lr, betas=opts.betas, ok=step_ok[:, None],
        )  # fmt: skip
        corrector_loss = torch.where(step_ok, loss.detach(), 0)

    # --- propose: the correction for this step, damped by trust and the cumulative bound
    cos, norms = unit_gram(gram)
    feats = row_features(gram, debias=(scale * debias)[:, None, :], step=step, lr_ratio=lr_ratio, mask=mask)
    c = bounded_coefficients(corrector_forward(layout, psi, feats, mask), cos, rho=opts.rho) * mask[..., None]
    raw_norm = norms[..., 0] * row_quadratic(c, cos).sqrt()  # (S, R) ‖ΔG_row‖
    tau = trust_factor(trust, z=opts.trust_z, warmup=opts.trust_warmup) if opts.trust else torch.ones(S, device=dev)
    f = tau[:, None] * mask  # (S, R) applied fraction per row
    lam = mask.float()
    if opts.cumulative_bound is not None:
        beta = 1 - 1 / opts.horizons[-1]
        m_norm = norms[..., D - 2] * scale[:, None, D - 2]
        lam = cumulative_scale(f * raw_norm, e_norm, m_norm, beta=beta, bound=opts.cumulative_bound) * mask
        f = f * lam
    a = direction_weights(c * f[..., None], norms)  # (S, R, D)
    valid = ok & torch.isfinite(a).all(-1).all(-1) & torch.isfinite(gram).flatten(1).all(-1)
    a = torch.where(valid[:, None, None], a, 0)
    count = mask.sum(-1).float()
    applied = torch.linalg.vector_norm(f * raw_norm, dim=-1)
    g_norm = torch.linalg.vector_norm(norms[..., 0], dim=-1)
    new_site = {
        "trust_stats": trust,
        "valid": valid,
        "pending": torch.ones(S, device=dev),
        "ratio": torch.where(valid, applied / g_norm.clamp_min(_TINY), 0),
        "next_grad_dot": next_grad_dot,
        "proposal_dot": proposed,
        "cosine": r,
        "trust": tau,
        "bound_scale": torch.where(valid, lam.sum(-1) / count, 0),
        "corrector_loss": corrector_loss,
        "coef": torch.where(valid[:, None], (c * f[..., None]).sum(-2) / count[:, None], 0),
    }
    new_rows = torch.cat([feats, cos.flatten(-2), norms, c, f[..., None], raw_norm[..., None]], dim=-1)
    new_rows = torch.where(valid[:, None, None], new_rows, 0)  # an invalid proposal is never learnt from
    rw.copy_(new_rows if act is None else torch.where(act[:, None, None], new_rows, rw))
    for name, v in new_site.items():
        v = v.reshape(S, -1).float()
        dst = sv[:, L[name]]
        dst.copy_(v if act is None else torch.where(act[:, None], v, dst))

    # --- the corrections themselves: a batched matmul per block of rows
    out, before = [], []
    for i, (s, C) in enumerate(zip(sites, state.counts, strict=True)):
        if s is None:
            out.append(None)
            before.append(None)
            continue
        b = (torch.empty_like(s.grad), None if s.moment is None or not s.base_moment else torch.empty_like(s.grad))
        out.append(_site_correct(s, a[i, :C], valid[i], opts, b))
        before.append(b)
    return out, ok, before


def record_step(
    sites: list[SiteTensors | None],
    before: list[tuple[Tensor, Tensor | None] | None],
    after: list[tuple[Tensor, Tensor | None] | None],
) -> None:
    """After the base optimizer's step: stores the steps of the directions that moved, w_t − w_{t+1} and
    m_t − m_{t+1}, in each site's history (g_t was stored by `gcw_step`).

    A non-finite gradient is stored like any other: the next step's products with it are not finite, so that
    pair is not learnt from, and the slot is overwritten at the next step.

    Args:
        sites: as given to `gcw_step`.
        before: from `gcw_step`: per site (weight, base moment) before the base step (moment None: none yet).
        after: per site (weight, base moment) now.
    """
    for s, b, a in zip(sites, before, after, strict=True):
        if s is None:
            continue
        for r in _row_chunks(s, s.hist.shape[1]):
            s.hist[r, -1] = b[0][r] - a[0][r]
            if s.base_moment and a[1] is not None:
                s.hist[r, 1] = -a[1][r] if b[1] is None else b[1][r] - a[1][r]
