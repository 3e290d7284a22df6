"""Verified surgery: traps where torch.fx records another program than eager mode runs, caught or kept out.

Each trap is a small hand-written model reproducing a pattern seen in other libraries: MONAI's `UpCat`
(an isinstance check on an optional skip), efficientnet_pytorch's `MemoryEfficientSwish` and gradient
reversal (custom autograd Functions), a grad-mode block, a forward replaced on the instance
(pretrainedmodels), and the backbone idiom `nn.Sequential(*list(resnet.children())[:-2])`.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gcsurgery as gcs
from gcsurgery import GCSurgeryError, Plan
from gcsurgery.verify import compare, flatten


class OptionalSkip(nn.Module):
    """MONAI's pattern: the skip is added only when given. Traced, `skip` is a Proxy and the add vanishes."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, skip=None):
        y = self.conv(x)
        if isinstance(skip, torch.Tensor):
            y = y + skip
        return F.relu(y)


class SkipCat(nn.Module):
    """UpCat: the skip is concatenated when it is a tensor; traced, the conv gets too few channels and fails."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(2 * c, c, 1)

    def forward(self, x, skip=None):
        if torch.jit.isinstance(skip, torch.Tensor):
            x = torch.cat([x, skip], 1)
        return self.conv(x)


class Stage(nn.Module):
    def __init__(self, c, block):
        super().__init__()
        self.block = block(c)

    def forward(self, x):
        return self.block(x, x)


class SwishImplementation(torch.autograd.Function):
    """efficientnet_pytorch's memory-efficient Swish: saves only the input, recomputes in backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s * (1 + x * (1 - s)))


class MemoryEfficientSwish(nn.Module):
    def forward(self, x):
        return SwishImplementation.apply(x)


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.scale * g, None


class RoundST(torch.autograd.Function):
    """Straight-through rounding: round forward, identity backward (traced inline, the gradient is zero)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class FrozenBranch(nn.Module):
    """A residual branch computed without gradient: fx does not record the no_grad block."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        with torch.no_grad():
            y = self.conv(x)
        return x + y


class CachedTable(nn.Module):
    """ConViT's GPSA pattern: a placeholder buffer, replaced on the first call by a table of the input's width."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.register_buffer("table", torch.zeros(1, 1, 1, 1), persistent=False)

    def forward(self, x):
        w = x.shape[-1]
        if self.table.shape[-1] != w:  # traced, a Proxy in a branch: the fallback makes this module a leaf
            self.table = torch.linspace(0.5, 1.5, w).view(1, 1, 1, w)
        return F.relu(self.conv(x) * self.table)


def net(*stages: nn.Module, c: int = 8, head: nn.Module | None = None) -> nn.Sequential:
    """A 3-level CNN: stem, then each stage followed by 2x2 max pooling (the last one by the head)."""
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.ReLU()]
    for i, stage in enumerate(stages):
        layers += [stage] + ([nn.MaxPool2d(2)] if i < len(stages) - 1 else [])
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), head or nn.Linear(c, 5)]
    return nn.Sequential(*layers)


def conv_stage(c: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())


def assert_verified_by_hand(model: nn.Module, gm: nn.Module, x: torch.Tensor) -> None:
    """Outputs and every original parameter's gradient equal in eval and train mode (independent of gcsurgery)."""
    names = [k for k, _ in model.named_parameters()]
    for training in (False, True):
        grads = []
        for m in (model, gm):
            m.train(training)
            torch.manual_seed(0)
            y = m(x)
            params = dict(m.named_parameters())
            loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
            g = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
            grads.append((y.detach(), g))
        (y0, g0), (y1, g1) = grads
        assert torch.equal(y0, y1), f"outputs differ in {'train' if training else 'eval'} mode"
        same = [
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(g0, g1, strict=True)
        ]
        assert all(same), "gradients differ"


