"""`diagnose`: per-sample gradient statistics of a model along its plan's hidden states and stages."""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GCSurgeryError
from ..plans import Plan
from ..plans import plan as make_plan
from ..rewrite import is_gcified
from ..wrappers import unwrap
from .probes import probed
from .report import BranchShare, DiagnosticReport, GroupGradient, StateGradient
from .stats import GradientMoments, per_sample_gradients

__all__ = ["diagnose", "METHODS"]

METHODS = ("auto", "vmap", "loop")


@contextlib.contextmanager
def preserved(model: nn.Module):
    """Restores every submodule's train/eval flag and the global RNG (CPU, and the model's CUDA device)."""
    modes = {m: m.training for m in model.modules()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        model.train(modes[model])  # a gcified model with two graphs selects its graph here
        for m, mode in modes.items():
            m.training = mode


def _samples(batches, max_samples: int) -> tuple[Tensor, Tensor]:
    if isinstance(batches, tuple | list) and len(batches) == 2 and all(isinstance(t, Tensor) for t in batches):
        batches = [batches]
    xs, ys, n = [], [], 0
    try:
        iterator = iter(batches)
    except TypeError:
        raise GCSurgeryError(
            f"batches must be an (x, y) pair or an iterable of them (a DataLoader), got {type(batches).__name__}."
        ) from None
    for batch in iterator:
        if not (isinstance(batch, tuple | list) and len(batch) >= 2 and isinstance(batch[0], Tensor)):
            raise GCSurgeryError(
                f"each batch must be (inputs, targets) tensors, got {type(batch).__name__}; "
                "pass a DataLoader over (x, y) or a list of (x, y) pairs."
            )
        x, y = batch[0], batch[1]
        if x.shape[0] != y.shape[0]:
            raise GCSurgeryError(f"a batch has {x.shape[0]} inputs but {y.shape[0]} targets; pass matching pairs.")
        xs.append(x[: max_samples - n])
        ys.append(y[: max_samples - n])
        n += xs[-1].shape[0]
        if n >= max_samples:
            break
    if n == 0:
        raise GCSurgeryError("batches yielded no samples; pass at least one (x, y) batch.")
    return torch.cat(xs), torch.cat(ys)


def _check(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise GCSurgeryError(f"{name} must be an int >= {low}, got {value!r}.")


def diagnose(
    model: nn.Module,
    batches,
    *,
    loss_fn=F.cross_entropy,
    plan: Plan | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    max_samples: int = 256,
    chunk_size: int = 32,
    method: str = "auto",
) -> DiagnosticReport:
    """Measures the gradient flow of `model` along its plan: per hidden state and per stage's weights.

    Per-sample gradients are taken in eval mode (BatchNorm uses its running statistics, so samples do not
    interact), `chunk_size` samples at a time. The model's parameters, gradients, buffers, train/eval modes and
    the global RNG are left as they were. `docs/diagnostics.md` defines every quantity.

    Args:
        model: a plain model (planned here from the first batch unless `plan` is given) or a gcified one.
        batches: an (x, y) pair, or an iterable of them (e.g. a DataLoader); at most `max_samples` are used.
        loss_fn: ``loss_fn(output, target)`` on a batch of one, returning a scalar.
        plan: the plan of a plain model; None plans it (or, for a gcified model, uses its ``gc_plan``).
        optimizer: a `GCOptimizer`, whose ``gc_stats()`` (‖ΔG‖/‖G‖, ⟨g_{t+1}, ΔG_t⟩, ...) join the report.
        max_samples: how many samples to take from `batches`.
        chunk_size: samples per vmap call (memory grows with it and with the number of weights).
        method: "vmap" (torch.func), "loop" (one autograd call per sample), or "auto" (vmap, else loop).

    Returns:
        A `DiagnosticReport` (``print`` it for tables; ``to_dict()`` for plain data).
    """
    if not isinstance(model, nn.Module):
        raise GCSurgeryError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if method not in METHODS:
        raise GCSurgeryError(f"method must be one of {list(METHODS)}, got {method!r}.")
    _check("max_samples", max_samples, 1)
    _check("chunk_size", chunk_size, 1)
    if not callable(loss_fn):
        raise GCSurgeryError(f"loss_fn must be callable as loss_fn(output, target), got {loss_fn!r}.")
    net = unwrap(model)
    x, y = _samples(batches, max_samples)
    param = next(iter(net.parameters()), None)
    if param is not None:
        x, y = x.to(param.device), y.to(param.device)
        if x.is_floating_point():
            x = x.to(param.dtype)
    notes = []
    with preserved(net):
        if plan is None and not is_gcified(net):
            plan = make_plan(net, example_inputs=x[:2])
        pr = probed(net, plan)
        net.eval()
        pr.module.eval()
        groups = dict(pr.groups)
        groups.update({f"gcw:{s.param}": [s.param] for s in pr.plan.gcw_sites})
        params = list(dict.fromkeys(p for names in groups.values() for p in names))
        probes = pr.shapes(x)
        moments = {k: GradientMoments(sum(net.get_parameter(p).numel() for p in v)) for k, v in groups.items()}
        state_norms = {k: [] for k in pr.states}
        split = {k: ([], [], []) for k in pr.branches}  # branch norms, main norms, cosines
        use = "vmap" if method == "auto" else method
        for start in range(0, x.shape[0], chunk_size):
            xc, yc = x[start : start + chunk_size], y[start : start + chunk_size]
            try:
                grads = per_sample_gradients(
                    pr.module, xc, yc, loss_fn=loss_fn, params=params, probes=probes, method=use
                )
            except (RuntimeError, NotImplementedError) as e:
                if method != "auto" or use == "loop":
                    raise
                notes.append(f"torch.func could not transform the model ({str(e).splitlines()[0][:120]}); looped")
                use = "loop"
                grads = per_sample_gradients(
                    pr.module, xc, yc, loss_fn=loss_fn, params=params, probes=probes, method=use
                )
            for k, names in groups.items():
                moments[k].add(torch.cat([grads[p].flatten(1) for p in names], 1))  # (B, numel)
            for k in pr.states:
                state_norms[k].append(torch.linalg.vector_norm(grads[k].flatten(1), dim=1).double())
            for k, (a, _, _, _) in pr.branches.items():
                gb = grads[k].flatten(1).double()
                gm = grads[f"gc_probe_h{a}"].flatten(1).double() - gb
                nb, nm = torch.linalg.vector_norm(gb, dim=1), torch.linalg.vector_norm(gm, dim=1)
                both = (nb > 0) & (nm > 0)
                split[k][0].append(nb)
                split[k][1].append(nm)
                split[k][2].append((gb * gm).sum(1)[both] / (nb * nm)[both])
    states = []
    for i, (k, s) in enumerate(zip(pr.states, pr.plan.states, strict=True)):
        norms = torch.cat(state_norms[k])
        std = float(norms.std()) if norms.numel() > 1 else 0.0
        states.append(StateGradient(i, s.node, math.prod(probes[k]), float(norms.mean()), std))
    out_groups = []
    for k, names in groups.items():
        m = moments[k].summary()
        out_groups.append(
            GroupGradient(
                k, tuple(names), moments[k].numel, m["coherence"], m["gsnr"], m["zero_variance"],
                m["grad_norm"], m["mean_grad_norm"],
            )
        )  # fmt: skip
    branches = []
    for k, (a, b, target, _) in pr.branches.items():
        nb, nm, cos = (torch.cat(v) for v in split[k])
        eb, em = float(nb.mean()), float(nm.mean())
        share = eb / (eb + em) if eb + em > 0 else 0.0
        branches.append(BranchShare(target, a, b, eb, em, share, float(cos.mean()) if cos.numel() else 0.0))
    if branches and all(b.branch_norm == 0 for b in branches):
        notes.append("no gradient reaches the GC-ODE branches' inputs: their gates are still zero (as at insertion)")
    gcw = {}
    if optimizer is not None:
        stats = getattr(optimizer, "gc_stats", None)
        if not callable(stats):
            raise GCSurgeryError(f"optimizer= must be a gcsurgery.GCOptimizer (with gc_stats()), got {optimizer!r}.")
        gcw = stats()
    return DiagnosticReport(
        model=type(net).__name__,
        samples=int(x.shape[0]),
        method=use,
        states=tuple(states),
        groups=tuple(out_groups),
        branches=tuple(branches),
        gcw=gcw,
        notes=tuple(notes),
    )
