"""GCOptimizer under the categories of torch.optim's own optimizer tests.

Per-group options, grads that are None, ``maximize``, foreach and fused bases, mixed dtypes, ``add_param_group``,
``zero_grad(set_to_none=False)``, gradient accumulation, closures, deepcopy, repr, state-dict round trips and
device moves, and the schedulers that touch more than the lr.
"""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_optim import tiny_cnn
from torch import nn

from gcsurgery.errors import GCSurgeryError
from gcsurgery.gcw import GCWOptions
from gcsurgery.optim import GCOptimizer

SITES = ["conv1.weight", "conv2.weight", "fc.weight"]
ACT = GCWOptions(trust=False)  # corrections act from the second step, so every test sees them at work


def batches(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g).to(dtype), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def loss_of(model, x, y):
    return F.cross_entropy(model(x).float(), y)


def train(model, opt, data, sched=None, set_to_none=True):
    for x, y in data:
        opt.zero_grad(set_to_none=set_to_none)
        loss_of(model, x, y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def same_params(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def acted(opt):
    return max(s["ratio"] for s in opt.gc_stats().values()) > 0


# --- per-group options ---------------------------------------------------------------------------------


def test_sites_in_groups_with_their_own_lr_and_weight_decay():
    model = tiny_cnn()
    groups = [
        {"params": [model.conv1.weight], "lr": 0.0, "weight_decay": 0.1},  # stays put
        {"params": [model.conv2.weight, model.fc.weight], "lr": 0.05, "weight_decay": 0.0},
        {"params": [p for n, p in model.named_parameters() if n not in SITES]},
    ]
    opt = GCOptimizer(model, torch.optim.SGD(groups, lr=0.1, momentum=0.9), sites=SITES, gcw=ACT)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5**s, lambda s: 1.0])
    before = model.conv1.weight.detach().clone()
    train(model, opt, batches(4), sched)
    assert torch.equal(model.conv1.weight, before)
    assert acted(opt) and opt.gc_stats()["conv1.weight"]["ratio"] > 0  # corrected, but lr 0 moves nothing
    # each site's corrector sees its own group's schedule: lr / initial lr
    assert float(opt.site_state("conv2.weight")["feats"][0, -1]) == pytest.approx(0.5**3)
    assert float(opt.site_state("conv1.weight")["feats"][0, -1]) == 1.0  # lr0 = 0: no schedule to follow


def test_a_site_whose_grad_is_none_is_skipped_and_its_state_kept():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, gcw=ACT, lr=0.1, momentum=0.9)
    train(model, opt, batches(3))
    keep = {k: v.clone() for k, v in opt.site_state("conv2.weight").items()}
    w = model.conv2.weight.detach().clone()
    x, y = batches(1, seed=4)[0]
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model.conv2.weight.grad = None
    opt.step()
    assert torch.equal(model.conv2.weight, w)
    assert all(torch.equal(keep[k], v) for k, v in opt.site_state("conv2.weight").items())
    train(model, opt, batches(2, seed=5))  # and the site carries on afterwards
    assert opt.gc_stats()["conv2.weight"]["ratio"] > 0 and torch.isfinite(model.conv2.weight).all()


def test_maximize_keeps_the_hypergradient_sign():
    """Maximising -MSE with SGD(maximize=True) at a tenth of a good lr: GC-W learns to step further."""

    def net():
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))

    def run(gc):
        torch.manual_seed(100)
        teacher = net()
        X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            Y = teacher(X)
        torch.manual_seed(0)
        model = net()
        kw = {"lr": 0.03, "maximize": True}
        opt = GCOptimizer(model, torch.optim.SGD, sites=["0.weight", "3.weight"], **kw) if gc else None
        opt = opt or torch.optim.SGD(model.parameters(), **kw)
        dots = []
        for i in range(120):
            opt.zero_grad()
            objective = -F.mse_loss(model(X), Y)
            objective.backward()
            opt.step()
            if gc and i >= 60:
                dots.append(sum(s["next_grad_dot"] for s in opt.gc_stats().values()))
        return -objective.item(), sum(dots) / max(len(dots), 1)

    plain_loss, _ = run(False)
    gc_loss, dot = run(True)
    assert dot > 0 and gc_loss < 0.97 * plain_loss, (dot, gc_loss, plain_loss)


