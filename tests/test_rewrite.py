import copy
import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import TinyConvNeXt, TinyResNet, TinyVGG, WithUntraceable
from torch import nn

import gcsurgery as gcs
from gcsurgery import GCSurgeryError, ODEOptions
from gcsurgery.verify import verification_inputs


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def train_steps(gm, x, *, lr, steps):
    opt = torch.optim.SGD(gm.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()


def assert_exact(model, gm, x):
    for mode in (False, True):
        model.train(mode)
        gm.train(mode)
        torch.manual_seed(3)
        y0 = _first(model(x))
        torch.manual_seed(3)
        y1 = _first(gm(x))
        assert torch.equal(y0, y1), f"gcified model differs in {'train' if mode else 'eval'} mode"


FAST_MODELS = {
    "tiny_resnet": (lambda: TinyResNet(dropout=0.2), (2, 3, 32, 32)),
    "tiny_vgg": (TinyVGG, (2, 3, 32, 32)),
    "tiny_convnext": (TinyConvNeXt, (2, 3, 32, 32)),
    "with_leaf": (WithUntraceable, (2, 3, 32, 32)),
    "cifar_resnet20": (lambda: gcs.cifar_resnet(20), (2, 3, 32, 32)),
    "tv_resnet18": (lambda: torchvision.models.resnet18(), (2, 3, 64, 64)),
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (2, 3, 64, 64)),
    "tv_densenet121": (lambda: torchvision.models.densenet121(), (2, 3, 64, 64)),
    "timm_test_convnext": (lambda: timm.create_model("test_convnext"), (2, 3, 64, 64)),
    "timm_test_efficientnet": (lambda: timm.create_model("test_efficientnet"), (2, 3, 64, 64)),
}


@pytest.mark.parametrize("name", list(FAST_MODELS))
def test_gcify_is_exact_at_insertion_and_every_parameter_gets_a_gradient(name):
    build, shape = FAST_MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape)
    gm = gcs.gcify(model, example_inputs=x)
    assert len(gm.gc.ode) == len(gm.gc_plan.ode_pairs) >= 2
    assert_exact(model, gm, x)
    gm.train()
    _first(gm(x)).sum().backward()
    missing = [n for n, p in gm.named_parameters() if p.grad is None]
    assert not missing
    gates = [p for n, p in gm.named_parameters() if n.endswith(".gate")]
    assert gates and all(g.grad.abs().sum() > 0 for g in gates)


