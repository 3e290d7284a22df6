"""Models by name: CIFAR ResNets and their plain twins, timm, torchvision, or any ``module:factory``.

CIFAR ResNets (He et al. 2016, §4.2) are the paper's reference model, absent from timm and torchvision.
Depth 6n+2 (20, 32, 44, 56, 110): a 3×3 stem with 16 channels, then three stages of n basic blocks with
16, 32 and 64 channels at 32×32, 16×16 and 8×8. Shortcuts use **option A** of the original paper, the
one it used on CIFAR: identity, and where the shape changes, stride-2 subsampling with zero-padded
extra channels, so the shortcuts add no parameters (ResNet-20 has 0.27 M). The *plain* nets of the same
paper (§4.2, Fig. 6: plain-56 trains worse than plain-20) are the same layers without the shortcuts;
built under the same seed, a plain net and its ResNet start from the same weights.
"""

import importlib
import json

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GCSurgeryError
from .names import check_model_name, split_factory

__all__ = ["BasicBlock", "CifarPlainNet", "CifarResNet", "build_model", "cifar_plain", "cifar_resnet"]

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride` and zero-pad the channels up to `out_chs`."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers; with ``residual`` their output is added to the (option-A) shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, *, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        if residual:
            self.shortcut = PadShortcut(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x)) if self.residual else F.relu(out)


class CifarResNet(nn.Module):
    def __init__(
        self, depth: int = 20, *, num_classes: int = 10, in_chans: int = 3, widths=(16, 32, 64), residual: bool = True
    ):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        chs = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(chs, w, stride=2 if (i > 0 and j == 0) else 1, residual=residual))
                chs = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chs, num_classes)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):  # (B, in_chans, H, W)
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W): h0
        x = self.layer1(x)  # (B, 16, H, W)
        x = self.layer2(x)  # (B, 32, H/2, W/2)
        x = self.layer3(x)  # (B, 64, H/4, W/4)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarPlainNet(CifarResNet):
    """The CIFAR ResNet without its shortcuts: He et al.'s plain baseline (same layers, same initial weights)."""

    def __init__(self, depth: int = 20, *, num_classes: int = 10, in_chans: int = 3, widths=(16, 32, 64)):
        super().__init__(depth, num_classes=num_classes, in_chans=in_chans, widths=widths, residual=False)


def _check(family: str, depth, num_classes, in_chans) -> None:
    if depth not in CIFAR_DEPTHS:
        raise GCSurgeryError(f"{family} depth must be one of {CIFAR_DEPTHS}, got {depth!r}; pick one of those.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise GCSurgeryError(f"num_classes must be a positive int, got {num_classes!r}.")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise GCSurgeryError(f"in_chans must be a positive int, got {in_chans!r}.")


def cifar_resnet(depth: int = 20, *, num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    """Builds the CIFAR ResNet of depth 20, 32, 44, 56 or 110 (option-A shortcuts).

    Args:
        depth: 6n+2 layers; one of 20, 32, 44, 56, 110.
        num_classes: size of the classifier output.
        in_chans: input channels (1 for Fashion-MNIST).
    """
    _check("cifar_resnet", depth, num_classes, in_chans)
    return CifarResNet(depth, num_classes=num_classes, in_chans=in_chans)


def cifar_plain(depth: int = 20, *, num_classes: int = 10, in_chans: int = 3) -> CifarPlainNet:
    """Builds He et al.'s plain (shortcut-free) twin of `cifar_resnet` (same arguments, same layers)."""
    _check("cifar_plain", depth, num_classes, in_chans)
    return CifarPlainNet(depth, num_classes=num_classes, in_chans=in_chans)


CIFAR_FAMILIES = {"cifar_resnet": cifar_resnet, "cifar_plain": cifar_plain}


def build_model(
    name: str, *, num_classes: int | None = None, in_chans: int | None = None, kwargs: dict | str | None = None
) -> nn.Module:
    """Builds a classifier by name, randomly initialised from the global RNG, never downloading weights.

    Args:
        name: ``"cifar_resnet<depth>"``, ``"cifar_plain<depth>"``, ``"timm:<name>"``, ``"torchvision:<name>"``
            or ``"package.module:factory"`` (any importable callable that returns an ``nn.Module``).
        num_classes: classifier outputs; None keeps the model's default.
        in_chans: input channels; None keeps the model's default (3; torchvision models take 3 only).
        kwargs: more keyword arguments for the model's factory, a dict or its JSON text.
    """
    check_model_name(name)
    kw = _kwargs(kwargs)
    kw.update({} if num_classes is None else {"num_classes": num_classes})
    kw.update({} if in_chans is None else {"in_chans": in_chans})
    family, _, arch = name.partition(":")
    for prefix, factory in CIFAR_FAMILIES.items():
        if name.startswith(prefix) and name.removeprefix(prefix).isdigit():
            return _call(factory, name, int(name.removeprefix(prefix)), **kw)
    if family == "timm":
        import timm

        return _call(timm.create_model, name, arch, pretrained=False, **kw)
    if family == "torchvision":
        import torchvision

        if kw.pop("in_chans", 3) != 3:
            raise GCSurgeryError(f"torchvision models take 3 input channels, the data has {in_chans}; use timm:{arch}")
        return _call(torchvision.models.get_model, name, arch, weights=None, **kw)
    module, factory = split_factory(name)
    try:
        fn = getattr(importlib.import_module(module), factory)
    except (ImportError, AttributeError) as e:
        raise GCSurgeryError(
            f"cannot load the model factory {name!r} ({type(e).__name__}: {e}); write package.module:function, "
            "importable from this Python (check the spelling and PYTHONPATH)"
        ) from e
    model = _call(fn, name, **kw)
    if not isinstance(model, nn.Module):
        raise GCSurgeryError(f"{name}(**{kw}) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _kwargs(kwargs: dict | str | None) -> dict:
    if kwargs is None or isinstance(kwargs, dict):
        return dict(kwargs or {})
    try:
        out = json.loads(kwargs)
    except json.JSONDecodeError as e:
        raise GCSurgeryError(f"model kwargs must be a JSON object like '{{\"depth\": 3}}', got {kwargs!r} ({e})") from e
    if not isinstance(out, dict):
        raise GCSurgeryError(f"model kwargs must be a JSON object like '{{\"depth\": 3}}', got {kwargs!r}")
    return out


def _call(factory, name: str, *args, **kw) -> nn.Module:
    """``factory(*args, **kw)``, its argument errors turned into a GCSurgeryError that names the model."""
    try:
        return factory(*args, **kw)
    except TypeError as e:
        raise GCSurgeryError(
            f"building {name} with {kw} failed: {e}; pass only keyword arguments its factory takes (--kwargs, "
            "--num-classes, --in-chans)"
        ) from e
