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


def test_plan_takes_num_classes_in_chans_and_factory_kwargs(capsys):
    assert main(["plan", "timm:resnet10t", "--input", "1,1,32,32", "--num-classes", "10", "--json"]) == 0
    import gcsurgery as gcs

    plan = gcs.Plan.from_json(capsys.readouterr().out)
    assert plan.states[0].num_chs > 0
    assert main(["plan", "harness.factories:tiny_net", "--kwargs", '{"width": 4}', "--input", "1,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Plan for Sequential [") and "16x8x8 NCHW" in out  # width 4: 4 * width channels at /4
    assert main(["plan", "cifar_resnet20", "--input", "1,1,32,32"]) == 0  # in_chans follows the example input
    assert "Plan for CifarResNet" in capsys.readouterr().out
    assert main(["plan", "harness.factories:tiny_net", "--kwargs", "{nope"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_typos_and_unsupported_forms_get_suggestions(capsys):
    assert main(["plan", "timm:resnet5O"]) == 2
    assert "timm has no model 'resnet5O'; did you mean resnet50" in capsys.readouterr().err
    assert main(["plan", "torchvision:resnet5O"]) == 2
    assert "did you mean resnet50" in capsys.readouterr().err
    assert main(["plan", "mymodel.py"]) == 2
    err = capsys.readouterr().err
    assert "gcs.plan(model, example_inputs" in err and "package.module:factory" in err


@pytest.mark.parametrize("argv", [["--help"], ["plan", "timm:resnet5O"], ["plan"]])
def test_help_and_usage_errors_do_not_load_torch(argv):
    code = (
        "import sys\nfrom gcsurgery.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, sorted(sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_plan_written_by_the_cli_applies_to_the_model_built_in_python(capsys):
    import timm
    import torch

    import gcsurgery as gcs

    assert main(["plan", "timm:resnet10t", "--input", "1,1,32,32", "--num-classes", "10", "--json"]) == 0
    plan = gcs.Plan.from_json(capsys.readouterr().out)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    gm = gcs.gcify(model, plan)
    x = torch.randn(2, 1, 32, 32)
    model.eval(), gm.eval()
    assert torch.equal(gm(x), model(x))
