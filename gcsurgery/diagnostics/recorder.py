"""`GradientRecorder`: cheap step-to-step gradient diagnostics during training, every k steps.

The training loop calls ``after_backward(step)`` once the gradients are there (before the optimizer step)
and ``after_step(step)`` after it. At each step t with t % every == 0 the recorder keeps a copy of each
group's gradient g_t and weights W_t; at t + 1 it measures cos(g_t, g_{t+1}) and, with a `GCOptimizer`,
cos(ΔG_t, g_{t+1}); at t + every it measures cos(−g_t, W_{t+every} − W_t). Between those steps it does nothing.
"""

import math

import torch
from torch import Tensor, nn

from ..errors import GCSurgeryError
from ..plans import Plan
from ..rewrite import is_gcified
from ..wrappers import unwrap
from .measure import preserved
from .probes import stage_groups
from .stats import cosine

__all__ = ["GradientRecorder"]


class GradientRecorder:
    """Records, every `every` steps, the step-to-step coherence of each stage's and GC-W site's gradient.

    Args:
        model: the model being trained (gcified, or plain with `plan`).
        plan: the plan of a plain model (its stages and GC-W sites name the groups); None for a gcified one.
        every: record at steps 0, every, 2·every, ...
        optimizer: the training's optimizer; a `GCOptimizer`'s ``gc_stats()`` give each GC-W site's
            ‖ΔG_t‖/‖G_t‖ and ⟨g_{t+1}, ΔG_t⟩, from which the recorder forms cos(ΔG_t, g_{t+1}).

    Attributes:
        records: one dict per recorded step t, filled in over steps t .. t + every; see `docs/diagnostics.md`.
    """

    def __init__(self, model: nn.Module, plan: Plan | None = None, *, every: int = 10, optimizer=None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise GCSurgeryError(f"every must be an int >= 1 (record every that many steps), got {every!r}.")
        net = unwrap(model)
        if plan is None and not is_gcified(net):
            raise GCSurgeryError(
                f"{type(net).__name__} is not gcified and no plan was given; pass "
                "plan=gcsurgery.plan(model, example_inputs=...)."
            )
        with preserved(net):
            groups, plan = stage_groups(net, plan)
        groups.update({f"gcw:{s.param}": [s.param] for s in plan.gcw_sites})
        named = dict(net.named_parameters())
        self.groups = {k: [named[p] for p in v] for k, v in groups.items()}
        self.plan, self.every, self.optimizer = plan, every, optimizer
        self._stats = getattr(optimizer, "gc_stats", None)
        base = getattr(optimizer, "base", None)
        self._preconditioned = base is not None and not isinstance(base, torch.optim.SGD)
        self.records: list[dict] = []
        self._emitted = 0  # records handed out by pop_complete
        self._open: dict[int, dict] = {}  # step t → its record, while it is being filled
        self._kept: dict[int, tuple[dict, dict]] = {}  # step t → (g_t, W_t) per group

    def _flat(self, k: str, *, weights: bool = False) -> Tensor:
        ps = self.groups[k]
        if weights:
            return torch.cat([p.detach().flatten() for p in ps])
        return torch.cat([(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).flatten() for p in ps])

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Call after ``loss.backward()`` (gradients unscaled), before ``optimizer.step()``."""
        prev = self._open.get(step - 1)
        if prev is not None and step - 1 in self._kept:
            g_prev, _ = self._kept[step - 1]
            for k in self.groups:
                g = self._flat(k)
                prev["groups"][k]["cos_next"] = cosine(g_prev[k], g)
                prev["groups"][k]["next_grad_norm"] = float(torch.linalg.vector_norm(g))
        start = step - self.every
        if start in self._kept:
            g0, w0 = self._kept.pop(start)
            for k in self.groups:
                self._open[start]["groups"][k]["cos_step"] = cosine(-g0[k], self._flat(k, weights=True) - w0[k])
        for t in [t for t in self._open if t < step - max(self.every, 1)]:
            del self._open[t]  # complete: its t + 1 and t + every steps have passed
        if step % self.every == 0:
            grads = {k: self._flat(k).clone() for k in self.groups}
            weights = {k: self._flat(k, weights=True).clone() for k in self.groups}
            self._kept[step] = (grads, weights)
            rec = {
                "step": step,
                "groups": {k: {"grad_norm": float(torch.linalg.vector_norm(g))} for k, g in grads.items()},
            }
            self._open[step] = rec
            self.records.append(rec)

    def after_step(self, step: int) -> None:
        """Call after ``optimizer.step()``: reads the GCOptimizer's statistics of this step."""
        if self._stats is None:
            return
        now = self._open.get(step)
        prev = self._open.get(step - 1)
        if now is None and prev is None:
            return
        stats = self._stats()
        if now is not None:
            now["gcw"] = {name: {"ratio": d.get("ratio", float("nan"))} for name, d in stats.items()}
        if prev is not None and "gcw" in prev:
            for name, d in stats.items():
                site = prev["gcw"].setdefault(name, {})
                site["next_grad_dot"] = d.get("next_grad_dot", float("nan"))
                site["proposal_cosine"] = d.get("cosine", float("nan"))
                group = prev["groups"].get(f"gcw:{name}", {})
                norm_dg = site.get("ratio", float("nan")) * group.get("grad_norm", float("nan"))
                denom = norm_dg * group.get("next_grad_norm", float("nan"))
                # undefined (nan) at steps where GC-W applied no correction (ΔG_t = 0)
                site["cos_dG_next"] = site["next_grad_dot"] / denom if denom > 0 else float("nan")
                site["preconditioned"] = self._preconditioned

    def pop_complete(self) -> list[dict]:
        """The records completed since the last call (their steps t + 1 and t + every have passed), oldest first:
        what a training loop writes to metrics.jsonl (with `flat`)."""
        done = self._emitted
        while done < len(self.records) and self.records[done]["step"] not in self._open:
            done += 1
        out, self._emitted = self.records[self._emitted : done], done
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """Per group (and GC-W site), the mean of each recorded quantity over the records where it is defined."""
        sums: dict[str, dict[str, list[float]]] = {}
        for rec in self.records:
            for section in ("groups", "gcw"):
                for k, d in rec.get(section, {}).items():
                    key = k if section == "groups" else f"gcw-opt:{k}"
                    for q, v in d.items():
                        if isinstance(v, float) and not math.isnan(v):
                            sums.setdefault(key, {}).setdefault(q, []).append(v)
        return {k: {q: sum(v) / len(v) for q, v in d.items()} for k, d in sums.items()}

    def flat(self, record: dict) -> dict[str, float]:
        """One record as flat ``"diag/<group>/<quantity>"`` keys, for a metrics.jsonl line."""
        out = {"diag/step": record["step"]}
        for section in ("groups", "gcw"):
            for k, d in record.get(section, {}).items():
                for q, v in d.items():
                    if isinstance(v, float):
                        out[f"diag/{k}/{q}"] = v
        return out
