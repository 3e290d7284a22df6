"""The epoch loop: schedules, per-epoch seeding, one training pass with wall and CPU times, evaluation."""

import pytest
import torch

from gcsurgery.errors import GCSurgeryError
from gcsurgery.harness.loader import TensorLoader
from gcsurgery.harness.loop import cosine_schedule, evaluate, make_schedule, seed_epoch, setup_device, train_one_epoch


def _lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(cosine_schedule(opt, total_steps=10, warmup_steps=2), opt, 10)
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    with pytest.raises(GCSurgeryError, match="warmup_steps <= total_steps"):
        cosine_schedule(opt, total_steps=5, warmup_steps=6)


def test_constant_schedule_and_unknown_names():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert _lrs(make_schedule(opt, "constant", total_steps=6, warmup_steps=2), opt, 6) == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    )
    with pytest.raises(GCSurgeryError, match=r"unknown schedule 'step'; choose one of \['cosine', 'constant'\]"):
        make_schedule(opt, "step", total_steps=6)


def test_seed_epoch_depends_on_seed_and_epoch_only():
    seed_epoch(3, 1)
    a = torch.rand(3)
    torch.rand(10)
    seed_epoch(3, 1)
    assert torch.equal(torch.rand(3), a)
    seed_epoch(3, 2)
    assert not torch.equal(torch.rand(3), a)


def test_train_one_epoch_reports_wall_and_cpu_time():
    torch.manual_seed(0)
    images, labels = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 2
    loader = TensorLoader(images, labels, batch_size=4, pad_to=None, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    device = torch.device("cpu")
    stats = train_one_epoch(model, loader, opt, device=device, limit_batches=3)
    assert stats["steps"] == 3 and stats["cpu_seconds"] > 0 and stats["cpu_step_time"] == stats["cpu_seconds"] / 3
    assert stats["seconds"] > 0 and 0 <= stats["acc"] <= 1
    ev = evaluate(model, loader, device=device)
    assert ev["n"] == 16 and 0 <= ev["acc"] <= 1


def test_setup_device_refuses_a_bad_name():
    assert setup_device("cpu") == (torch.device("cpu"), 0, 1)
    with pytest.raises(GCSurgeryError, match="unknown device 'gpu0'"):
        setup_device("gpu0")


def test_the_recorder_reads_unscaled_gradients_and_changes_nothing():
    from gcsurgery import GradientRecorder, plan

    from .factories import tiny_net

    images, labels = torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8), torch.arange(24) % 2
    loader = TensorLoader(images, labels, batch_size=4, pad_to=None, shuffle=False)
    out = {}
    for case in ("plain", "recorded", "scaled"):
        torch.manual_seed(0)
        model = tiny_net(in_chans=1, num_classes=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rec = GradientRecorder(model, plan(model, torch.zeros(2, 1, 8, 8)), every=2) if case != "plain" else None
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if case == "scaled" else None
        stats = train_one_epoch(
            model, loader, opt, device=torch.device("cpu"), scaler=scaler, recorder=rec, first_step=4
        )
        out[case] = (model.state_dict(), stats, rec)
    for case in ("recorded", "scaled"):  # the recorder only reads; scaling by 2**10 and back is exact
        assert all(torch.equal(v, out["plain"][0][k]) for k, v in out[case][0].items())
    assert "diagnostics" not in out["plain"][1]
    rec, diag = out["recorded"][2], out["recorded"][1]["diagnostics"]
    assert [r["step"] for r in rec.records] == [4, 6, 8] and [d["diag/step"] for d in diag] == [4, 6]
    # the recorder keeps the gradient the optimizer steps with: unscaled under a GradScaler
    assert out["scaled"][1]["diagnostics"] == diag and diag[0]["diag/stem/grad_norm"] > 0
