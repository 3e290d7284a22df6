"""`recipes/train.py` over the harness `Run`, and one step of every recipe, on tiny data."""

import json
import pickle
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gcsurgery.errors import GCSurgeryError
from gcsurgery.harness import run as run_module
from gcsurgery.harness.arms import ARMS
from gcsurgery.harness.config import RunConfig, build_parser
from gcsurgery.harness.data import CIFAR10_CLASSES, write_idx
from gcsurgery.harness.datasets import build_data
from gcsurgery.harness.models import build_model

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))
import train as train_script  # noqa: E402  (recipes/ is a folder of scripts, not a package)

# --- tiny datasets in the real on-disk formats ------------------------------------------------------------------


def fake_fashion(directory: Path, n_train: int = 40, n_test: int = 16) -> Path:
    """Fashion-MNIST IDX files (gzipped) of random 28x28 images, labels cycling over the 10 classes."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return directory


def fake_cifar10(root: Path, per_batch: int = 8) -> Path:
    """cifar-10-batches-py/: pickled dicts with "data" (uint8 (N, 3072) rows, CHW order) and "labels"."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": [(b + i) % 10 for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}, protocol=2))
    return root


def fake_folders(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4, splits=("train", "val")) -> Path:
    """ImageNet-style train/<class>/ and val/<class>/ (and test/<class>/) folders of small PNG and JPEG images."""
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                color = (60 * c, 40 * i, 90)
                Image.new("RGB", (40, 48), color).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    return fake_fashion(tmp_path_factory.mktemp("fashion"))


def tiny(fashion_dir, out: Path, **kw) -> RunConfig:
    settings = {
        "dataset": "fashion_mnist",
        "data_dir": str(fashion_dir),
        "epochs": 1,
        "batch_size": 8,
        "limit_train_batches": 2,
        "out_dir": str(out),
        "quiet": True,
        "device": "cpu",
    }
    return RunConfig(**{**settings, **kw})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- the building blocks ----------------------------------------------------------------------------------------


def test_build_errors():
    with pytest.raises(GCSurgeryError, match="unknown model 'resnet18'.*torchvision:resnet18"):
        build_model("resnet18", num_classes=10)
    with pytest.raises(GCSurgeryError, match="3 input channels"):
        build_model("torchvision:resnet18", num_classes=10, in_chans=1)
    with pytest.raises(GCSurgeryError, match="unknown optimizer 'lamb2'.*did you mean lamb"):
        RunConfig(opt="lamb2")
    with pytest.raises(GCSurgeryError, match="unknown arm 'gc'"):
        RunConfig(arm="gc")
    with pytest.raises(GCSurgeryError, match="cifar10.*needs --data-dir"):
        build_data(RunConfig(dataset="cifar10"))


def test_parser_covers_every_field():
    args = build_parser(RunConfig(lr=0.05)).parse_args(["--arm", "gcgd", "--no-augment", "--limit-train-batches", "3"])
    cfg = RunConfig(**vars(args))
    assert (cfg.arm, cfg.augment, cfg.limit_train_batches, cfg.lr) == ("gcgd", False, 3, 0.05)
    with pytest.raises(SystemExit):
        build_parser(RunConfig()).parse_args(["--dataset", "nope"])
    with pytest.raises(SystemExit):  # a bad arm spec is refused before any data is read
        train_script.main(["--arm", "nope"])


# --- train(): arms, outputs, resume -----------------------------------------------------------------------------


@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_trains(fashion_dir, tmp_path, arm):
    summary = train_script.train(tiny(fashion_dir, tmp_path, arm=arm))
    assert summary["arm"] == arm and 0 <= summary["test_acc"] <= 1 and summary["best_epoch"] == 1
    assert summary["test_at"] == "best validation epoch (1)"
    (row,) = read_metrics(tmp_path)
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time", "step_time", "train_time"} <= set(row)
    assert ("gc_stats" in row) == (arm in ("gcw", "gcgd"))
    if "gc_stats" in row:
        assert set(row["gc_stats"]) == set(summary["gcw_sites"]) and len(summary["gcw_sites"]) == 3
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("gc.ode.") for k in ckpt["model"]) == (arm in ("gcode", "gcgd"))
    assert ("gcsurgery" in ckpt) == (arm in ("gcode", "gcgd")) and ckpt["epoch"] == 1  # plan saved with the weights
    assert json.loads((tmp_path / "summary.json").read_text())["test_acc"] == summary["test_acc"]
    assert (tmp_path / "val_acc.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_is_bit_identical(fashion_dir, tmp_path, monkeypatch):
    cfg = {"arm": "gcgd", "epochs": 2, "augment": True}
    straight = train_script.train(tiny(fashion_dir, tmp_path / "a", **cfg))

    real, calls = run_module.train_one_epoch, []

    def crash_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed during the second epoch
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_script.train(tiny(fashion_dir, tmp_path / "b", **cfg))
    monkeypatch.setattr(run_module, "train_one_epoch", real)
    assert len(read_metrics(tmp_path / "b")) == 1
    resumed = train_script.train(tiny(fashion_dir, tmp_path / "b", resume=str(tmp_path / "b/checkpoint.pt"), **cfg))

    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in "ab")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["gcw"]["step"] == b["optimizer"]["gcw"]["step"] == 4

    def results(rows):  # times and the machine's load are measurements of the machine, not of the run
        return [{k: v for k, v in row.items() if "time" not in k and k != "load_average"} for row in rows]

    assert results(read_metrics(tmp_path / "a")) == results(read_metrics(tmp_path / "b"))
    assert (straight["test_acc"], straight["best_epoch"]) == (resumed["test_acc"], resumed["best_epoch"])


