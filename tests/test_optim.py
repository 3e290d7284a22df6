"""GCOptimizer: torch.optim conventions, exact resume, AMP, DDP, safety, and that the hypergradient is wired."""

import io
import os
import types
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gcsurgery import cifar_resnet
from gcsurgery.errors import GCSurgeryError
from gcsurgery.gcw import GCWOptions
from gcsurgery.optim import GCOptimizer

SITES = ["conv1.weight", "conv2.weight", "fc.weight"]
RESNET_SITES = ["layer1.2.conv2.weight", "layer2.2.conv2.weight", "layer3.2.conv2.weight"]
SGD = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4})
ADAMW = (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.05})


def tiny_cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(8),
            act1=nn.ReLU(),
            conv2=nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
            bn2=nn.BatchNorm2d(8),
            act2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(8, 4),
        )
    ).to(dtype)


def batches(n, seed=0, size=8, hw=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, hw, hw, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def train(model, opt, data, sched=None):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def assert_same(a, b, path="state"):
    """Recursive bit-equality of nested dicts / lists / tensors / numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def gc_state(opt):
    return opt.state_dict()["gcw"]


# --- conventions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_first_step_is_bit_identical_to_the_base_optimizer(base):
    cls, kw = base
    plain_model, gc_model = tiny_cnn(), tiny_cnn()
    plain, gc = cls(plain_model.parameters(), **kw), GCOptimizer(gc_model, cls, sites=SITES, **kw)
    train(plain_model, plain, batches(1))
    train(gc_model, gc, batches(1))
    for p, q in zip(plain_model.parameters(), gc_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same(plain.state_dict(), {k: v for k, v in gc.state_dict().items() if k != "gcw"})


def test_param_groups_and_state_are_shared_and_lr_schedulers_drive_both():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base.param_groups  # shared, like timm's Lookahead ...
    assert opt.state is not opt.base.state and set(opt.state) == {p for n, p in model.named_parameters() if n in SITES}
    assert not hasattr(opt, "_step_supports_amp_scaling")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        train(model, opt, batches(2), sched)
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.025)
    # the corrector's step follows the schedule: lr ratio 0.25 now reaches the features
    assert float(opt.site_state(SITES[0])["feats"][0, -1]) == pytest.approx(0.5)


def test_base_can_be_an_instance_from_timm():
    timm_optim = pytest.importorskip("timm.optim")
    model = tiny_cnn()
    base = timm_optim.create_optimizer_v2(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt = GCOptimizer(model, base, sites=SITES)
    assert opt.base is base and opt.param_groups is base.param_groups
    train(model, opt, batches(3))
    assert set(opt.gc_stats()) == set(SITES)


def test_sites_default_to_the_models_gc_plan():
    model = tiny_cnn()
    site = types.SimpleNamespace(param="conv2.weight", node="conv2")
    model.gc_plan = types.SimpleNamespace(gcw_sites=(site,))
    opt = GCOptimizer(model, torch.optim.SGD, lr=0.1)
    assert opt.sites == ("conv2.weight",)


def test_building_leaves_the_global_rng_alone():
    model = tiny_cnn()
    before = torch.get_rng_state()
    GCOptimizer(model, torch.optim.SGD, sites=SITES, gcw=GCWOptions(seed=7), lr=0.1)
    assert torch.equal(before, torch.get_rng_state())


def test_zero_grad_and_gc_stats():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, lr=0.1, momentum=0.9)
    train(model, opt, batches(3))
    stats = opt.gc_stats()
    for name in SITES:
        s = stats[name]
        for key in ("ratio", "next_grad_dot", "proposal_dot", "cosine", "trust", "coef_grad", "coef_weight"):
            assert key in s and isinstance(s[key], float)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_update_every_trains_the_corrector_every_k_steps():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, gcw=GCWOptions(update_every=3), lr=0.1)
    changed = []
    for data in batches(7):
        before = opt.site_state(SITES[0])["psi"].clone()
        step = opt._step
        train(model, opt, [data])
        changed.append((step, not torch.equal(before, opt.site_state(SITES[0])["psi"])))
    assert changed == [(s, s > 0 and s % 3 == 0) for s in range(7)]


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_resume_is_bit_identical(base):
    cls, kw = base
    gcw = GCWOptions(trust=False)  # let corrections act within 10 steps (the trust statistics are kept all the same)
    data = batches(10)

    def build(seed):
        model = tiny_cnn(seed)
        opt = GCOptimizer(model, cls, sites=SITES, gcw=gcw, **kw)
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)

    m1, o1, s1 = build(0)
    train(m1, o1, data, s1)
    m2, o2, s2 = build(0)
    train(m2, o2, data[:5], s2)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    m3, o3, s3 = build(123)
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sched"])
    assert o3.param_groups is o3.base.param_groups
    train(m3, o3, data[5:], s3)
    assert_same(m1.state_dict(), m3.state_dict(), "model")
    assert_same(o1.state_dict(), o3.state_dict(), "optimizer")
    assert max(s["ratio"] for s in o1.gc_stats().values()) > 0  # GC-W really acted


def test_loading_a_checkpoint_with_other_options_is_refused():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, lr=0.1)
    train(model, opt, batches(2))
    other = GCOptimizer(tiny_cnn(), torch.optim.SGD, sites=SITES, gcw=GCWOptions(rho=1.0), lr=0.1)
    with pytest.raises(GCSurgeryError, match="GCWOptions.from_dict"):
        other.load_state_dict(opt.state_dict())
    fewer = GCOptimizer(tiny_cnn(), torch.optim.SGD, sites=SITES[:1], lr=0.1)
    with pytest.raises(GCSurgeryError, match="same sites"):
        fewer.load_state_dict(opt.state_dict())


# --- safety ----------------------------------------------------------------------------------------


def test_grad_scaler_overflow_skips_the_step_and_gcw():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    assert scaler.is_enabled()
    data = batches(4)

    def amp_step(x, y, poison=False):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        scaler.step(opt)
        scaler.update()

    for x, y in data[:3]:
        amp_step(x, y)
    params, state = [p.clone() for p in model.parameters()], gc_state(opt)
    snapshot = io.BytesIO()
    torch.save({"step": state["step"], "state": state["state"]}, snapshot)
    amp_step(*data[3], poison=True)
    assert scaler.get_scale() < 2.0**8  # the scaler saw the overflow
    for p, q in zip(params, model.parameters(), strict=True):
        assert torch.equal(p, q) and torch.isfinite(q).all()
    snapshot.seek(0)
    assert_same(torch.load(snapshot), {"step": gc_state(opt)["step"], "state": gc_state(opt)["state"]})
    amp_step(*data[0])
    assert opt._step == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_gradient_leaves_the_corrector_intact_and_is_never_learnt_from():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, lr=0.1, momentum=0.9)
    train(model, opt, batches(4))
    names = ("psi", "exp_avg", "exp_avg_sq", "adam_step", "trust_stats")
    keep = {k: v.clone() for k, v in opt.site_state("conv2.weight").items()}

    def step(poison):
        x, y = batches(1, seed=5)[0]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if poison:
            model.conv2.weight.grad[0, 0, 0, 0] = float("nan")
            model.conv2.weight.grad[1, 0, 0, 0] = float("inf")
        grad = model.conv2.weight.grad.clone()
        opt.step()
        return grad

    grad = step(poison=True)
    torch.testing.assert_close(model.conv2.weight.grad, grad, equal_nan=True, rtol=0, atol=0)  # G is restored
    now = opt.site_state("conv2.weight")
    assert all(torch.equal(keep[k], now[k]) for k in names)  # no corrector update, no trust observation
    stats = opt.gc_stats()["conv2.weight"]
    assert stats["ratio"] == 0.0 and stats["next_grad_dot"] == 0.0  # nothing added, pair not counted
    assert torch.isfinite(now["e"]).all() and torch.isfinite(now["feats"]).all()
    # SGD itself has now put NaN into that weight's rows; the other sites carry on, and this one is never
    # trained on a pair that involves the non-finite gradient
    model.conv2.weight.data.nan_to_num_(0.0, 0.0, 0.0)
    opt.base.state[model.conv2.weight]["momentum_buffer"].nan_to_num_(0.0, 0.0, 0.0)
    step(poison=False)
    assert all(torch.equal(keep[k], opt.site_state("conv2.weight")[k]) for k in names)
    step(poison=False)
    assert float(opt.site_state("conv2.weight")["adam_step"]) == float(keep["adam_step"]) + 1  # learning again
    assert all(torch.isfinite(t).all() for n in SITES for t in opt.site_state(n).values())


def test_a_non_finite_correction_never_reaches_the_weights():
    plain_model, gc_model = tiny_cnn(), tiny_cnn()
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9)
    gc = GCOptimizer(gc_model, torch.optim.SGD, sites=SITES, gcw=GCWOptions(trust=False), lr=0.1, momentum=0.9)
    for n in SITES:
        psi = gc.site_state(n)["psi"]
        gc._layout.corrector_params(psi[None])["out.bias"].fill_(float("nan"))  # the corrector proposes NaN
    data = batches(3)
    train(plain_model, plain, data)
    train(gc_model, gc, data)
    for p, q in zip(plain_model.parameters(), gc_model.parameters(), strict=True):
        assert torch.isfinite(q).all() and torch.equal(p, q)


def test_hypergradient_lowers_the_loss_when_the_learning_rate_is_too_small():
    """Full-batch CNN regression with SGD at 1/10 of a good lr (0.3): GC-W learns to step further."""

    def net():
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
            nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
        )  # fmt: skip

    def run(seed, gc):
        torch.manual_seed(seed + 100)
        teacher = net()
        X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            Y = teacher(X)
        torch.manual_seed(seed)
        model = net()
        if gc:
            opt = GCOptimizer(model, torch.optim.SGD, sites=["0.weight", "2.weight", "5.weight"], lr=0.03)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.03)
        dots = []
        for i in range(150):
            opt.zero_grad()
            loss = F.mse_loss(model(X), Y)
            loss.backward()
            opt.step()
            if gc and i >= 75:
                dots.append(sum(s["next_grad_dot"] for s in opt.gc_stats().values()))
        return loss.item(), sum(dots) / max(len(dots), 1)

    for seed in range(3):
        plain_loss, _ = run(seed, gc=False)
        gc_loss, dot = run(seed, gc=True)
        assert dot > 0, seed
        assert gc_loss < 0.95 * plain_loss, (seed, gc_loss, plain_loss)


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_site_suggests_close_names():
    with pytest.raises(GCSurgeryError, match=r"unknown GC-W site 'conv2.weigth'.*did you mean \['conv2.weight'"):
        GCOptimizer(tiny_cnn(), torch.optim.SGD, sites=["conv2.weigth"], lr=0.1)


def test_module_names_resolve_to_their_weight():
    opt = GCOptimizer(tiny_cnn(), torch.optim.SGD, sites=["conv2"], lr=0.1)
    assert opt.sites == ("conv2.weight",)


def test_plain_model_without_sites_is_refused():
    with pytest.raises(GCSurgeryError, match=r"not gcified.*pass sites=.*or gcify the model"):
        GCOptimizer(tiny_cnn(), torch.optim.SGD, lr=0.1)


def test_parameters_missing_from_the_base_optimizer_are_refused():
    model = tiny_cnn()
    base = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    with pytest.raises(GCSurgeryError, match=r"6 trainable parameter\(s\).*'conv1.weight'.*all model.parameters"):
        GCOptimizer(model, base, sites=["fc.weight"])
    model.conv1.weight.requires_grad_(False)
    for m in (model.bn1, model.conv2, model.bn2):
        m.requires_grad_(False)
    GCOptimizer(model, base, sites=["fc.weight"])  # frozen parameters may stay out


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"base": "sgd"}, r"torch.optim.Optimizer class .* got 'sgd'"),
        ({"base": nn.Linear}, r"torch.optim.Optimizer class"),
        ({"sites": ["bn1.weight"]}, r"'bn1.weight' has shape \(8,\).*ndim >= 2"),
        ({"sites": ["fc.weight", "fc.weight"]}, r"listed twice"),
        ({"sites": [3]}, r"must be a parameter name"),
        ({"gcw": {"rho": 1.0}}, r"gcw must be a GCWOptions"),
        ({"sites": 3}, r"sites must be a list of parameter names, got int"),
        ({"sites": []}, r"sites is empty.*use the base optimizer itself"),
        ({"lrr": 0.1}, r"SGD\(model.parameters\(\), \*\*\{'lr': 0.1, 'lrr': 0.1\}\) failed.*'lrr'.*help\("),
        ({"momentum": -1.0}, r"SGD\(model.parameters\(\).*failed: Invalid momentum value: -1.0"),
    ],
)
def test_bad_input_errors(kwargs, pattern):
    kwargs = {"base": torch.optim.SGD, "sites": SITES, **kwargs}
    base = kwargs.pop("base")
    with pytest.raises(GCSurgeryError, match=pattern):
        GCOptimizer(tiny_cnn(), base, lr=0.1, **kwargs)


def test_a_parameter_instead_of_its_name_is_refused_with_the_name():
    model = tiny_cnn()
    with pytest.raises(GCSurgeryError, match=r"got a tensor of shape \(4, 8\); its name is 'fc.weight'"):
        GCOptimizer(model, torch.optim.SGD, sites=[model.fc.weight], lr=0.1)
    with pytest.raises(GCSurgeryError, match=r"shape \(3, 3\); it is not a parameter of the model"):
        GCOptimizer(model, torch.optim.SGD, sites=[nn.Parameter(torch.ones(3, 3))], lr=0.1)


def test_a_plan_without_gcw_sites_is_refused():
    from gcsurgery import gcify

    gm = gcify(cifar_resnet(20), example_inputs=(1, 3, 16, 16))
    no_gcw = gcify(cifar_resnet(20), gm.gc_plan.without(gcw=range(3)))
    with pytest.raises(GCSurgeryError, match=r"plan of this GCCifarResNet has no GC-W sites.*base optimizer itself"):
        GCOptimizer(no_gcw, torch.optim.SGD, lr=0.1)


def test_wrapped_models_give_the_same_sites():
    from gcsurgery import gcify

    gm = gcify(cifar_resnet(20), example_inputs=(1, 3, 16, 16))
    for wrapped in (nn.DataParallel(gm), torch.compile(gm, backend="eager")):
        assert GCOptimizer(wrapped, torch.optim.SGD, lr=0.1).sites == tuple(RESNET_SITES)


def test_loading_a_state_that_does_not_fit_is_refused():
    opt = GCOptimizer(tiny_cnn(), torch.optim.SGD, sites=SITES, lr=0.1)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(GCSurgeryError, match=r"does not fit the SGD over this model.*build the optimizer as it was"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(GCSurgeryError, match=r"expects the dict from optimizer.state_dict\(\), got str"):
        opt.load_state_dict("opt.pt")


def test_instance_with_options_and_double_wrapping_are_refused():
    model = tiny_cnn()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GCSurgeryError, match=r"drop \['lr'\]"):
        GCOptimizer(model, base, sites=SITES, lr=0.2)
    gc = GCOptimizer(model, base, sites=SITES)
    with pytest.raises(GCSurgeryError, match="only once"):
        GCOptimizer(model, gc, sites=SITES)
    frozen = tiny_cnn()
    frozen.fc.weight.requires_grad_(False)
    with pytest.raises(GCSurgeryError, match="frozen"):
        GCOptimizer(frozen, torch.optim.SGD, sites=["fc.weight"], lr=0.1)


# --- distributed -----------------------------------------------------------------------------------


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    from gcsurgery import gcify

    # the documented order: gcify, then DDP; the sites come from the plan the gcified model carries
    model = nn.parallel.DistributedDataParallel(gcify(cifar_resnet(20), example_inputs=(1, 3, 16, 16)))
    gcw = GCWOptions(trust_warmup=2, trust_z=0.5)
    opt = GCOptimizer(model, torch.optim.SGD, gcw=gcw, lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert opt.sites == tuple(RESNET_SITES)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(6):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    params = dict(model.module.named_parameters())  # (BN running stats are rank-local under DDP)
    adam_steps = [float(opt.site_state(n)["adam_step"]) for n in opt.sites]
    torch.save(
        {"params": params, "opt": opt.state_dict(), "adam_steps": adam_steps}, os.path.join(out_dir, f"{rank}.pt")
    )
    dist.destroy_process_group()


def test_ddp_ranks_stay_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert_same(r0, r1, "rank")
    assert r0["adam_steps"] == [5.0] * 3  # the corrector trained on every pair


# --- memory ------------------------------------------------------------------------------------------


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


@pytest.mark.parametrize("base", [SGD, ADAMW, (torch.optim.SGD, {"lr": 0.1})], ids=["sgd", "adamw", "sgd-no-momentum"])
def test_gcw_keeps_at_most_two_weights_worth_of_state_per_site(base):
    """History in bfloat16 (g_t, the moved directions' steps) plus the cumulative bound's EMA: 2 × |W| float32."""
    cls, kw = base
    torch.manual_seed(0)
    model = cifar_resnet(20)
    opt = GCOptimizer(model, cls, sites=RESNET_SITES, **kw)
    train(model, opt, [(torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,)))] * 2)
    params = dict(model.named_parameters())
    weights = sum(params[n].numel() * params[n].element_size() for n in RESNET_SITES)
    big = [t for st in opt.state.values() for k, t in st.items() if k in ("hist", "e")]
    small = [opt._gcw.site, opt._gcw.rows]
    assert _bytes(big) == 2 * weights
    # plus, per site, the corrector with its Adam moments and, per row, what the hypergradient needs: a fixed
    # 16 kB per site and 100 B per (padded) row: 0.35 |W| on ResNet-20's small sites, 0.02 |W| on resnet18's
    lay = opt._layout
    assert _bytes(small) == 4 * 3 * (lay.site_size + 64 * lay.rows_size)
    assert lay.site_size < 3 * 1400 + 30 and lay.rows_size == 25
    # and nothing of GC-W's lives in the base optimizer's state
    assert all(set(st) <= {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"} for st in opt.base.state.values())


# --- readable statistics -----------------------------------------------------------------------------


def test_format_stats_says_warming_up_then_damped_in_words():
    from gcsurgery.gcw import update_trust
    from gcsurgery.optim import format_stats

    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, lr=0.1, momentum=0.9)
    assert "no observation yet" in opt.format_stats()
    train(model, opt, batches(4))
    text = opt.format_stats()
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["site", "state"] and len(lines) == 2 + len(SITES)
    import re

    assert re.search(r"warming up \([1-3] of 20 observations\)", text)  # the pairs with a proposal so far
    # a long record of harmful proposals: trust drops to 0 and the table says so
    stats = opt.site_state("conv2.weight")["trust_stats"]
    for _ in range(60):
        stats.copy_(update_trust(stats, torch.tensor(-0.3), torch.tensor(True), beta=0.99))
    train(model, opt, batches(1, seed=3))
    row = next(line for line in opt.format_stats().splitlines() if line.startswith("conv2.weight"))
    assert "damped: trust 0.0" in row and opt.gc_stats()["conv2.weight"]["observations"] > 20
    with pytest.raises(GCSurgeryError, match="format_stats takes the dict from GCOptimizer.gc_stats"):
        format_stats([1, 2])
