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


def test_diagnose_prints_the_table_and_writes_the_plots(capsys, tmp_path):
    argv = ["diagnose", "cifar_resnet20", "--arm", "gcw", "--steps", "2", "--samples", "4", "--calibration", "16"]
    argv += ["--batch", "8", "--every", "1", "--subset", "embedded", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "### cifar_resnet20, at insertion" in out and "### cifar_resnet20, after training" in out
    rows = [
        line.split(" | ")[0] for line in out.splitlines() if line.startswith("| baseline") or line.startswith("| gcw")
    ]
    assert rows.count("| baseline") == rows.count("| gcw") - 4 == 5  # 4 more: the paired table and the GC-W sites
    assert "| gcw | layer3.2.conv2.weight |" in out and "E‖∂ℓ/∂h3‖" in out
    for name in ("norm_profile.png", "coherence.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["arm"] for r in saved["results"]] == ["baseline", "gcw"] and saved["config"]["steps"] == 2
    assert len(saved["results"][1]["losses"]) == 2 and saved["results"][0]["insertion"]["samples"] == 4
    assert (tmp_path / "results.md").read_text().startswith("`gcsurgery diagnose cifar_resnet20 --arm gcw --steps 2")


def test_diagnose_refuses_bad_settings_before_training(capsys, tmp_path):
    assert main(["diagnose", "resnet20", "--out", str(tmp_path)]) == 2
    assert "cifar_resnetDEPTH" in capsys.readouterr().err
    assert main(["diagnose", "cifar_resnet20", "--arm", "lookahead", "--out", str(tmp_path)]) == 2
    assert "diagnose compares one of ['baseline', 'gcw', 'gcode', 'gcgd']" in capsys.readouterr().err
    assert main(["diagnose", "cifar_resnet20", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err


def test_diagnose_help_does_not_load_torch():
    code = "import sys; from gcsurgery.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
