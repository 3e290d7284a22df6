"""GC-W: the corrector network and the pure update math of weight gradient correction.

For a site weight W with C output rows, every row is a token. Its history lives in one buffer
``V`` of shape (C, D, n): the current gradient g, its EMAs m_k at a few horizons, and W itself,
each row flattened to n numbers. From the per-row Gram matrix of V (norms and cosines, no
O(n) work beyond one batched matmul) the corrector predicts bounded coefficients c over the unit
directions (ĝ, m̂_k, ŵ) and the correction is ``ΔG_row = ‖g_row‖ · Σ_j c_j v̂_j``.

The functions here are pure (tensors in, tensors out) so the optimizer is a thin loop over them.
The trust and cumulative-bound helpers implement the "do no harm" damping described in
``docs/gcw.md``.
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
        horizons: EMA horizons of the gradient history in steps (beta = 1 - 1/h), increasing.
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
    """

    rho: float = 0.5
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0
    update_every: int = 1
    horizons: tuple[int, ...] = (10, 100)
    d_model: int = 16
    hidden: int = 32
    trust: bool = True
    trust_horizon: int = 100
    trust_z: float = 2.0
    trust_warmup: int = 20
    cumulative_bound: float | None = 0.25
    seed: int = 0

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
            bad("horizons", "1 to 4 increasing ints >= 2 (EMA horizons in steps), like (10, 100)")
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


def row_gram(V: Tensor) -> Tensor:
    """Per-row Gram matrix of the directions, in float32: (C, D, n) -> (C, D, D)."""
    return torch.bmm(V, V.transpose(1, 2)).float()


def unit_gram(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Cosines and norms from a Gram matrix; a zero direction has cosine 0 with everything.

    Returns:
        (cos (C, D, D), norms (C, D)).
    """
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # (C, D)
    inv = torch.where(norms > 0, 1 / norms.clamp_min(_TINY), 0)
    return gram * inv[:, :, None] * inv[:, None, :], norms


def row_features(gram: Tensor, *, debias: Tensor, step: float, lr_ratio: float | Tensor) -> Tensor:
    """Scale-free features of each row token: cosines, log-norm ratios, step and lr schedule.

    Args:
        gram: (C, D, D) per-row Gram matrix of (g, m_1..m_K, w).
        debias: (D,) factors that undo the EMAs' zero initialisation (1 for g and w).
        step: the step count.
        lr_ratio: the base optimizer's lr now over its initial lr.

    Returns:
        (C, F) finite features, F = D(D-1)/2 + (D-1) + 3.
    """
    C, D, _ = gram.shape
    cos, norms = unit_gram(gram)
    iu = torch.triu_indices(D, D, 1, device=gram.device)
    f_cos = cos[:, iu[0], iu[1]]  # (C, D(D-1)/2)
    logn = torch.log(norms * debias + _TINY)  # (C, D)
    f_rel = (logn[:, 1:] - logn[:, :1]) / 4  # log ‖v_j‖/‖g‖
    f_row = (logn[:, :1] - logn[:, :1].mean()) / 4  # the row's gradient scale within the layer
    f_t = gram.new_full((C, 1), math.log1p(step) / math.log(1e4))
    f_lr = gram.new_zeros((C, 1)) + lr_ratio
    x = torch.cat([f_cos, f_rel.clamp(-5, 5), f_row.clamp(-5, 5), f_t, f_lr], dim=1)
    return torch.nan_to_num(x, nan=0.0, posinf=5.0, neginf=-5.0)


def row_quadratic(c: Tensor, cos: Tensor) -> Tensor:
    """cᵀ·cos·c per row, i.e. ‖Σ_j c_j v̂_j‖²: (C, D), (C, D, D) -> (C,)."""
    return (torch.bmm(cos, c[:, :, None])[..., 0] * c).sum(1).clamp_min(0)


def bounded_coefficients(raw: Tensor, cos: Tensor, *, rho: float) -> Tensor:
    """Maps raw outputs to coefficients c with ``‖Σ_j c_j v̂_j‖ ≤ rho`` per row.

    Args:
        raw: (C, D) corrector outputs.
        cos: (C, D, D) cosines of the unit directions.
        rho: the per-row bound.

    Returns:
        (C, D) coefficients; zero where raw is zero.
    """
    c = rho * torch.tanh(raw)  # (C, D)
    q = row_quadratic(c, cos)  # ‖Σ c_j v̂_j‖²
    return c * torch.clamp(rho / torch.sqrt(q + 1e-12), max=1.0)[:, None]


def direction_weights(c: Tensor, norms: Tensor) -> Tensor:
    """Weights a on the raw directions so that ``Σ_j a_j V_j = ‖g‖ Σ_j c_j v̂_j``: (C, D), (C, D) -> (C, D)."""
    inv = torch.where(norms > 0, 1 / norms.clamp_min(_TINY), 0)
    return c * norms[:, :1] * inv


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
        stats: (4,) [Σw, Σw², Σw·r, Σw·r²] of the exponentially weighted observations.
        r: () the cosine ⟨P g_{t+1}, ΔG_t⟩ / (‖P g_{t+1}‖ ‖ΔG_t‖).
        valid: () bool.
        beta: EMA decay.

    Returns:
        (4,) new statistics (the old ones when not valid).
    """
    r = torch.where(valid, r, 0).float()
    one = torch.ones_like(r)
    obs = torch.stack([one, one * (1 - beta), r, r * r]) * (1 - beta)
    decay = torch.stack([one, one * beta, one, one]) * beta
    return torch.where(valid, stats * decay + obs, stats)


def trust_factor(stats: Tensor, *, z: float, warmup: int) -> Tensor:
    """Trust in [0, 1]: 0 until the mean cosine is z standard errors above 0, 1 at 2z and warmed up.

    Args:
        stats: (4,) from `update_trust`.
        z: t-statistic where trust starts rising.
        warmup: effective observations needed for full trust.

    Returns:
        () trust factor.
    """
    w, w2, s1, s2 = stats.unbind()
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
        step_norm: (C,) ‖ΔG_row‖ of the proposed step.
        e_norm: (C,) ‖e_row‖ before the step.
        m_norm: (C,) ‖m_row‖ of the gradient EMA with the same β (after this step's gradient).
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
    """Adam step on the corrector that is an exact no-op where ``ok`` is False (no host sync).

    Grads must be finite. ``step`` is a () float tensor counting the steps taken.
    """
    okf = ok.float()
    b1, b2 = betas
    step.add_(okf)
    d1 = torch._foreach_sub(grads, exp_avg)
    torch._foreach_mul_(d1, okf * (1 - b1))
    torch._foreach_add_(exp_avg, d1)
    d2 = torch._foreach_mul(grads, grads)
    torch._foreach_sub_(d2, exp_avg_sq)
    torch._foreach_mul_(d2, okf * (1 - b2))
    torch._foreach_add_(exp_avg_sq, d2)
    s = step.clamp_min(1)
    bc1, bc2 = 1 - b1**s, 1 - b2**s
    denom = torch._foreach_div(exp_avg_sq, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    upd = torch._foreach_div(exp_avg, denom)
    torch._foreach_mul_(upd, -okf * lr / bc1)
    torch._foreach_add_(params, upd)