class TokenNet(nn.Module):
    """LeViT's pattern: a convolution stem ending in BatchNorm whose map becomes tokens through a transpose (no copy,
    so the tokens keep NCHW strides through the residual adds), then token blocks and a token subsampling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1),
            nn.BatchNorm2d(16),
            nn.Hardswish(),
            nn.Conv2d(16, 32, 3, 2, 1),
            nn.BatchNorm2d(32),  # the tokens' gradient reaches it through the transpose
        )
        self.pos = nn.Parameter(torch.zeros(1, 256, 32))  # runs at 64x64 only, as LeViT at its size
        self.mlp1 = nn.Sequential(nn.Linear(32, 64), nn.Hardswish(), nn.Linear(64, 32))
        self.mlp2 = nn.Sequential(nn.Linear(32, 64), nn.Hardswish(), nn.Linear(64, 32))
        self.down = nn.Linear(32, 64)
        self.mlp3 = nn.Sequential(nn.Linear(64, 128), nn.Hardswish(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, 256, 32) with the strides of a (B, 32, 16, 16) map
        x = x + self.mlp1(x + self.pos)
        x = x + self.mlp2(x)
        b, _, c = x.shape
        x = self.down(x.view(b, 16, 16, c)[:, ::2, ::2].reshape(b, 64, c))
        x = x + self.mlp3(x)
        return self.head(x.mean(1))


def _branch_sources(gm):
    return [n.args[0] for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("gc.ode.")]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_branch_leaves_the_layout_of_its_sources_gradient_as_the_network_makes_it(seed):
    """A branch sends its source's gradient after the network's (it reads the source through a view taken right after
    it), so autograd adds it into the network's gradient, not the other way round, and the gradient keeps the
    network's layout: read at its destination, the branch's would come first, and its layout (the tokens' NCHW
    strides) reached the stem's BatchNorm, whose weight gradient then summed in another order (about 1e-9 off)."""
    torch.manual_seed(seed)
    model = TokenNet()
    gm = gcs.gcify(model, example_inputs=(1, 3, 64, 64))  # verifies every gradient bit-identical, gates at zero
    assert "; the gcified graph too on a 2x3x64x64 batch (its branches take tokens)" in gm.gc_plan.verified
    order = list(gm.graph.nodes)
    for view in _branch_sources(gm):
        assert view.op == "call_method" and view.target == "view_as"
        assert order.index(view) == order.index(view.args[0]) + 1  # before every other reader of the source
    x = torch.randn(2, 3, 64, 64)
    for mode in (False, True):  # and so with the gates as gcify leaves them, not only in its check
        grads = []
        for net in (model, gm):
            net.train(mode)
            net.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            net(x).square().sum().backward()
            grads.append({k: p.grad for k, p in net.named_parameters() if not k.startswith("gc.")})
        assert grads[0].keys() == grads[1].keys()
        assert all(torch.equal(g, grads[1][k]) for k, g in grads[0].items())
    plain = gcs.strip(gm, keep_ode=False)  # the views go with the branches
    assert not [n for n in plain.graph.nodes if n.op == "call_method" and n.target == "view_as"]
    model.eval(), plain.eval()
    assert torch.equal(plain(x), model(x))


def test_a_gradient_mode_branch_reads_its_source_itself(tiny_resnet, x32):
    """Gradient mode hooks the source tensor the network reads (its injection); a view would never get a gradient."""
    gm = gcs.gcify(tiny_resnet, example_inputs=x32, ode=ODEOptions(mode="gradient"))
    states = {s.node for s in gm.gc_plan.states}
    assert all(src.name in states or src.target.startswith("gc.ode.") for src in _branch_sources(gm))


def test_state_dict_keys_are_kept_and_new_ones_share_one_prefix(tiny_resnet, x32):
    gm = gcs.gcify(tiny_resnet, example_inputs=x32)
    old, new = set(tiny_resnet.state_dict()), set(gm.state_dict())
    assert old <= new
    assert new - old and all(k.startswith("gc.ode.") for k in new - old)
    for k, v in tiny_resnet.state_dict().items():
        assert torch.equal(v, gm.state_dict()[k])


def test_input_model_is_untouched_unless_inplace(tiny_resnet, x32):
    before = copy.deepcopy(tiny_resnet.state_dict())
    gm = gcs.gcify(tiny_resnet, example_inputs=x32)
    train_steps(gm, x32, lr=0.5, steps=2)
    assert all(torch.equal(before[k], v) for k, v in tiny_resnet.state_dict().items())
    shared = gcs.gcify(tiny_resnet, example_inputs=x32, inplace=True)
    assert shared.get_parameter("stem.0.weight") is tiny_resnet.stem[0].weight


def test_branches_train_and_then_change_the_function(tiny_resnet, x32):
    gm = gcs.gcify(tiny_resnet, example_inputs=x32)
    train_steps(gm, x32, lr=0.1, steps=3)
    assert any(p.abs().sum() > 0 for n, p in gm.named_parameters() if n.endswith("gate"))


def test_train_eval_graphs_switch(x32):
    model = TinyResNet(dropout=0.5)
    gm = gcs.gcify(model, example_inputs=x32)
    assert gm.graphs[0] is not gm.graphs[-1]
    gm.eval()
    assert gm.graph is gm.graphs[1] and torch.equal(gm(x32), gm(x32))
    gm.train()
    assert gm.graph is gm.graphs[0]
    torch.manual_seed(0)
    a = gm(x32)
    torch.manual_seed(1)
    assert not torch.equal(a, gm(x32))  # dropout is active in train mode