def test_resume_with_other_settings_is_refused(fashion_dir, tmp_path):
    train_script.train(tiny(fashion_dir, tmp_path))
    with pytest.raises(GCSurgeryError, match=r"other settings .*'arm': \('baseline', 'gcw'\)"):
        train_script.train(tiny(fashion_dir, tmp_path / "b", arm="gcw", resume=str(tmp_path / "checkpoint.pt")))


# --- one step of each recipe ------------------------------------------------------------------------------------

STEP = ["--epochs", "1", "--limit-train-batches", "1", "--limit-eval-batches", "1", "--batch-size", "4", "--quiet"]


@pytest.mark.parametrize(
    "recipe, data, extra",
    [
        ("fashion_mnist", None, []),  # the embedded subset
        ("cifar_resnet", "cifar", ["--arm", "gcgd"]),
        ("imagenet_resnet", "folders", ["--image-size", "32", "--workers", "0"]),
        ("timm_model", "fashion", ["--model", "timm:resnet10t", "--arm", "gcode"]),
    ],
)
def test_recipe_one_step(tmp_path, monkeypatch, capsys, recipe, data, extra):
    make = {"cifar": fake_cifar10, "folders": fake_folders, "fashion": fake_fashion}
    argv = [*STEP, "--out-dir", str(tmp_path / "out"), *extra]
    if data is not None:
        argv += ["--data-dir", str(make[data](tmp_path / "data"))]
    monkeypatch.setattr(sys, "argv", [str(RECIPES / f"{recipe}.py"), *argv])
    runpy.run_path(str(RECIPES / f"{recipe}.py"), run_name="__main__")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["epochs"] == 1
    if recipe == "imagenet_resnet":  # train/ and val/ only: val/ validates, and there is no test set
        assert summary["test_acc"] is None and summary["test_at"] == "no test set"
        assert "12 val (val/) images, no test set (no test/ folder)" in summary["dataset"]
    else:
        assert 0 <= summary["test_acc"] <= 1
    assert len(read_metrics(tmp_path / "out")) == 1
    assert "best val acc" in capsys.readouterr().out
    if recipe == "imagenet_resnet":
        assert summary["config"]["amp"] and summary["config"]["channels_last"]  # bf16 autocast on CPU
        assert "3 classes" in summary["dataset"]


def test_ddp_under_torchrun(fashion_dir, tmp_path):
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(RECIPES / "train.py"),
        "--data-dir",
        str(fashion_dir),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--limit-train-batches",
        "2",
        "--arm",
        "gcgd",
        "--out-dir",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(read_metrics(tmp_path)) == 2
    assert proc.stdout.count("best val acc") == 1  # only rank 0 reports


@pytest.mark.parametrize("recipe", ["fashion_mnist", "cifar_resnet", "imagenet_resnet", "timm_model"])
def test_each_recipe_s_help_shows_its_own_header_and_expected_result(recipe, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(RECIPES / f"{recipe}.py"), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(RECIPES / f"{recipe}.py"), run_name="__main__")
    out = capsys.readouterr().out
    header = runpy.run_path(str(RECIPES / f"{recipe}.py"))["__doc__"].splitlines()[0]
    assert done.value.code == 0 and header in out and "Expected result" in out
    assert f"usage: {recipe}.py" in out and "--gcw GCW" in out and "--ode ODE" in out


def test_gcw_and_ode_options_reach_the_optimizer_and_the_branches(fashion_dir, tmp_path):
    cfg = tiny(fashion_dir, tmp_path, arm="gcgd", gcw="lr=0.01,rho=0.5", ode="gate_init=0.1")
    summary = train_script.train(cfg)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert summary["config"]["gcw"] == "lr=0.01,rho=0.5"
    assert ckpt["gcsurgery"]["ode"]["gate_init"] == 0.1
    with pytest.raises(SystemExit):
        train_script.main(["--arm", "baseline", "--gcw", "lr=0.01", "--data-dir", str(fashion_dir)])


def test_image_folders_validate_on_val_and_test_on_test(tmp_path):
    root = fake_folders(tmp_path / "data", splits=("train", "val", "test"), per_class=2)
    data = build_data(RunConfig(dataset="folders", data_dir=str(root), image_size=32, batch_size=2, workers=0))
    assert len(data.val.dataset) == len(data.test.dataset) == 6  # val/ and test/, not a cut of train/
    assert len(data.train.dataset) == 6 and "6 val (val/) images, 6 test images (test/)" in data.description
