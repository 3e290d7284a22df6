"""gcsurgery: gradient correction (GC-W + GC-ODE) for any timm or torchvision CNN, by torch.fx surgery."""

from ._version import __version__
from .checkpoint import checkpoint, restore
from .diagnostics import DiagnosticReport, GradientRecorder, diagnose
from .errors import GCSurgeryError
from .gcode import GCODE, ODEOptions
from .gcw import GCWOptions
from .models import cifar_resnet
from .optim import GCOptimizer
from .plans import GCWSite, Plan, State, plan
from .rewrite import gcify, is_gcified, strip
from .wrappers import unwrap

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