# --- implementations of the base ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{"foreach": True}, {"foreach": False}, {"fused": True}],
    ids=["foreach", "for-loop", "fused"],
)
def test_foreach_and_fused_adamw(kw):
    kw = {"lr": 1e-2, "weight_decay": 0.05, **kw}
    plain_model, gc_model = tiny_cnn(), tiny_cnn()
    plain = torch.optim.AdamW(plain_model.parameters(), **kw)
    gc = GCOptimizer(gc_model, torch.optim.AdamW, sites=SITES, gcw=ACT, **kw)
    data = batches(6)
    train(plain_model, plain, data[:1])
    train(gc_model, gc, data[:1])
    assert same_params(plain_model, gc_model)  # the first step is the base's own
    train(gc_model, gc, data[1:3])
    buf = io.BytesIO()
    torch.save(gc.state_dict(), buf)
    twin_model = copy.deepcopy(gc_model)
    twin = GCOptimizer(twin_model, torch.optim.AdamW, sites=SITES, gcw=ACT, **kw)
    twin.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    train(gc_model, gc, data[3:])
    train(twin_model, twin, data[3:])
    assert acted(gc) and same_params(gc_model, twin_model)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adamw", "lamb"])
def test_timm_optimizers(name):
    timm_optim = pytest.importorskip("timm.optim")
    model = tiny_cnn()
    base = timm_optim.create_optimizer_v2(model, name, lr=0.01, weight_decay=1e-4)
    opt = GCOptimizer(model, base, sites=SITES, gcw=ACT)
    train(model, opt, batches(4))
    assert acted(opt) and all(torch.isfinite(p).all() for p in model.parameters())
    uses_base = {s.name: s.kind for s in opt._sites}
    assert set(uses_base.values()) == ({"adam"} if name in ("adamw", "lamb") else {"sgd"})


# --- dtypes --------------------------------------------------------------------------------------------


class _Cast(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


def mixed_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        _Cast(torch.bfloat16),
        nn.Linear(192, 16).bfloat16(),
        _Cast(torch.float32),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def test_a_bfloat16_site_in_a_float32_model_trains_and_resumes_exactly():
    data = batches(8)

    def build(seed):
        model = mixed_model(seed)
        return model, GCOptimizer(model, torch.optim.SGD, sites=["2.weight", "5.weight"], gcw=ACT, lr=0.1, momentum=0.9)

    m1, o1 = build(0)
    train(m1, o1, data)
    m2, o2 = build(0)
    train(m2, o2, data[:4])
    ckpt = torch.load(io.BytesIO(_saved({"m": m2.state_dict(), "o": o2.state_dict()})))
    m3, o3 = build(1)
    m3.load_state_dict(ckpt["m"])
    o3.load_state_dict(ckpt["o"])
    st = o3.site_state("2.weight")
    assert st["hist"].dtype == torch.bfloat16 and st["psi"].dtype == torch.float32  # not cast to the weight's dtype
    train(m3, o3, data[4:])
    assert acted(o1) and same_params(m1, m3)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_float64_model_with_a_float64_history():
    gcw = GCWOptions(trust=False, history_dtype="param")
    plain_model, gc_model = tiny_cnn(dtype=torch.float64), tiny_cnn(dtype=torch.float64)
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9)
    gc = GCOptimizer(gc_model, torch.optim.SGD, sites=SITES, gcw=gcw, lr=0.1, momentum=0.9)
    data = batches(4, dtype=torch.float64)
    train(plain_model, plain, data[:1])
    train(gc_model, gc, data[:1])
    assert same_params(plain_model, gc_model)
    train(gc_model, gc, data[1:])
    assert gc.site_state("fc.weight")["hist"].dtype == torch.float64 and acted(gc)


# --- the optimizer's surface ---------------------------------------------------------------------------


def test_add_param_group_after_construction():
    model, head = tiny_cnn(), nn.Linear(4, 4)
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, gcw=ACT, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": head.parameters(), "lr": 0.01})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.base.param_groups
    before = head.weight.detach().clone()
    for x, y in batches(3):
        opt.zero_grad()
        F.cross_entropy(head(model(x)), y).backward()
        opt.step()
    assert not torch.equal(before, head.weight) and opt.sites == tuple(SITES) and acted(opt)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [model.fc.weight]})


def test_zero_grad_without_set_to_none_gives_the_same_trajectory():
    data = batches(5)
    runs = []
    for set_to_none in (True, False):
        model = tiny_cnn()
        opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, gcw=ACT, lr=0.1, momentum=0.9)
        train(model, opt, data, set_to_none=set_to_none)
        runs.append(model)
        if not set_to_none:
            grad = model.conv2.weight.grad
            opt.zero_grad(set_to_none=False)
            assert model.conv2.weight.grad is grad and not grad.any()  # the same tensor, zeroed
    assert same_params(*runs)


