"""gcsurgery: gradient correction (GC-W + GC-ODE) for any timm or torchvision CNN, by torch.fx surgery."""

__version__ = "0.1.0"

from .checkpoint import checkpoint, restore  # noqa: E402
from .errors import GCSurgeryError  # noqa: E402
from .gcode import GCODE, ODEOptions  # noqa: E402
from .gcw import GCWOptions  # noqa: E402
from .models import cifar_resnet  # noqa: E402
from .optim import GCOptimizer  # noqa: E402
from .plans import GCWSite, Plan, State, plan  # noqa: E402
from .rewrite import gcify, is_gcified, strip  # noqa: E402

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
    "__version__",
]
