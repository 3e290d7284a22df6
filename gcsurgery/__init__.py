"""gcsurgery: gradient correction (GC-W + GC-ODE) for any timm or torchvision CNN, by torch.fx surgery."""

from ._version import __version__
from .checkpoint import checkpoint, restore
from .errors import GCSurgeryError
from .gcode import GCODE, ODEOptions
from .gcw import GCWOptions
from .models import cifar_resnet
from .optim import GCOptimizer
from .plans import GCWSite, Plan, State
from .rewrite import gcify, is_gcified, strip
from .stages import plan
from .wrappers import unwrap

__all__ = [
    "GCODE",
    "GCOptimizer",
    "GCSurgeryError",
    "GCWOptions",
    "GCWSite",
    "ODEOptions",
    "Plan",
    "State",
    "checkpoint",
    "cifar_resnet",
    "gcify",
    "is_gcified",
    "plan",
    "restore",
    "strip",
    "unwrap",
    "__version__",
]
