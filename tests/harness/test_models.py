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


@pytest.mark.parametrize("depth", [20, 56])
def test_plain_nets_are_the_resnets_without_shortcuts(depth):
    from gcsurgery.harness.models import CifarPlainNet, build_model, cifar_plain

    torch.manual_seed(0)
    res = cifar_resnet(depth)
    torch.manual_seed(0)
    plain = build_model(f"cifar_plain{depth}")
    assert isinstance(plain, CifarPlainNet)
    assert res.state_dict().keys() == plain.state_dict().keys()  # the same layers, the same initial weights
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in res.state_dict().items())
    assert not any("shortcut" in n for n, _ in plain.named_modules())
    x = torch.randn(2, 3, 32, 32)
    res.eval(), plain.eval()
    assert not torch.allclose(res(x), plain(x))  # the shortcuts are really gone
    block = plain.layer2[0]  # without a shortcut the block is just its two conv layers
    with torch.no_grad():
        y = block(x := torch.randn(1, 16, 8, 8))
        block.eval()
        expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
        assert torch.equal(block(x), expected) and y.shape == (1, 32, 4, 4)
    with pytest.raises(GCSurgeryError, match=r"cifar_plain depth must be one of"):
        cifar_plain(18)


def test_plain_nets_are_planned_like_the_resnets():
    import gcsurgery as gcs
    from gcsurgery.harness.models import cifar_plain

    p = gcs.plan(cifar_plain(20), torch.zeros(1, 3, 32, 32))
    assert (len(p.ode_pairs), len(p.gcw_sites)) == (3, 3)


def test_build_model_forms_and_errors():
    from gcsurgery.harness.models import build_model

    net = build_model("harness.factories:tiny_net", num_classes=4, kwargs='{"width": 4}')
    assert net[-1].out_features == 4 and net[0][0].out_channels == 4
    assert build_model("timm:resnet10t", in_chans=1, num_classes=3).conv1[0].in_channels == 1
    for name, says in [
        ("timm:resnet5O", r"timm has no model 'resnet5O'; did you mean resnet50"),
        ("torchvision:resnet1", r"torchvision has no classification model 'resnet1'; did you mean resnet18"),
        ("resnet18", r"unknown model 'resnet18'.*did you mean timm:resnet18 or torchvision:resnet18"),
        ("mymodel.py", r"A file is not a model: in Python, build the model and call gcs.plan\(model, example_inputs"),
        ("harness.factories:absent", r"cannot load the model factory 'harness.factories:absent' \(AttributeError"),
        ("harness.factories:not_a_model", r"returned a int, not a torch.nn.Module"),
    ]:
        with pytest.raises(GCSurgeryError, match=says):
            build_model(name)
    with pytest.raises(GCSurgeryError, match=r"building harness.factories:tiny_net with \{'depth': 3\} failed"):
        build_model("harness.factories:tiny_net", kwargs={"depth": 3})
    with pytest.raises(GCSurgeryError, match="must be a JSON object"):
        build_model("harness.factories:tiny_net", kwargs="[1]")


def test_the_model_name_cache_matches_the_installed_libraries():
    from gcsurgery.harness import names

    for library in ("timm", "torchvision"):
        assert names.known_models(library) == names._live(library), "run gcsurgery.harness.names.write_cache()"