def test_deepcopy_keeps_plan_and_mode_switching(x32):
    model = TinyResNet(dropout=0.5)
    gm = gcs.gcify(model, example_inputs=x32).eval()
    twin = copy.deepcopy(gm)
    assert twin.gc_plan == gm.gc_plan and not twin.training
    assert torch.equal(twin(x32), gm(x32))
    twin.train()
    assert twin.graph is twin.graphs[0]
    assert twin.get_parameter("gc.ode.0.gate") is not gm.get_parameter("gc.ode.0.gate")


def test_applying_twice_is_refused_and_strip_gives_back_a_plain_model(tiny_resnet, x32):
    gm = gcs.gcify(tiny_resnet, example_inputs=x32)
    with pytest.raises(GCSurgeryError, match="already gcified"):
        gcs.gcify(gm)
    plain = gcs.strip(gm, keep_ode=False)
    assert not gcs.is_gcified(plain) and not any(k.startswith("gc.") for k in plain.state_dict())
    kept = gcs.strip(gm)
    assert not gcs.is_gcified(kept) and any(k.startswith("gc.") for k in kept.state_dict())
    tiny_resnet.eval(), plain.eval(), kept.eval()
    assert torch.equal(plain(x32), tiny_resnet(x32)) and torch.equal(kept(x32), tiny_resnet(x32))
    with torch.no_grad():
        gm.get_parameter("gc.ode.0.gate").fill_(1.0)
    gm.eval()
    assert torch.equal(gcs.strip(gm)(x32), gm(x32))
    assert not torch.equal(gcs.strip(gm, keep_ode=False)(x32), gm(x32))
    gcs.gcify(plain, example_inputs=x32)  # a stripped model can be gcified again
    with pytest.raises(GCSurgeryError, match="returned by gcsurgery.gcify"):
        gcs.strip(tiny_resnet)


def test_plan_for_another_model_is_refused(tiny_resnet, x32):
    p = gcs.plan(TinyVGG(), x32)
    with pytest.raises(GCSurgeryError, match="made for a TinyVGG.*gcsurgery.plan"):
        gcs.gcify(tiny_resnet, p)
    with pytest.raises(GCSurgeryError, match="either plan= or example_inputs="):
        gcs.gcify(tiny_resnet, gcs.plan(tiny_resnet, x32), example_inputs=x32)
    with pytest.raises(GCSurgeryError, match="plan inserts nothing"):
        q = gcs.plan(tiny_resnet, x32)
        gcs.gcify(tiny_resnet, q.without(pairs=range(3), gcw=range(3)))
    with pytest.raises(GCSurgeryError, match="ODEOptions"):
        gcs.gcify(tiny_resnet, example_inputs=x32, ode={"width": 8})