@pytest.mark.parametrize("block", [OptionalSkip, SkipCat])
def test_isinstance_branch_is_caught_and_the_block_made_a_leaf(block):
    torch.manual_seed(0)
    model = net(Stage(8, block), conv_stage(), Stage(8, block))
    x = torch.randn(2, 3, 32, 32)
    p = gcs.plan(model, x)
    assert [leaf.module for leaf in p.leaves] == ["2.block", "6.block"]
    assert all("isinstance/type check" in leaf.reason for leaf in p.leaves)
    assert p.verified.startswith("eval and train mode: outputs, buffers and")
    gm = gcs.gcify(model, p)
    assert "the gcified graph too" in gm.gc_plan.verified
    assert_verified_by_hand(model, gm, x)


def test_without_verification_the_isinstance_trap_is_silently_wrong():
    # what verification is for: the same model planned with verify=False computes something else
    torch.manual_seed(0)
    model = net(Stage(8, OptionalSkip), conv_stage(), conv_stage())
    x = torch.randn(2, 3, 32, 32)
    gm = gcs.gcify(model, example_inputs=x, verify=False)
    assert gm.gc_plan.verified == "" and gm.gc_plan.leaves == ()
    model.eval(), gm.eval()
    assert not torch.equal(model(x), gm(x))


@pytest.mark.parametrize(
    ("act", "function"), [(MemoryEfficientSwish, "SwishImplementation_apply"), (None, "GradReverse_apply")]
)
def test_custom_autograd_functions_stay_one_call_with_their_backward(act, function):
    torch.manual_seed(0)
    if act is None:  # gradient reversal before the head, applied in the top-level forward
        body = net(conv_stage(), conv_stage(), conv_stage())

        class Reversed(nn.Module):
            def __init__(self):
                super().__init__()
                self.features, self.head = body[:-1], body[-1]

            def forward(self, x):
                return self.head(GradReverse.apply(self.features(x), 0.5))

        model = Reversed()
    else:
        model = net(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), act()) for _ in range(3)))
    x = torch.randn(2, 3, 32, 32)
    gm = gcs.gcify(model, example_inputs=x)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == function]
    assert calls and gm.gc_plan.leaves == ()
    assert_verified_by_hand(model, gm, x)


def test_straight_through_estimator_keeps_its_gradient():
    class Quantise(nn.Module):
        def forward(self, x):
            return RoundST.apply(x)

    torch.manual_seed(0)
    model = net(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), Quantise()), conv_stage(), conv_stage())
    x = torch.randn(2, 3, 32, 32)
    gm = gcs.gcify(model, example_inputs=x)
    gm.train()
    gm(x).sum().backward()
    assert gm.get_parameter("2.0.weight").grad.abs().sum() > 0  # zero if traced inline: round has no gradient
    assert_verified_by_hand(model, gm, x)


def test_grad_mode_block_is_caught_by_the_gradients():
    torch.manual_seed(0)
    model = net(FrozenBranch(8), conv_stage(), conv_stage())
    x = torch.randn(2, 3, 32, 32)
    p = gcs.plan(model, x)
    assert [leaf.module for leaf in p.leaves] == ["2"]
    assert "gradient of 0.weight differs" in p.leaves[0].reason and "grad-mode block" in p.leaves[0].reason
    assert_verified_by_hand(model, gcs.gcify(model, p), x)


