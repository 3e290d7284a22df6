"""Checkpoints of gcified models that restore into a freshly built plain model.

`checkpoint(gc_model, optimizer)` returns a dict for `torch.save`: the weights, the optimizer state, and
what is needed to rebuild the graph — the plan, the GC-ODE options and the library version. `restore(model,
ckpt)` gcifies a plain model of the same architecture with that plan and loads the weights, so training
continues bit for bit where it stopped.
"""

import warnings

from torch import nn

from .errors import GCSurgeryError
from .gcode import ODEOptions
from .plans import Plan
from .rewrite import GCGraphModule, gcify, is_gcified

__all__ = ["checkpoint", "restore"]

KEY = "gcsurgery"


def checkpoint(gc_model: nn.Module, optimizer=None, **extra) -> dict:
    """What to `torch.save` for a gcified model (and its optimizer).

    Args:
        gc_model: a module returned by `gcify`.
        optimizer: its optimizer (a `GCOptimizer` or any torch optimizer), saved with `state_dict()`.
        **extra: anything else to keep (epoch, scheduler state, ...), stored at the top level.
    """
    if not is_gcified(gc_model):
        raise GCSurgeryError(
            f"checkpoint() needs a module returned by gcsurgery.gcify, got {type(gc_model).__name__}; "
            "for a plain model, torch.save(model.state_dict()) is all there is."
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
    from . import __version__

    if not isinstance(ckpt, dict) or KEY not in ckpt:
        raise GCSurgeryError(
            "not a gcsurgery checkpoint (no 'gcsurgery' entry); make one with gcsurgery.checkpoint(gc_model, opt)."
        )
    meta = ckpt[KEY]
    if meta.get("version") != __version__:
        warnings.warn(
            f"checkpoint written by gcsurgery {meta.get('version')}, restoring with {__version__}", stacklevel=2
        )
    gm = gcify(model, Plan.from_dict(meta["plan"]), ode=ODEOptions.from_dict(meta["ode"]), inplace=inplace)
    gm.load_state_dict(ckpt["model"])
    return gm
