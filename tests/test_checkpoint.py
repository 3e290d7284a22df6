import io

import pytest
import torch
from conftest import TinyResNet, TinyVGG

import gcsurgery as gcs
from gcsurgery.checkpoint import checkpoint, restore


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _gcgd(model):
    gcw = gcs.GCWOptions(trust_warmup=1, trust_z=0.1)  # let GC-W act from the first steps
    return gcs.GCOptimizer(model, torch.optim.SGD, gcw=gcw, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("make_opt", [_sgd, _gcgd])
def test_save_restore_continue_is_bit_identical(make_opt):
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    straight = gcs.gcify(TinyResNet(), example_inputs=x)
    opt = make_opt(straight)
    _steps(straight, opt, 2, seed=1)
    buf = io.BytesIO()
    torch.save(checkpoint(straight, opt, epoch=1), buf)
    _steps(straight, opt, 2, seed=2)

    torch.manual_seed(123)  # a fresh model with other initial weights
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    resumed = restore(TinyResNet(), ckpt)
    opt2 = make_opt(resumed)
    opt2.load_state_dict(ckpt["optimizer"])
    assert ckpt["epoch"] == 1 and resumed.gc_plan == straight.gc_plan
    _steps(resumed, opt2, 2, seed=2)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert str(opt.state_dict()) == str(opt2.state_dict())
    if isinstance(opt, gcs.GCOptimizer):
        assert any(v["ratio"] > 0 for v in opt.gc_stats().values())  # GC-W corrected, so its state matters


def test_checkpoint_errors(tiny_resnet):
    with pytest.raises(gcs.GCSurgeryError, match="needs a module returned by gcsurgery.gcify"):
        checkpoint(tiny_resnet)
    with pytest.raises(gcs.GCSurgeryError, match="not a gcsurgery checkpoint"):
        restore(tiny_resnet, {"model": {}})
    gm = gcs.gcify(tiny_resnet, example_inputs=(2, 3, 32, 32))
    with pytest.raises(gcs.GCSurgeryError, match="reserved"):
        checkpoint(gm, model=1)
    with pytest.raises(gcs.GCSurgeryError, match=r"optimizer must be a torch.optim.Optimizer .* got dict"):
        checkpoint(gm, {"lr": 0.1})
    for wrapped, attr in ((torch.nn.DataParallel(gm), "module"), (torch.compile(gm, backend="eager"), "_orig_mod")):
        with pytest.raises(gcs.GCSurgeryError, match=rf"wrapped in {type(wrapped).__name__}.*checkpoint\(model.{attr}"):
            checkpoint(wrapped)


@pytest.fixture
def saved():
    torch.manual_seed(0)
    gm = gcs.gcify(TinyResNet(), example_inputs=(2, 3, 32, 32))
    return checkpoint(gm, _sgd(gm))


def test_restore_into_another_model_is_refused(saved):
    with pytest.raises(
        gcs.GCSurgeryError, match=r"saved from a gcified TinyResNet .* but the model given is a TinyVGG"
    ):
        restore(TinyVGG(), saved)
    with pytest.raises(gcs.GCSurgeryError, match=r"a TinyResNet \[fingerprint \w+\] .*same constructor and arguments"):
        restore(TinyResNet(widths=(8, 16, 64)), saved)
    with pytest.raises(gcs.GCSurgeryError, match="already gcified"):
        restore(gcs.gcify(TinyResNet(), example_inputs=(2, 3, 32, 32)), saved)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda c: c.update(gcsurgery="0.1.0"), r"malformed gcsurgery checkpoint"),
        (lambda c: c["gcsurgery"].pop("plan"), r"malformed gcsurgery checkpoint: it needs .*'plan' and 'ode'"),
        (lambda c: c.pop("model"), r"malformed gcsurgery checkpoint: .*ckpt\['model'\]"),
        (lambda c: c.update(model=TinyResNet().state_dict()), r"\d+ missing \(e.g. \['gc.ode.0.gate'"),
        (lambda c: c["model"].update(extra=torch.zeros(1)), r"0 missing .*1 unexpected \(e.g. \['extra'\]\)"),
    ],
)
def test_restore_refuses_a_damaged_checkpoint(saved, edit, pattern):
    ckpt = {**saved, "gcsurgery": dict(saved["gcsurgery"]), "model": dict(saved["model"])}
    edit(ckpt)
    with pytest.raises(gcs.GCSurgeryError, match=pattern):
        restore(TinyResNet(), ckpt)


def test_restore_refuses_another_head_by_the_saved_weights_and_keeps_old_checkpoints(saved):
    with pytest.raises(
        gcs.GCSurgeryError, match=r"this checkpoint's 'fc.weight' is \(10, 32\), but the TinyResNet given has \(5, 32\)"
    ):
        restore(TinyResNet(num_classes=5), saved)
    old = {**saved, "gcsurgery": dict(saved["gcsurgery"])}
    plan = dict(old["gcsurgery"]["plan"])
    del plan["fingerprint_format"], plan["depends_on"]  # written before the fingerprint's format 2
    plan["fingerprint"] = gcs.plans.fingerprint(TinyResNet())
    old["gcsurgery"]["plan"] = plan
    torch.manual_seed(0)
    gm = restore(TinyResNet(), old)
    assert gm.gc_plan.fingerprint_format == 1


def test_the_readmes_resume_block_runs_and_resumes_model_optimizer_and_scheduler(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "scheduler.load_state_dict" in b]
    assert len(blocks) == 1, "the README shows no resume block"
    epochs = []

    def train_one_epoch(model, opt):
        g = torch.Generator().manual_seed(len(epochs))
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        epochs.append(len(epochs))

    monkeypatch.chdir(tmp_path)
    ns = {"train_one_epoch": train_one_epoch}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert epochs == [0, 1, 2, 3, 4] and ns["ckpt"]["epoch"] == 2
    assert ns["scheduler"].last_epoch == 5 and ns["opt"].param_groups[0]["lr"] == ns["scheduler"].get_last_lr()[0]
    restored = ns["opt"].state_dict()["state"]
    assert restored and all("momentum_buffer" in s for s in restored.values())


def test_a_checkpoint_saved_before_the_width_cap_restores_its_wide_branch(monkeypatch):
    """A stage of 512 channels got r = 128 before the default width was capped at 64: its weights still load."""
    import gcsurgery.gcode as gcode

    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    with monkeypatch.context() as m:
        m.setattr(gcode, "default_width", lambda out_chs: max(8, out_chs // 4))  # the rule before the cap
        old = gcs.gcify(TinyResNet(widths=(8, 16, 512)), example_inputs=x, ode=gcs.ODEOptions(gate_init=0.1))
    assert [b.width for b in old.gc.ode] == [8, 8, 128]
    buf = io.BytesIO()
    torch.save(checkpoint(old), buf)
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert gcs.gcify(TinyResNet(widths=(8, 16, 512)), example_inputs=x).gc.ode[2].width == 64  # today's default
    resumed = restore(TinyResNet(widths=(8, 16, 512)), ckpt)
    assert [b.width for b in resumed.gc.ode] == [8, 8, 128]
    old.eval(), resumed.eval()
    assert torch.equal(old(x), resumed(x))
