import json
import subprocess
import sys

import pytest

from gcsurgery.cli import main
from gcsurgery.errors import GCSurgeryError
from gcsurgery.harness.models import build_model


def test_plan_prints_the_table(capsys):
    assert main(["plan", "cifar_resnet20", "--input", "1,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Plan for CifarResNet [") and "3 GC-ODE pairs, 3 GC-W sites" in out
    assert "GC-W layer3.2.conv2" in out


def test_plan_json_dot_png(capsys, tmp_path):
    dot, png = tmp_path / "p.dot", tmp_path / "p.png"
    assert (
        main(["plan", "torchvision:resnet18", "--input", "1,3,64,64", "--json", "--dot", str(dot), "--png", str(png)])
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert [s["module"] for s in plan["gcw_sites"]] == [f"layer{i}.1.conv2" for i in (1, 2, 3, 4)]
    assert dot.read_text().startswith("digraph plan")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_errors_are_one_line_and_exit_2(capsys):
    assert main(["plan", "timm:test_vit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gcsurgery: error: VisionTransformer has no spatial downsampling")
    assert main(["plan", "resnet18"]) == 2
    assert "timm:NAME, torchvision:NAME, cifar_resnetDEPTH, cifar_plainDEPTH or package.module:factory" in (
        capsys.readouterr().err
    )
    assert main(["plan", "cifar_resnet20", "--input", "1,3,a"]) == 2


def test_build_model_never_downloads():
    model = build_model("torchvision:resnet18", num_classes=3)
    assert model.fc.out_features == 3
    with pytest.raises(GCSurgeryError, match="torchvision has no classification model 'nope'"):
        build_model("torchvision:nope")
    with pytest.raises(GCSurgeryError, match="timm has no model 'nope'"):
        build_model("timm:nope")


def test_console_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "gcsurgery", "plan", "cifar_resnet20", "--input", "1,3,32,32"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "h3" in out


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
