"""`gcsurgery sweep` and its parts: the coverage rows, the Markdown, the torchvision input sizes."""

import copy
import json

import pytest
import torch
from torch import nn

from gcsurgery.cli import main
from gcsurgery.harness.sweep import check_gradients, check_model


def test_sweep_on_selected_models(tmp_path, capsys):
    js, md = tmp_path / "s.json", tmp_path / "c.md"
    assert main(["sweep", "--models", "cifar_resnet20", "timm:test_vit", "--json", str(js), "--markdown", str(md)]) == 0
    rows = json.loads(js.read_text())["selected"]
    assert [r["status"] for r in rows] == ["ok", "no hierarchy"]
    assert rows[0]["pairs"] == 3
    assert "1/1 of those with a spatial hierarchy ok (100.0%)" in md.read_text()
    # --resume keeps the rows it has and runs nothing more here; the commands are recorded in order
    assert main(["sweep", "--models", "cifar_resnet20", "timm:test_vit", "--json", str(js), "--resume"]) == 0
    again = json.loads(js.read_text())
    assert again["selected"] == rows
    assert again["commands"] == [
        f"gcsurgery sweep --models cifar_resnet20 timm:test_vit --timeout 900 --json {js} --markdown {md}",
        f"gcsurgery sweep --models cifar_resnet20 timm:test_vit --timeout 900 --json {js} --resume",
    ]
    # --no-run: the models missing are marked, not run, and left out of the ratio
    models = ["cifar_resnet20", "timm:test_convnext"]
    assert main(["sweep", "--models", *models, "--json", str(js), "--resume", "--no-run"]) == 0
    assert [r["status"] for r in json.loads(js.read_text())["selected"]] == ["ok", "not run"]


def test_sweep_takes_torchvision_input_sizes_from_the_model_then_its_weights():
    from types import SimpleNamespace

    from gcsurgery.harness.sweep import _torchvision_example

    assert _torchvision_example("torchvision:inception_v3", None).shape == (1, 3, 299, 299)
    assert _torchvision_example("torchvision:vit_h_14", None).shape[-1] == 518  # the SWAG weights' size
    # built without weights, ViT-H/14 takes 224: the model's own image_size wins
    assert _torchvision_example("torchvision:vit_h_14", SimpleNamespace(image_size=224)).shape[-1] == 224
    assert _torchvision_example("timm:resnet18", None) is None


def test_check_model_compares_outputs_and_every_gradient():
    row = check_model("harness.factories:tiny_net")
    assert (row["status"], row["pairs"], row["gcw"]) == ("ok", 3, 3), row["detail"]


def test_a_gradient_that_differs_is_a_mismatch_naming_the_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    twin = copy.deepcopy(model)
    twin[2].weight.register_hook(lambda g: -g)  # same forward, the backward of one weight flipped
    check_gradients(model, model, torch.randn(2, 3, 32, 32), "eval")
    with pytest.raises(AssertionError, match=r"gradient of 2\.weight not exact in train mode"):
        check_gradients(model, twin, torch.randn(2, 3, 32, 32), "train")


class _EvalCache(nn.Module):
    """LeViT's attention biases: in eval mode a value made from a parameter is cached on the first forward and
    dropped by `train()`, so a forward without gradients leaves a detached value behind."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.cache = {}

    def train(self, mode=True):
        super().train(mode)
        self.cache = {}
        return self

    def forward(self, x):
        if self.training:
            return x * self.scale
        if "scale" not in self.cache:
            self.cache["scale"] = self.scale * 1.0
        return x * self.cache["scale"]


def test_gradients_are_compared_from_the_state_a_mode_switch_leaves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _EvalCache()).eval()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3)
    with torch.no_grad():  # the output check before check_gradients: the model caches a detached value
        model(x)
    check_gradients(model, twin, x, "eval")  # both from a fresh cache: 1.scale gets its gradient in each
    assert model[1].scale.grad is not None and torch.equal(model[1].scale.grad, twin[1].scale.grad)