def test_a_divergence_no_leaf_fixes_names_the_place_and_the_fix(capfd):
    class TopLevelCheck(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net(conv_stage(), conv_stage(), conv_stage())

        def forward(self, x):
            y = self.body(x)
            if isinstance(x, torch.Tensor):
                y = y * 2
            return y

    with pytest.raises(GCSurgeryError) as e:
        gcs.plan(TopLevelCheck(), torch.randn(2, 3, 32, 32))
    msg = str(e.value)
    assert "output out differs in eval mode (max abs diff" in msg
    assert "top-level forward" in msg and "isinstance/type check" in msg and "verify=False" in msg
    assert capfd.readouterr().err == ""  # no traceback printed before the error


def test_a_buffer_that_forward_replaces_is_put_back_so_every_run_starts_alike():
    # restoring the placeholder's value into the new table broadcast zeros over it, so every run after the first
    # read a zeroed table: the check compared the eager model's first run with a graph run on other state, refused
    # a faithful ConViT ("output out differs in eval mode") and took this model for a nondeterministic one
    torch.manual_seed(0)
    model = net(conv_stage(), CachedTable(8), conv_stage())
    placeholder = model[4].table
    x = torch.randn(2, 3, 32, 32)
    p = gcs.plan(model, x)
    assert [leaf.module for leaf in p.leaves] == ["4"]
    assert p.verified.startswith("eval and train mode: outputs, buffers and") and "bit-identical" in p.verified
    assert model[4].table is placeholder and torch.equal(placeholder, torch.zeros(1, 1, 1, 1))  # no fake tensor left
    gm = gcs.gcify(model, p)
    assert_verified_by_hand(model, gm, x)


def test_instance_forward_is_refused_with_the_wrapper():
    model = net(conv_stage(), conv_stage(), conv_stage())
    model.forward = lambda x: nn.Sequential.forward(model, x)
    for call in (lambda: gcs.plan(model, (2, 3, 32, 32)), lambda: gcs.gcify(model, example_inputs=(2, 3, 32, 32))):
        with pytest.raises(GCSurgeryError, match=r"(?s)replaced on the instance.*class Wrapped\(torch.nn.Module\)"):
            call()


def test_state_at_the_output_node_gets_a_branch_that_runs_and_trains():
    # the backbone idiom: the last stage's output is the graph's output; its branch used to sit after it
    torch.manual_seed(0)
    model = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])
    x = torch.randn(2, 3, 64, 64)
    gm = gcs.gcify(model, example_inputs=x)
    assert gm.gc_plan.states[-1].node != "output" and len(gm.gc.ode) == 4
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert output.args[0].target == "gc.ode.3"
    assert_trains(gm, x)


def assert_trains(gm: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """Every GC-ODE parameter gets a gradient, and after a few steps the gates have moved and all get one."""
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    gates = [b.gate.detach().clone() for b in gm.gc.ode]
    gm.train()
    for _ in range(steps):
        opt.zero_grad()
        y = gm(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        missing = [k for k, q in gm.named_parameters() if k.startswith("gc.") and q.grad is None]
        assert not missing, f"GC-ODE parameters without a gradient: {missing[:3]}"
        opt.step()
    assert all(not torch.equal(g, b.gate) for g, b in zip(gates, gm.gc.ode, strict=True)), "a gate did not move"
    silent = [k for k, q in gm.named_parameters() if k.startswith("gc.") and not q.grad.abs().sum() > 0]
    assert not silent, f"GC-ODE parameters whose gradient stays zero: {silent[:3]}"


@pytest.mark.parametrize(
    "build",
    [
        lambda: net(conv_stage(), conv_stage(), conv_stage()),
        lambda: net(Stage(8, OptionalSkip), conv_stage(), conv_stage()),
        lambda: net(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), MemoryEfficientSwish()) for _ in range(3))),
    ],
)
def test_every_branch_of_a_gcified_trap_model_trains(build):
    torch.manual_seed(0)
    assert_trains(gcs.gcify(build(), example_inputs=(2, 3, 32, 32)), torch.randn(2, 3, 32, 32))


def test_plans_carry_the_users_leaf_modules(tmp_path):
    torch.manual_seed(0)
    model = net(Stage(8, OptionalSkip), conv_stage(), Stage(8, OptionalSkip))
    p = gcs.plan(model, (2, 3, 32, 32), leaf_modules=[OptionalSkip])
    assert p.leaf_modules == ("2.block", "6.block") and p.leaves == ()  # nothing left for verification to fix
    assert "leaf_modules: 2.block, 6.block" in str(p)
    q = Plan.from_json(p.to_json())
    assert q == p
    gm = gcs.gcify(model, q)  # traced with the plan's leaves, without being told again
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} >= {"2.block", "6.block"}
    gcs.gcify(model, q, leaf_modules=["2.block", "6.block"])  # the same leaves, by name: accepted
    with pytest.raises(GCSurgeryError, match=r"plan was made with leaf_modules covering \['2.block', '6.block'\]"):
        gcs.gcify(model, q, leaf_modules=["2.block"])


