"""Tiny CNNs shared by the tests (32x32 inputs, a few thousand parameters)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# The tests run tiny tensors: one intra-op thread is faster, and parallel workers share the cores.
torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """Stem at full resolution, then three stages of two residual blocks (strides 1, 2, 2)."""

    def __init__(self, in_chans=3, num_classes=10, widths=(8, 16, 32), dropout=0.0):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(Block(cin, w, 1 if i == 0 else 2), Block(w, w)))
            cin = w
        self.stages = nn.Sequential(*layers)
        self.dropout = dropout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(F.dropout(x, self.dropout, self.training))


class TinyVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class NHWCBlock(nn.Module):
    """ConvNeXt-like: depthwise conv in NCHW, then LayerNorm + MLP in NHWC, residual in NCHW."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):  # (B, C, H, W)
        y = self.dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.stages = nn.Sequential(
            nn.Sequential(NHWCBlock(8)),
            nn.Sequential(nn.Conv2d(8, 16, 2, 2), NHWCBlock(16)),
            nn.Sequential(nn.Conv2d(16, 32, 2, 2), NHWCBlock(32)),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class DataDependent(nn.Module):
    """A block whose forward branches on tensor values: torch.fx cannot trace it."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return F.relu(self.conv(x))
        return self.conv(x)


class WithUntraceable(TinyResNet):
    def __init__(self):
        super().__init__()
        self.stages[1][1] = nn.Sequential(DataDependent(16))


@pytest.fixture
def tiny_resnet():
    torch.manual_seed(0)
    return TinyResNet()


@pytest.fixture
def x32():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def outputs(model: nn.Module, x: torch.Tensor, *, training: bool):
    """Output and buffers after one forward in the given mode, on a copy, with a fixed RNG."""
    model = copy.deepcopy(model).train(training)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        y = model(x)
    return y, {k: b for k, b in model.named_buffers() if not k.startswith("gc.")}


def branch_site(node) -> tuple:
    """What a GC-ODE call node reads: (target, enclosing module) of its source and destination states."""
    return tuple(
        (str(a.target), list((a.meta.get("nn_module_stack") or {"": ("",)}).values())[-1][0]) for a in node.args
    )
