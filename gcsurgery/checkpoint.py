"""Checkpoints of gcified models that restore into a freshly built plain model.

`checkpoint(gc_model, optimizer)` returns a dict for `torch.save`: the weights, the optimizer state, and
what is needed to rebuild the graph — the plan, the GC-ODE options and the library version. `restore(model,
ckpt)` gcifies a plain model of the same architecture with that plan and loads the weights, so training
continues bit for bit where it stopped.
"""

import dataclasses
import warnings

import torch
from torch import nn

from ._version import __version__
from .errors import GCSurgeryError
from .gcode import GCODE, ODEOptions
from .gcode_nd import GCODEND
from .plans import Plan
from .rewrite import GCGraphModule, gcify, is_gcified, plan_mismatch
from .wrappers import is_wrapped, wrapper_attr

__all__ = ["checkpoint", "restore"]

KEY = "gcsurgery"


def checkpoint(gc_model: nn.Module, optimizer=None, **extra) -> dict:
    """What to `torch.save` for a gcified model (and its optimizer).

    Args:
        gc_model: a module returned by `gcify`.
        optimizer: its optimizer (a `GCOptimizer` or any torch optimizer), saved with `state_dict()`.
        **extra: anything else to keep (epoch, scheduler state, ...), stored at the top level.
    """
    attr = wrapper_attr(gc_model)
    if attr is not None and is_gcified(getattr(gc_model, attr)):
        raise GCSurgeryError(
            f"checkpoint() got the gcified model wrapped in {type(gc_model).__name__}, whose state-dict keys carry a "
            f"'{attr}.' prefix that restore() cannot load; pass the module inside: checkpoint(model.{attr}, opt)."
        )
    if not is_gcified(gc_model):
        raise GCSurgeryError(
            f"checkpoint() needs a module returned by gcsurgery.gcify, got {type(gc_model).__name__}; "
            "for a plain model, torch.save(model.state_dict()) is all there is."
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GCSurgeryError(
            f"optimizer must be a torch.optim.Optimizer (e.g. the GCOptimizer) or None, got "
            f"{type(optimizer).__name__}; save other state (a scheduler, a scaler) as keyword arguments, e.g. "
            "checkpoint(m, opt, sched=s.state_dict())."
        )
    reserved = {KEY, "model", "optimizer"} & set(extra)
    if reserved:
        raise GCSurgeryError(f"checkpoint() keys {sorted(reserved)} are reserved; name the extra entries otherwise.")
    meta = {"version": gc_model.gc_version, "plan": gc_model.gc_plan.to_dict(), "ode": gc_model.gc_ode.to_dict()}
    return {
        KEY: meta,
        "model": gc_model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        **extra,
    }


def restore(model: nn.Module, ckpt: dict, *, inplace: bool = False) -> GCGraphModule:
    """Gcifies a freshly built plain `model` as recorded in `ckpt` and loads the checkpoint's weights.

    Args:
        model: a plain model of the same architecture as the one that was gcified.
        ckpt: a dict made by `checkpoint()` (e.g. `torch.load(path)`).
        inplace: passed to `gcify`.

    Returns:
        The gcified model with the saved weights. Load the optimizer with `opt.load_state_dict(ckpt["optimizer"])`
        after building it over this model.
    """

    if not isinstance(ckpt, dict) or KEY not in ckpt:
        raise GCSurgeryError(
            "not a gcsurgery checkpoint (no 'gcsurgery' entry); make one with gcsurgery.checkpoint(gc_model, opt)."
        )
    meta = ckpt[KEY]
    if not isinstance(meta, dict) or not {"plan", "ode"} <= set(meta) or "model" not in ckpt:
        raise GCSurgeryError(
            "malformed gcsurgery checkpoint: it needs ckpt['gcsurgery'] with 'plan' and 'ode', and ckpt['model']; "
            "write checkpoints with gcsurgery.checkpoint(gc_model, opt) and pass what torch.load returns."
        )
    plan = Plan.from_dict(meta["plan"])
    # gcify explains the others
    plain = isinstance(model, nn.Module) and not is_wrapped(model) and not is_gcified(model)
    why = plan_mismatch(model, plan) if plain else None
    if why:
        raise GCSurgeryError(
            f"this checkpoint was saved from a gcified {plan.model} [fingerprint {plan.fingerprint}], but the model "
            f"given is a {why}; pass a plain model built exactly as the one that was trained (same constructor and "
            "arguments), before gcify."
        )
    if plain and isinstance(ckpt["model"], dict):  # the head is not in the plan's fingerprint, but the weights fit it
        saved = ckpt["model"]
        for k, t in model.state_dict().items():
            if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(t.shape):
                raise GCSurgeryError(
                    f"this checkpoint's {k!r} is {tuple(saved[k].shape)}, but the {type(model).__name__} given has "
                    f"{tuple(t.shape)}; the plan fits it, the saved weights do not: pass a plain model built exactly "
                    "as the one that was trained (same constructor and arguments, e.g. num_classes), before gcify."
                )
    if meta.get("version") != __version__:
        warnings.warn(
            f"checkpoint written by gcsurgery {meta.get('version')}, restoring with {__version__}", stacklevel=2
        )
    gm = gcify(model, plan, ode=ODEOptions.from_dict(meta["ode"]), inplace=inplace)
    got = ckpt["model"]
    _match_saved_widths(gm, got)
    want = gm.state_dict()
    missing, unexpected = [k for k in want if k not in got], [k for k in got if k not in want]
    if missing or unexpected:
        raise GCSurgeryError(
            f"the checkpoint's weights do not fit the model rebuilt from its plan: {len(missing)} missing (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); its 'model' entry was replaced "
            "or edited. Save with gcsurgery.checkpoint(gc_model, opt), which stores the gcified model's state dict."
        )
    gm.load_state_dict(got)
    return gm


def _match_saved_widths(gm: nn.Module, saved: dict) -> None:
    """Rebuilds each GC-ODE branch whose ODE width differs from its saved weights' (a checkpoint written before the
    default width was capped at `gcode.MAX_WIDTH`, when it was r = Cb // 4), so that its weights load as saved."""
    for name, branch in [(n, m) for n, m in gm.named_modules() if isinstance(m, GCODE | GCODEND)]:
        w = saved.get(f"{name}.reduce.weight")
        if not hasattr(w, "shape") or w.shape[0] == branch.width:
            continue
        options = dataclasses.replace(branch.options, width=int(w.shape[0]))
        args = (branch.in_chs, branch.out_chs, branch.in_size, branch.out_size)
        if isinstance(branch, GCODEND):
            twin = GCODEND(*args, options=options)
        else:
            twin = GCODE(*args, in_layout=branch.in_layout, out_layout=branch.out_layout, options=options)
        parent, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(parent), attr, twin.to(branch.gate.device))