@pytest.fixture
def process_group():
    """A one-process gloo group, which DDP needs to wrap a model."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


WRAPPERS = {
    "ddp": (
        torch.nn.parallel.DistributedDataParallel,
        r"wrapped in DistributedDataParallel; gcify the inner model \(model.module\) before",
    ),
    "data_parallel": (torch.nn.DataParallel, r"wrapped in DataParallel; gcify the inner model \(model.module\)"),
    "compiled": (lambda m: torch.compile(m, backend="eager"), r"torch.compile'd model; gcify the original model"),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("with_plan", [False, True])
def test_wrapped_models_are_refused_with_the_order_to_follow(wrapper, with_plan, tiny_resnet, x32, process_group):
    wrap, pattern = WRAPPERS[wrapper]
    kwargs = {"plan": gcs.plan(tiny_resnet, x32)} if with_plan else {"example_inputs": x32}
    with pytest.raises(GCSurgeryError, match=pattern):
        gcs.gcify(wrap(tiny_resnet), **kwargs)
    with pytest.raises(GCSurgeryError, match=pattern):
        gcs.plan(wrap(tiny_resnet), x32)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"plan": "plan.json"}, r"plan must be a gcsurgery.Plan, got a str; read saved plans with .*Plan.from_json"),
        ({"plan": {"model": "TinyResNet"}}, r"plan must be a gcsurgery.Plan, got a dict; .*Plan.from_dict"),
        ({"plan": [1, 2]}, r"plan must be a gcsurgery.Plan, got list \[1, 2\]; did you mean example_inputs=\.\.\.\?"),
        ({"plan": object()}, r"plan must be a gcsurgery.Plan, got object; build one with gcsurgery.plan\(model\)"),
        ({"example_inputs": "x"}, r"example_inputs must be a tensor .* got str"),
        ({"example_inputs": (2, 3, 32, 32), "inplace": 1}, r"inplace must be True or False, got 1"),
        ({"example_inputs": (2, 3, 32, 32), "leaf_modules": "stem"}, r"leaf_modules must be a list .*\['stem'\]"),
    ],
)
def test_bad_arguments_are_refused(kwargs, pattern, tiny_resnet):
    with pytest.raises(GCSurgeryError, match=pattern):
        gcs.gcify(tiny_resnet, **kwargs)


@pytest.mark.parametrize("given", [(1, 3, 32, 32), torch.Size([1, 3, 32, 32]), torch.randn(1, 3, 32, 32)])
def test_an_example_batch_where_the_plan_goes_asks_for_example_inputs(given, tiny_resnet):
    with pytest.raises(
        GCSurgeryError,
        match=r"did you mean example_inputs=\.\.\.\? .*gcify\(model, example_inputs="
        r".*\(a shape tuple works as well as a tensor\)",
    ):
        gcs.gcify(tiny_resnet, given)


def test_leaf_modules_as_a_lone_name_is_refused_with_a_plan_too(tiny_resnet, x32):
    p = gcs.plan(tiny_resnet, x32, leaf_modules=["stem"])
    with pytest.raises(
        GCSurgeryError, match=r"leaf_modules must be a list .*got 'stem'; pass e.g. leaf_modules=\['stem'\]"
    ):
        gcs.gcify(tiny_resnet, p, leaf_modules="stem")


def test_a_model_with_branches_kept_by_strip_is_refused(tiny_resnet, x32):
    kept = gcs.strip(gcs.gcify(tiny_resnet, example_inputs=x32))  # its old branches live in .gc
    with pytest.raises(GCSurgeryError, match=r"already has a submodule 'gc'.*strip it with keep_ode=False"):
        gcs.gcify(kept, example_inputs=x32)


def test_strip_refuses_wrapped_models_and_non_bool_flags(tiny_resnet, x32, process_group):
    gm = gcs.gcify(tiny_resnet, example_inputs=x32)
    with pytest.raises(GCSurgeryError, match=r"wrapped in DistributedDataParallel; .*strip\(model.module\)"):
        gcs.strip(torch.nn.parallel.DistributedDataParallel(gm))
    with pytest.raises(GCSurgeryError, match=r"keep_ode must be True or False, got 'no'"):
        gcs.strip(gm, keep_ode="no")


def test_a_plan_edited_to_other_shapes_fails_at_gcify_or_the_first_forward(tiny_resnet, x32):
    p = gcs.plan(tiny_resnet, x32)
    wider = dataclasses.replace(p, states=tuple(dataclasses.replace(s, num_chs=s.num_chs + 1) for s in p.states))
    with pytest.raises(GCSurgeryError, match=r"does not compute .* GC-ODE branch takes src of shape \(B, 9, H, W\)"):
        gcs.gcify(tiny_resnet, wider)  # verification runs the rewritten graph
    gm = gcs.gcify(tiny_resnet, wider, verify=False)
    with pytest.raises(GCSurgeryError, match=r"GC-ODE branch takes src of shape \(B, 9, H, W\).*gcsurgery.plan"):
        gm(x32)


def test_edited_plan_inserts_only_what_it_says(tiny_resnet, x32):
    p = gcs.plan(tiny_resnet, x32).without(pairs=[1])
    gm = gcs.gcify(tiny_resnet, p)
    assert len(gm.gc.ode) == 2
    assert sum(n.op == "call_module" and n.target.startswith("gc.ode") for n in gm.graph.nodes) == 2
    assert_exact(tiny_resnet, gm, x32)


def test_plan_at_one_size_runs_at_another(x32):
    model = gcs.cifar_resnet(20)
    gm = gcs.gcify(model, example_inputs=torch.randn(1, 3, 64, 64))
    assert_exact(model, gm, torch.randn(2, 3, 28, 28))


def test_dtype_device_channels_last_and_autocast(tiny_resnet, x32):
    model = tiny_resnet.double()
    gm = gcs.gcify(model, example_inputs=x32.double())
    assert all(p.dtype == torch.float64 for p in gm.parameters())
    assert_exact(model, gm, x32.double())
    model, gm = model.float(), gm.float()
    xc = x32.to(memory_format=torch.channels_last)
    assert_exact(model.to(memory_format=torch.channels_last), gm.to(memory_format=torch.channels_last), xc)
    gm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gm(x32)
    y.float().sum().backward()
    assert torch.isfinite(y.float()).all()


def test_ode_options_reach_every_branch(tiny_resnet, x32):
    gm = gcs.gcify(tiny_resnet, example_inputs=x32, ode=ODEOptions(solver="rk4", width=4))
    assert all(b.options.solver == "rk4" and b.width == 4 for b in gm.gc.ode)
    assert gm.gc_ode == ODEOptions(solver="rk4", width=4)


def test_torch_compile_matches_eager(x32):
    torch.manual_seed(0)
    model = TinyResNet()
    gm = gcs.gcify(model, example_inputs=x32)
    with torch.no_grad():
        for p in gm.gc.parameters():
            p.add_(0.1)
    gm.eval()
    compiled = torch.compile(gm, backend="aot_eager")  # the graph capture; inductor is slow to build on CPU
    torch.testing.assert_close(compiled(x32), gm(x32), rtol=1e-5, atol=1e-5)


def test_timm_model_ema_of_a_gcified_model(x32):
    from timm.utils import ModelEmaV3

    gm = gcs.gcify(TinyResNet(dropout=0.5), example_inputs=x32)
    ema = ModelEmaV3(gm, decay=0.5)
    assert gcs.is_gcified(ema.module) and ema.module.gc_plan == gm.gc_plan and not ema.module.training
    with torch.no_grad():
        gm.get_parameter("gc.ode.0.gate").fill_(1.0)
    ema.update(gm)
    assert torch.allclose(ema.module.get_parameter("gc.ode.0.gate"), torch.full_like(gm.gc.ode[0].gate, 0.5))
    assert torch.equal(ema.module(x32), ema.module(x32))  # the EMA copy runs its eval graph


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map, run channels-last (its gradient comes out channels-last)."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _DownBlock(nn.Module):
    """A CoAtNet-style attention block entry at stride 2: pooled shortcut plus a channels-last norm path."""

    def __init__(self, cin, cout):
        super().__init__()
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.norm = _LayerNorm2d(cin)
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.shortcut(F.avg_pool2d(x, 2)) + self.proj(F.avg_pool2d(self.norm(x), 2))


class _ChannelsLastGradNet(nn.Module):
    """A state (conv's output, contiguous) whose gradient from the network is channels-last."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.conv = nn.Conv2d(16, 32, 3, 2, 1)
        self.block1 = _DownBlock(32, 64)
        self.block2 = _DownBlock(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.conv(self.stem(x)))).mean((2, 3)))