def test_outputs_are_compared_everywhere_in_nested_containers():
    @dataclasses.dataclass
    class Output:
        logits: torch.Tensor
        extra: dict

    class Multi(nn.Module):
        def __init__(self, aux_scale):
            super().__init__()
            self.conv, self.aux_scale = nn.Conv2d(3, 4, 3), aux_scale

        def forward(self, x):
            y = self.conv(x)
            return Output(y.mean((2, 3)), {"aux": [y.amax((2, 3)) * self.aux_scale, 3]})

    x = torch.randn(2, 3, 8, 8)
    assert [k for k, _ in flatten(Multi(1.0)(x))] == ["out.logits", "out.extra['aux'][0]", "out.extra['aux'][1]"]
    model, other = Multi(1.0), Multi(2.0)
    other.load_state_dict(model.state_dict())
    assert compare(model, {False: model, True: model}, x).mismatch is None
    mismatch = compare(model, {False: other, True: other}, x).mismatch
    assert mismatch.what == "output out.extra['aux'][0]" and mismatch.mode == "eval"


def test_a_gcified_model_whose_rewrite_differs_is_refused(monkeypatch):
    model = net(conv_stage(), conv_stage(), conv_stage())
    # gates opened on purpose are checked at zero: the rewrite itself is what must be exact
    gm = gcs.gcify(model, example_inputs=(2, 3, 32, 32), ode=gcs.ODEOptions(gate_init=0.5))
    assert all(torch.equal(b.gate, torch.full_like(b.gate, 0.5)) for b in gm.gc.ode)
    monkeypatch.setattr(gcs.GCODE, "forward", lambda self, src, dst: dst * 1.5)  # a branch that is not a no-op
    with pytest.raises(GCSurgeryError, match=r"the gcified Sequential does not compute what the model computes"):
        gcs.gcify(model, example_inputs=(2, 3, 32, 32))
    assert gcs.gcify(model, example_inputs=(2, 3, 32, 32), verify=False).gc_plan.verified == ""
    with pytest.raises(GCSurgeryError, match="verify must be True or False"):
        gcs.plan(model, (2, 3, 32, 32), verify="yes")


def test_a_module_built_inside_forward_is_named_as_such():
    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = net(conv_stage(), conv_stage(), conv_stage())

        def forward(self, x):
            return self.features[:-1](x)

    with pytest.raises(GCSurgeryError, match=r"calls a Sequential that is not one of its submodules at .*test_verify"):
        gcs.plan(Sliced(), (2, 3, 32, 32))


def test_a_failing_graph_prints_no_traceback_before_the_error(capfd):
    torch.manual_seed(0)
    gcs.plan(net(Stage(8, SkipCat), conv_stage(), conv_stage()), (2, 3, 32, 32))  # the traced SkipCat raises
    assert capfd.readouterr().err == ""


class UNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.enc1, self.enc2 = conv_stage(c), conv_stage(c)
        self.stem, self.mid = nn.Conv2d(3, c, 3, padding=1), conv_stage(c)
        self.dec2, self.dec1 = nn.Conv2d(2 * c, c, 3, padding=1), nn.Conv2d(2 * c, 2, 1)

    def forward(self, x):
        e1 = self.enc1(self.stem(x))  # /1
        e2 = self.enc2(F.max_pool2d(e1, 2))  # /2
        m = self.mid(F.max_pool2d(e2, 2))  # /4
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0), e2], 1))
        return self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))  # (B, 2, H, W)


def test_dense_prediction_refusal_says_why_and_what_to_do():
    with pytest.raises(GCSurgeryError, match=r"(?s)a dense prediction.*skip connections.*Plan the encoder alone") as e:
        gcs.plan(UNet(), (2, 3, 32, 32))
    assert "class token" not in str(e.value)


def test_top_level_forward_that_fx_cannot_trace_suggests_the_wrapper():
    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net(conv_stage(), conv_stage(), conv_stage())

        def forward(self, pixel_values, return_dict=True):
            if pixel_values.dim() != 4:
                raise ValueError("pixel_values must be 4-D")
            y = self.body(pixel_values)
            return {"logits": y} if return_dict else (y,)

    with pytest.raises(GCSurgeryError, match=r"top-level Checked.forward.*leaf_modules= cannot help.*wrap the model"):
        gcs.plan(Checked(), (2, 3, 32, 32))
