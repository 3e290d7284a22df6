"""CIFAR ResNets (He et al. 2016, §4.2): the paper's reference model, absent from timm and torchvision.

Depth 6n+2 (20, 32, 44, 56, 110): a 3×3 stem with 16 channels, then three stages of n basic blocks with
16, 32 and 64 channels at 32×32, 16×16 and 8×8. Shortcuts use **option A** of the original paper, the
one it used on CIFAR: identity, and where the shape changes, stride-2 subsampling with zero-padded
extra channels, so the shortcuts add no parameters (ResNet-20 has 0.27 M).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GCSurgeryError

__all__ = ["cifar_resnet", "CifarResNet", "BasicBlock", "build_model"]

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
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = PadShortcut(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, *, num_classes: int = 10, in_chans: int = 3, widths=(16, 32, 64)):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        chs = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(chs, w, stride=2 if (i > 0 and j == 0) else 1))
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


def cifar_resnet(depth: int = 20, *, num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    """Builds the CIFAR ResNet of depth 20, 32, 44, 56 or 110 (option-A shortcuts).

    Args:
        depth: 6n+2 layers; one of 20, 32, 44, 56, 110.
        num_classes: size of the classifier output.
        in_chans: input channels (1 for Fashion-MNIST).
    """
    if depth not in CIFAR_DEPTHS:
        raise GCSurgeryError(f"cifar_resnet depth must be one of {CIFAR_DEPTHS}, got {depth!r}; pick one of those.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise GCSurgeryError(f"num_classes must be a positive int, got {num_classes!r}.")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise GCSurgeryError(f"in_chans must be a positive int, got {in_chans!r}.")
    return CifarResNet(depth, num_classes=num_classes, in_chans=in_chans)


def build_model(name: str, *, num_classes: int | None = None, in_chans: int = 3) -> nn.Module:
    """Builds a classifier by name, randomly initialised from the global RNG, never downloading weights.

    Args:
        name: ``"cifar_resnet<depth>"``, ``"torchvision:<name>"`` or ``"timm:<name>"``.
        num_classes: classifier outputs; None keeps the model's default.
        in_chans: input channels (torchvision models take 3 only).
    """
    kw = {} if num_classes is None else {"num_classes": num_classes}
    family, _, arch = name.partition(":")
    if name.startswith("cifar_resnet") and name.removeprefix("cifar_resnet").isdigit():
        return cifar_resnet(int(name.removeprefix("cifar_resnet")), in_chans=in_chans, **kw)
    if family == "timm" and arch:
        import timm

        try:
            return timm.create_model(arch, pretrained=False, in_chans=in_chans, **kw)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise GCSurgeryError(f"timm has no model {arch!r} ({e}); list them with timm.list_models().") from e
    if family == "torchvision" and arch:
        import torchvision

        if in_chans != 3:
            raise GCSurgeryError(f"torchvision models take 3 input channels, the data has {in_chans}; use timm:{arch}")
        try:
            return torchvision.models.get_model(arch, weights=None, **kw)
        except ValueError as e:
            valid = torchvision.models.list_models(module=torchvision.models)
            raise GCSurgeryError(f"torchvision has no classification model {arch!r}; valid: {valid}.") from e
    raise GCSurgeryError(
        f"unknown model {name!r}; use timm:NAME, torchvision:NAME or cifar_resnetDEPTH "
        "(e.g. timm:resnet50, torchvision:resnet18, cifar_resnet20)."
    )
