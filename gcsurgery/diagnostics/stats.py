"""Pure statistics of gradients: per-sample gradients, coherence, GSNR, cosines.

Everything here works on plain tensors; `measure.py` and `recorder.py` feed it a model's gradients.
"""

import dataclasses

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["GradientMoments", "per_sample_gradients", "coherence", "gsnr", "cosine"]


def cosine(a: Tensor, b: Tensor) -> float:
    """cos(a, b) of two flat tensors; 0 when either is zero."""
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(torch.dot(a.flatten().double(), b.flatten().double()) / (na.double() * nb.double()))


def coherence(total: Tensor, sq_norms: Tensor | float, n: int) -> float:
    """α = ‖E g‖² / E‖g‖² from the sum of n per-sample gradients and the sum of their squared norms.

    1 when every sample's gradient is the same, 1/n when they are orthogonal with equal norms
    (Chatterjee & Zielinski 2020). 0 when every gradient is zero.
    """
    sq = float(sq_norms)
    if n < 1 or sq == 0:
        return 0.0
    return float(torch.linalg.vector_norm(total.double()) ** 2 / (n * sq))


def gsnr(total: Tensor, total_sq: Tensor, n: int) -> tuple[float, int]:
    """The gradient signal-to-noise ratio mean² / variance per parameter, averaged (Liu et al. 2020).

    Args:
        total: Σ_n g_n, per parameter.
        total_sq: Σ_n g_n², per parameter.
        n: number of samples.

    Returns:
        ``(mean GSNR over the parameters whose gradient varies, number of parameters left out because
        their variance is zero)``; the variance is the population variance over the n samples.
    """
    mean = total.double() / n
    var = (total_sq.double() / n - mean**2).clamp_min(0)
    varies = var > 1e-10 * mean**2  # rounding leaves ~1e-16 relative variance where the samples agree
    kept = int(varies.sum())
    if kept == 0:
        return 0.0, int(var.numel())
    return float((mean[varies] ** 2 / var[varies]).mean()), int(var.numel()) - kept


@dataclasses.dataclass
class GradientMoments:
    """Running sums of flat per-sample gradients of one parameter group: Σg, Σg², Σ‖g‖², Σ‖g‖."""

    numel: int
    n: int = 0
    total: Tensor | None = None
    total_sq: Tensor | None = None
    sq_norms: float = 0.0
    norms: float = 0.0

    def add(self, g: Tensor) -> None:
        """Adds a chunk of per-sample gradients, (B, numel)."""
        g = g.detach().double()
        if self.total is None:
            self.total = torch.zeros(self.numel, dtype=torch.float64, device=g.device)
            self.total_sq = torch.zeros_like(self.total)
        self.n += g.shape[0]
        self.total += g.sum(0)
        self.total_sq += (g * g).sum(0)
        row = (g * g).sum(1)
        self.sq_norms += float(row.sum())
        self.norms += float(row.sqrt().sum())

    def summary(self) -> dict:
        if self.n == 0:
            return {"samples": 0, "coherence": 0.0, "gsnr": 0.0, "zero_variance": self.numel}
        g, left_out = gsnr(self.total, self.total_sq, self.n)
        return {
            "samples": self.n,
            "coherence": coherence(self.total, self.sq_norms, self.n),
            "gsnr": g,
            "zero_variance": left_out,
            "grad_norm": self.norms / self.n,  # E‖g_n‖
            "mean_grad_norm": float(torch.linalg.vector_norm(self.total) / self.n),  # ‖E g_n‖
        }


def _vmap_grads(module, params, frozen, x, y, loss_fn, probes):
    def one(p, q, xi, yi):  # xi: one sample without its batch dimension
        kwargs = {k: v.unsqueeze(0) for k, v in q.items()}
        out = functional_call(module, (p, frozen), (xi.unsqueeze(0),), kwargs)
        return loss_fn(out, yi.unsqueeze(0))

    gp, gq = vmap(grad(one, argnums=(0, 1)), in_dims=(None, None, 0, 0))(params, probes, x, y)
    return {**gp, **gq}


def _loop_grads(module, params, frozen, x, y, loss_fn, probes):
    out = {k: [] for k in [*params, *probes]}
    for i in range(x.shape[0]):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        q = {k: v.unsqueeze(0).detach().clone().requires_grad_() for k, v in probes.items()}
        with torch.enable_grad():
            loss = loss_fn(functional_call(module, (p, frozen), (x[i : i + 1],), q), y[i : i + 1])
            leaves = [*p.values(), *q.values()]
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for k, v, leaf in zip([*p, *q], grads, leaves, strict=True):
            v = torch.zeros_like(leaf) if v is None else v
            out[k].append(v.squeeze(0) if k in q else v)
    return {k: torch.stack(v) for k, v in out.items()}


def per_sample_gradients(
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn,
    params: list[str],
    probes: dict[str, tuple[int, ...]] | None = None,
    method: str = "vmap",
) -> dict[str, Tensor]:
    """Per-sample gradients ∂ℓ(f(x_n), y_n)/∂θ of the named parameters (and of zero probe inputs).

    The module runs on one sample at a time (batch of one), with the parameters as they are; the
    module's own parameters and `.grad` are not touched. Run it in eval mode so that BatchNorm does not
    couple the samples.

    Args:
        module: the network.
        x: inputs (B, ...).
        y: targets (B, ...).
        loss_fn: ``loss_fn(output, target)`` for a batch of one, a scalar.
        params: names of the parameters to differentiate.
        probes: extra keyword inputs of ``module`` (name → shape without batch), passed as zeros; their
            gradients are the gradients of ℓ with respect to the tensors they are added to.
        method: "vmap" (`torch.func.vmap(grad(...))` over `functional_call`) or "loop" (one autograd call per
            sample: slower, works with `autograd.Function`s that lack `setup_context`).

    Returns:
        name → (B, *shape) tensor for each parameter and probe.
    """
    named = dict(module.named_parameters())
    sel = {k: named[k].detach() for k in params}
    frozen = {k: v.detach() for k, v in named.items() if k not in sel}
    frozen.update({k: v for k, v in module.named_buffers()})
    ref = next(iter(sel.values()), x)
    q = {k: torch.zeros(shape, device=ref.device, dtype=ref.dtype) for k, shape in (probes or {}).items()}
    fn = _vmap_grads if method == "vmap" else _loop_grads
    return fn(module, sel, frozen, x, y, loss_fn, q)
