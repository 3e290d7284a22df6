import pytest
import torch

from gcsurgery import GCSurgeryError, cifar_resnet


@pytest.mark.parametrize(("depth", "params"), [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_sizes_match_he_et_al(depth, params):
    model = cifar_resnet(depth)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.03  # the paper's Table 6 counts (option A: parameter-free shortcuts)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n+1 convolutions and the classifier


def test_cifar_resnet_shapes():
    model = cifar_resnet(20, num_classes=7, in_chans=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_cifar_resnet_bad_arguments():
    with pytest.raises(GCSurgeryError, match=r"one of \(20, 32, 44, 56, 110\), got 18"):
        cifar_resnet(18)
    with pytest.raises(GCSurgeryError, match="num_classes"):
        cifar_resnet(20, num_classes=0)
