"""gcsurgery: gradient correction (GC-W + GC-ODE) for any timm or torchvision CNN, by torch.fx surgery.

The names below load on first use (PEP 562), so ``import gcsurgery`` and the ``gcsurgery`` command's
``--help`` do not wait for torch.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

from ._version import __version__

_EXPORTS = {
    "GCODE": ".gcode",
    "GCOptimizer": ".optim",
    "GCSurgeryError": ".errors",
    "GCWOptions": ".gcw",
    "GCWSite": ".plans",
    "GradientRecorder": ".diagnostics",
    "DiagnosticReport": ".diagnostics",
    "diagnose": ".diagnostics",
    "ODEOptions": ".gcode",
    "Plan": ".plans",
    "State": ".plans",
    "checkpoint": ".checkpoint",
    "cifar_resnet": ".harness.models",  # the paper's reference model, from the experiment harness
    "gcify": ".rewrite",
    "is_gcified": ".rewrite",
    "plan": ".stages",
    "restore": ".checkpoint",
    "strip": ".rewrite",
    "unwrap": ".wrappers",
}

__all__ = [
    "DiagnosticReport",
    "GCODE",
    "GCOptimizer",
    "GCSurgeryError",
    "GCWOptions",
    "GCWSite",
    "GradientRecorder",
    "ODEOptions",
    "Plan",
    "State",
    "checkpoint",
    "cifar_resnet",
    "diagnose",
    "gcify",
    "is_gcified",
    "plan",
    "restore",
    "strip",
    "unwrap",
    "__version__",
]

if TYPE_CHECKING:
    from .checkpoint import checkpoint, restore
    from .diagnostics import DiagnosticReport, GradientRecorder, diagnose
    from .errors import GCSurgeryError
    from .gcode import GCODE, ODEOptions
    from .gcw import GCWOptions
    from .harness.models import cifar_resnet
    from .optim import GCOptimizer
    from .plans import GCWSite, Plan, State
    from .rewrite import gcify, is_gcified, strip
    from .stages import plan
    from .wrappers import unwrap


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gcsurgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Keeps ``gcsurgery.checkpoint`` the function when the submodule of that name is imported."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