def test_a_branch_keeps_the_layout_and_so_the_bits_of_its_sources_gradient():
    # The branch runs after dst, so its gradient for src used to arrive first and the network's was added to it:
    # a contiguous sum where the eager gradient is channels-last, and bias gradients summed in another order.
    torch.manual_seed(0)
    model = _ChannelsLastGradNet()
    gm = gcs.gcify(model, example_inputs=(1, 3, 64, 64))  # verified: raised on block1.shortcut.bias before
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    grads, strides = [], []
    for net in (model, gm):
        seen = []
        hook = net.get_submodule("conv").register_full_backward_hook(lambda m, gi, go, seen=seen: seen.append(go[0]))
        net.zero_grad()
        net(x).square().sum().backward()
        hook.remove()
        strides.append(seen[0].stride())
        grads.append({n: p.grad for n, p in net.named_parameters() if not n.startswith("gc.")})
    assert strides[0] == strides[1] and seen[0].is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(g, grads[1][n]) for n, g in grads[0].items())
    assert all(p.grad is not None for n, p in gm.named_parameters() if n.startswith("gc."))
    plain = gcs.strip(gm, keep_ode=False)
    assert not [n for n in plain.graph.nodes if n.op == "call_method" and n.target == "view_as"]


def test_a_view_made_first_passes_the_branch_gradient_on_after_the_networks():
    w = torch.randn(2, 6, 6, 8)

    def network(t):  # channels-last gradient
        return (t.permute(0, 2, 3, 1) * w).sum()

    def branch(t):  # contiguous gradient, made after the network's ops: its backward runs first
        return (t * torch.arange(8.0)[:, None, None]).square().sum()

    def grad(build):
        src = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0)).requires_grad_() * 1.0
        return torch.autograd.grad(build(src), src)[0]

    plain = grad(lambda s: network(s) + branch(s))
    alone = grad(network)

    def aliased(s):
        alias = s.view_as(s)  # made right after src, as gcify places the branch's source view
        return network(s) + branch(alias)

    deferred = grad(aliased)
    assert plain.is_contiguous() and not alone.is_contiguous() and deferred.stride() == alone.stride()
    assert torch.equal(plain, deferred)  # the same sum, in the network gradient's layout
    assert torch.equal(grad(lambda s: branch(s.view_as(s))), grad(branch))


