"""gcsurgery: gradient correction (GC-W + GC-ODE) for any timm or torchvision CNN, by torch.fx surgery."""

from .errors import GCSurgeryError
from .models import cifar_resnet
from .plans import GCWSite, Plan, State, plan

__version__ = "0.1.0"

__all__ = ["GCSurgeryError", "GCWSite", "Plan", "State", "cifar_resnet", "plan", "__version__"]