def test_gradient_accumulation_over_micro_batches():
    x, y = batches(1)[0]
    runs = []
    for micro in (1, 2):
        model = tiny_cnn()
        model.bn1.eval(), model.bn2.eval()  # batch statistics would differ between micro-batches
        opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, gcw=ACT, lr=0.1, momentum=0.9)
        for _ in range(4):
            opt.zero_grad()
            for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
                (loss_of(model, xs, ys) / micro).backward()
            raw = model.conv2.weight.grad.clone()
            opt.step()
            assert torch.equal(model.conv2.weight.grad, raw)  # the raw gradient is given back after the step
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_step_with_a_closure():
    model, twin = tiny_cnn(), tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, gcw=ACT, lr=0.1)
    ref = GCOptimizer(twin, torch.optim.SGD, sites=SITES, gcw=ACT, lr=0.1)
    for x, y in batches(3):

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        ref.zero_grad()
        ref_loss = loss_of(twin, x, y)
        ref_loss.backward()
        ref.step()
        assert torch.equal(loss, ref_loss)
    assert same_params(model, twin)


def test_deepcopy_continues_identically():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, gcw=ACT, lr=0.1, momentum=0.9)
    train(model, opt, batches(3))
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.base.param_groups[0]["params"][0] is next(model2.parameters())
    assert opt2.param_groups is opt2.base.param_groups
    train(model, opt, batches(3, seed=1))
    train(model2, opt2, batches(3, seed=1))
    assert same_params(model, model2) and acted(opt2)


def test_repr_names_the_base_the_sites_and_the_options():
    text = repr(GCOptimizer(tiny_cnn(), torch.optim.AdamW, sites=SITES, lr=1e-3))
    assert text.startswith("GCOptimizer(base=AdamW, sites=['conv1.weight'") and "GCWOptions(rho=0.5" in text


def test_state_dict_is_keyed_by_parameter_index_like_the_base():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, lr=0.1, momentum=0.9)
    train(model, opt, batches(2))
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params = dict(model.named_parameters())
    assert set(sd["gcw"]["state"]) == {index[id(params[n])] for n in SITES}
    assert set(sd["gcw"]["state"][index[id(params["fc.weight"])]]) == {"hist", "e", "site", "rows"}


def test_loading_onto_another_device_moves_every_tensor():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, gcw=ACT, lr=0.1, momentum=0.9)
    train(model, opt, batches(3))
    sd = torch.load(io.BytesIO(_saved(opt.state_dict())))
    with torch.device("meta"):
        meta_model = tiny_cnn()
    meta = GCOptimizer(meta_model, torch.optim.SGD, sites=SITES, gcw=ACT, lr=0.1, momentum=0.9)
    meta.load_state_dict(sd)
    for name in SITES:
        mine, theirs = meta.site_state(name), opt.site_state(name)
        for k, v in mine.items():
            assert v.device.type == "meta" and v.dtype == theirs[k].dtype and v.shape == theirs[k].shape, k
    assert meta._gcw.site.device.type == "meta" and meta._step == 3
    assert all(v.device.type == "meta" for st in meta.base.state.values() for v in st.values())


def test_a_checkpoint_of_another_layout_is_refused():
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, lr=0.1)
    sd = opt.state_dict()
    sd["gcw"] = {k: v for k, v in sd["gcw"].items() if k != "state"}
    with pytest.raises(GCSurgeryError, match="not from this version of GCOptimizer"):
        opt.load_state_dict(sd)


# --- schedulers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["onecycle", "plateau", "sequential"])
def test_schedulers(which):
    model = tiny_cnn()
    opt = GCOptimizer(model, torch.optim.SGD, sites=SITES, gcw=ACT, lr=0.1, momentum=0.9)
    if which == "onecycle":  # also cycles SGD's momentum, hence GC-W's scale of the momentum direction
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=8)
    elif which == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    else:
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])
    lr0 = opt.param_groups[0].get("initial_lr", 0.1)
    ratios = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches(6):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            opt.step()
            lr = opt.param_groups[0]["lr"]
            assert float(opt.site_state("conv2.weight")["feats"][0, -1]) == pytest.approx(lr / lr0)
            sched.step(1.0) if which == "plateau" else sched.step()  # a flat metric: the lr halves
            ratios.append(max(s["ratio"] for s in opt.gc_stats().values()))
    assert max(ratios) > 0 and all(torch.isfinite(p).all() for p in model.parameters())
    if which == "plateau":
        assert opt.param_groups[0]["lr"] < 0.1
