"""`Run`: history from the untrained model on, best epoch, resume checks, files; two Runs in turns."""

import json

import pytest
import torch

from gcsurgery.errors import GCSurgeryError
from gcsurgery.harness.config import RESULT_FIELDS, RunConfig, build_parser, config_diff
from gcsurgery.harness.datasets import build_data
from gcsurgery.harness.run import Run, RunFiles

TINY = {"train_size": 40, "val_size": 20, "test_size": 16, "batch_size": 8, "epochs": 2, "limit_train_batches": 2}


@pytest.fixture(scope="module")
def data():
    return build_data(RunConfig(subset="embedded", **TINY))


def test_eval_untrained_history_and_summary(data, tmp_path):
    files = RunFiles(checkpoint=tmp_path / "r.pt", summary=tmp_path / "r.json", keep_checkpoint=False)
    run = Run(RunConfig(subset="embedded", eval_untrained=True, arm="gcw", **TINY), data, files=files)
    assert [r["epoch"] for r in run.history] == [0] and run.epochs_done == 0
    while not run.done:
        row = run.train_epoch()
        assert {"cpu_step_time", "step_time", "train_time", "cpu_time", "gc_stats", "lr"} <= set(row)
        assert (tmp_path / "r.pt").exists()
    with pytest.raises(GCSurgeryError, match="has trained its 2 epochs"):
        run.train_epoch()
    s = run.finish()
    assert [r["epoch"] for r in s["history"]] == [0, 1, 2] and len(s["gcw_sites"]) == 3
    assert s["best_epoch"] in (0, 1, 2) and 0 <= s["test_acc"] <= 1 and s["cpu_step_time"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["test_acc"] == s["test_acc"]
    assert not (tmp_path / "r.pt").exists()  # keep_checkpoint=False


def test_gradient_mode_rows_report_the_branches_fit(data):
    run = Run(RunConfig(subset="embedded", arm="gcode:ode.mode=gradient", **TINY), data)
    row = run.train_epoch()
    assert "gc_stats" not in row and len(row["ode_stats"]) == 3  # one per branch of the ResNet-20
    assert all(s["steps"] == 2 and s["dropped"] == 0 and 0 <= s["clipped"] <= 2 for s in row["ode_stats"].values())
    assert "ode_stats" not in Run(RunConfig(subset="embedded", arm="gcode", **TINY), data).train_epoch()


def test_runs_in_turns_equal_runs_alone(data):
    cfg = RunConfig(subset="embedded", arm="gcgd", **TINY)
    alone = Run(cfg, data)
    alone.fit()
    a, b = Run(cfg, data), Run(RunConfig(subset="embedded", arm="baseline", **TINY), data)
    for _ in range(2):
        b.train_epoch()
        a.train_epoch()
    assert [r["val_loss"] for r in a.history] == [r["val_loss"] for r in alone.history]
    assert all(torch.equal(v, alone.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_resume_refuses_other_settings(data, tmp_path):
    run = Run(RunConfig(subset="embedded", **TINY), data, files=RunFiles(checkpoint=tmp_path / "c.pt"))
    run.train_epoch()
    with pytest.raises(GCSurgeryError, match=r"other settings .*'lr': \(0.1, 0.05\)"):
        Run(RunConfig(subset="embedded", lr=0.05, **TINY), data, resume=tmp_path / "c.pt")
    again = Run(RunConfig(subset="embedded", out_dir="elsewhere", **TINY), data, resume=tmp_path / "c.pt")
    assert again.epochs_done == 1  # where the files go does not change the results
    assert "out_dir" not in RESULT_FIELDS and "lr" in RESULT_FIELDS
    assert config_diff(RunConfig().to_dict(), RunConfig(quiet=True)) == {}


def test_in_dir_names():
    files = RunFiles.in_dir("out")
    assert [p.name for p in (files.checkpoint, files.best, files.metrics, files.summary, files.plot)] == [
        "checkpoint.pt",
        "best.pt",
        "metrics.jsonl",
        "summary.json",
        "val_acc.png",
    ]


@pytest.mark.parametrize("arm", ["gcw", "gcode"])
def test_diagnose_every_writes_step_diagnostics_and_leaves_the_training_as_it_was(data, tmp_path, arm):
    cfg = dict(subset="embedded", arm=arm, **{**TINY, "limit_train_batches": 3})
    off = Run(RunConfig(**cfg), data)
    off.fit()
    on = Run(RunConfig(diagnose_every=2, **cfg), data, files=RunFiles(metrics=tmp_path / "m.jsonl"))
    on.fit()
    assert all(torch.equal(v, off.model.state_dict()[k]) for k, v in on.model.state_dict().items())
    assert [r["val_loss"] for r in on.history] == [r["val_loss"] for r in off.history]
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    # 6 steps: records at 0, 2, 4; a record is complete once its steps t + 1 and t + 2 have passed
    assert [("diag/step" in r, r.get("epoch"), r.get("diag/step")) for r in lines] == [
        (False, 1, None), (True, None, 0), (True, None, 2), (False, 2, None),
    ]  # fmt: skip
    d = lines[1]
    assert {"diag/stem/grad_norm", "diag/stage3/cos_next", "diag/head/cos_step"} <= set(d)
    assert -1 <= d["diag/stage1/cos_next"] <= 1 and -1 <= d["diag/stage1/cos_step"] <= 1
    assert ("diag/layer3.2.conv2.weight/ratio" in lines[2]) == (arm == "gcw")  # GC-W's own statistics
    assert "diagnostics" not in lines[0] and len(on.history[1]["diagnostics"]) == 2
    with pytest.raises(GCSurgeryError, match="diagnose_every must be 0"):
        RunConfig(diagnose_every=-1)
    assert build_parser().parse_args(["--diagnose-every", "5"]).diagnose_every == 5  # recipes/train.py's option
