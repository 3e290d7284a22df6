"""One answer to "which module is inside this wrapper?" (DDP, DataParallel, torch.compile)."""

from torch import nn

__all__ = ["is_wrapped", "unwrap", "wrapper_attr"]


def wrapper_attr(model: nn.Module) -> str | None:
    """The attribute holding the wrapped module ('module' for DDP/DataParallel, '_orig_mod' for compile), or None."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return "module"
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return "_orig_mod"
    return None


def is_wrapped(model: nn.Module) -> bool:
    """True for a DDP, DataParallel or torch.compile wrapper."""
    return wrapper_attr(model) is not None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside any nesting of DDP, DataParallel and torch.compile wrappers.

    Parameter names are relative to it: the wrappers prefix state-dict keys with 'module.' or '_orig_mod.'.
    """
    while (attr := wrapper_attr(model)) is not None:
        model = getattr(model, attr)
    return model