class _TokenStage(nn.Module):
    """Pools a (B, H*W, C) token grid 2x and mixes its channels, like MViT's pooled stages."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.LayerNorm(cin)
        self.fc = nn.Linear(cin, cout)

    def forward(self, x):
        b, n, c = x.shape
        side = int(n**0.5)
        x = F.avg_pool2d(x.transpose(1, 2).reshape(b, c, side, side), 2).flatten(2).transpose(1, 2)
        return self.fc(self.norm(x))


class _TokenNet(nn.Module):
    """A token (NLC) model that runs at any input size, so the shrunk verification batch runs in eager mode."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.stage1 = _TokenStage(16, 32)
        self.stage2 = _TokenStage(32, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.stage2(self.stage1(x)).mean(1))


def test_token_branches_are_verified_at_the_plans_size():
    # The plan's own check runs on the shrunk 16x16 batch (4x4 tokens); the branches take the plan's 16x16 tokens
    # only, so the gcified graph used to raise there, and gcify refused the model.
    torch.manual_seed(0)
    model = _TokenNet()
    plan = gcs.plan(model, example_inputs=(1, 3, 64, 64))
    assert any(s.layout == "NLC" for pair in plan.ode_pairs for s in (plan.states[pair[0]], plan.states[pair[1]]))
    assert "on a 2x3x16x16 batch" in plan.verified
    gm = gcs.gcify(model, plan)
    assert gm.gc_plan.verified.endswith("the gcified graph too on a 2x3x64x64 batch (its branches take tokens)")
    assert gcs.gcify(model, gm.gc_plan).gc_plan.verified == gm.gc_plan.verified  # said once, also when re-gcified
    assert_exact(model, gm, torch.randn(2, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    assert [tuple(b.shape) for b in verification_inputs(x)] == [(2, 3, 16, 16), (2, 3, 64, 64)]
    assert [tuple(b.shape) for b in verification_inputs(x, shrink=False)] == [(2, 3, 64, 64)]
