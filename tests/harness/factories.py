"""A model factory for `gcsurgery plan package.module:factory` tests (importable as ``harness.factories``)."""

from torch import nn


def tiny_net(*, width: int = 8, num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """Two stride-2 stages after a stem: three resolution levels."""

    def stage(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        stage(in_chans, width, 1),
        stage(width, width, 1),
        stage(width, 2 * width, 2),
        stage(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


def not_a_model():
    return 3
