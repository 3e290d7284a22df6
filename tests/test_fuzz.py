"""Fuzzing plan + gcify with random CNNs built from hypothesis-drawn specs.

Each example is a spec (plain frozen dataclasses) turned into an `nn.Module` with seeded weights: a stem,
stages that downsample by stride-2 convs, pools, slicing, strided residual blocks, Inception-like
reductions or Swin's NHWC patch merging, blocks with residual adds, concatenations, grouped and depthwise
convs, norms, squeeze-excite, stochastic depth, an hourglass detour to a coarser level and back, stages
that run channels-last (NHWC) inside blocks or throughout, and a global-pooling head. For every spec,
either `gcify` succeeds, its states lie at the reductions of the stem's and stages' outputs, the gcified
model is bit-exact in eval and train mode (its branches at the same nodes in both graphs) and trains for a
step with gradients reaching the GC-ODE gates; or `plan` refuses with an informative `GCSurgeryError`, and
the model has fewer than two such reductions. Anything else is a bug.

The default suite runs a few dozen derandomized examples; `pytest -m slow tests/test_fuzz.py` runs
GCSURGERY_FUZZ_EXAMPLES (default 2000) random ones.
"""

import copy
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gcsurgery as gcs
from gcsurgery import GCSurgeryError

NORMS = ("bn", "gn", "none")
ACTS = ("relu", "gelu", "silu", "none")
BLOCKS = ("conv", "residual", "bottleneck", "dwsep", "grouped", "dense", "inception", "nhwc", "se", "droppath")
NHWC_BLOCKS = ("mlp", "dw")  # blocks of a stage that runs channels-last
DOWNS = ("conv", "patchify", "maxpool", "avgpool", "fmaxpool", "slice", "strided_block", "reduction")
HEADS = ("avgpool", "mean", "amax", "nhwc_mean", "flatten")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    kind: str  # one of BLOCKS, or NHWC_BLOCKS in a channels-last stage, or "hourglass"
    norm: str = "bn"
    act: str = "relu"
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class StageSpec:
    down: str | None  # one of DOWNS, None for a stage at the previous resolution
    width: int
    blocks: tuple[BlockSpec, ...]
    channels_last: bool = False  # blocks run in NHWC, and the stage's output stays NHWC


@dataclasses.dataclass(frozen=True)
class NetSpec:
    in_chans: int
    size: tuple[int, int]
    stem: str  # "conv", "conv_s2", "patch2", "patch4", "resnet"
    stem_width: int
    stem_norm: str
    stem_act: str
    stages: tuple[StageSpec, ...]
    head: str
    dropout: float
    seed: int


# -- the module builder -----------------------------------------------------------------------------------


def norm2d(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(c, 2), c)  # at least two channels a group: a 1x1 map still varies
    return nn.Identity()


def act(kind: str) -> nn.Module:
    return {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "none": nn.Identity}[kind]()


def conv_norm_act(cin, cout, k=3, stride=1, *, groups=1, norm="bn", act_kind="relu") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=norm == "none"), norm2d(norm, cout), act(act_kind)
    )


class Residual(nn.Module):
    """ResNet basic block; stride 2 adds a 1x1 projection shortcut."""

    def __init__(self, cin, cout, b: BlockSpec, stride=1):
        super().__init__()
        self.body = nn.Sequential(
            conv_norm_act(cin, cout, 3, stride, norm=b.norm, act_kind=b.act),
            conv_norm_act(cout, cout, 3, norm=b.norm, act_kind="none"),
        )
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm2d(b.norm, cout))
        self.act = act(b.act)

    def forward(self, x):
        return self.act(self.body(x) + (x if self.short is None else self.short(x)))


class Bottleneck(nn.Module):
    def __init__(self, c, b: BlockSpec):
        super().__init__()
        mid = max(b.groups, c // 2 // b.groups * b.groups)
        self.reduce = conv_norm_act(c, mid, 1, norm=b.norm, act_kind=b.act)
        self.conv = conv_norm_act(mid, mid, 3, groups=b.groups, norm=b.norm, act_kind=b.act)
        self.expand = conv_norm_act(mid, c, 1, norm=b.norm, act_kind="none")

    def forward(self, x):
        return F.relu(x + self.expand(self.conv(self.reduce(x))))


class DWSep(nn.Module):
    """MobileNet: depthwise 3x3 then pointwise 1x1, residual when the shape allows."""

    def __init__(self, c, b: BlockSpec):
        super().__init__()
        self.dw = conv_norm_act(c, c, 3, groups=c, norm=b.norm, act_kind=b.act)
        self.pw = conv_norm_act(c, c, 1, norm=b.norm, act_kind="none")

    def forward(self, x):
        return x + self.pw(self.dw(x))


class Dense(nn.Module):
    """DenseNet layer: concatenates its new features to its input."""

    def __init__(self, c, growth, b: BlockSpec):
        super().__init__()
        self.conv = conv_norm_act(c, growth, 3, norm=b.norm, act_kind=b.act)

    def forward(self, x):
        return torch.cat([x, self.conv(x)], 1)


class Inception(nn.Module):
    """Parallel 1x1, 3x3 and pool-1x1 branches, concatenated."""

    def __init__(self, c, b: BlockSpec, outs=(4, 4, 4)):
        super().__init__()
        self.b1 = conv_norm_act(c, outs[0], 1, norm=b.norm, act_kind=b.act)
        self.b3 = nn.Sequential(
            conv_norm_act(c, 4, 1, norm=b.norm, act_kind=b.act), conv_norm_act(4, outs[1], 3, norm=b.norm)
        )
        self.bp = conv_norm_act(c, outs[2], 1, norm=b.norm, act_kind=b.act)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.bp(F.max_pool2d(x, 3, 1, 1))], 1)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv in NCHW, LayerNorm + MLP in NHWC, residual in NCHW."""

    def __init__(self, c, b: BlockSpec):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.act = act(b.act)

    def forward(self, x):  # (B, C, H, W)
        y = self.dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, c, b: BlockSpec):
        super().__init__()
        self.conv = conv_norm_act(c, c, 3, norm=b.norm, act_kind=b.act)
        self.fc1, self.fc2 = nn.Conv2d(c, max(1, c // 4), 1), nn.Conv2d(max(1, c // 4), c, 1)

    def forward(self, x):
        x = self.conv(x)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class DropPathBlock(nn.Module):
    """Residual block with stochastic depth: the forward branches on self.training."""

    def __init__(self, c, b: BlockSpec, p=0.5):
        super().__init__()
        self.conv = conv_norm_act(c, c, 3, norm=b.norm, act_kind=b.act)
        self.p = p

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            keep = (torch.rand_like(y[:, :1, :1, :1]) >= self.p).to(y.dtype)  # (B, 1, 1, 1)
            y = y * keep / (1 - self.p)
        return x + y


class Hourglass(nn.Module):
    """A detour to half the resolution and back, added to the input: no node at the coarser level is a cut node."""

    def __init__(self, c, b: BlockSpec):
        super().__init__()
        self.down = conv_norm_act(c, c, 3, 2, norm=b.norm, act_kind=b.act)
        self.conv = conv_norm_act(c, c, 3, norm=b.norm, act_kind=b.act)

    def forward(self, x):
        y = self.conv(self.down(x))
        return x + F.interpolate(y, size=x.shape[-2:], mode="nearest")


class ChannelMLP(nn.Module):
    """NHWC residual MLP over channels."""

    def __init__(self, c, b: BlockSpec):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.act = act(b.act)

    def forward(self, x):  # (B, H, W, C)
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class NHWCDepthwise(nn.Module):
    """NHWC in and out, a depthwise conv in NCHW inside."""

    def __init__(self, c, b: BlockSpec):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):  # (B, H, W, C)
        return x + self.dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def build_block(b: BlockSpec, c: int) -> tuple[nn.Module, int]:
    """The block and its output channels."""
    if b.kind in ("conv", "grouped"):
        g = math.gcd(c, b.groups) if b.kind == "grouped" else 1
        return conv_norm_act(c, c, 3, groups=g, norm=b.norm, act_kind=b.act), c
    if b.kind == "residual":
        return Residual(c, c, b), c
    if b.kind == "dense":
        return Dense(c, 4, b), c + 4
    if b.kind == "inception":
        return Inception(c, b), 12
    same_width = {
        "bottleneck": Bottleneck,
        "dwsep": DWSep,
        "nhwc": ConvNeXtBlock,
        "se": SqueezeExcite,
        "droppath": DropPathBlock,
        "hourglass": Hourglass,
        "mlp": ChannelMLP,
        "dw": NHWCDepthwise,
    }
    return same_width[b.kind](c, b), c


class Slice2(nn.Module):
    def forward(self, x):
        return x[:, :, ::2, ::2]


class FunctionalMaxPool(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, 3, 2, 1)


class ReductionBlock(nn.Module):
    """Inception-like reduction: a stride-2 conv and a stride-2 max-pool, concatenated."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = conv_norm_act(cin, cout - cin if cout > cin else cout, 3, 2)

    def forward(self, x):
        return torch.cat([self.conv(x), F.max_pool2d(x, 3, 2, 1)], 1)


def build_down(kind: str, cin: int, cout: int) -> tuple[nn.Module, int]:
    """A downsampling layer and its output channels."""
    if kind == "conv":
        return conv_norm_act(cin, cout, 3, 2), cout
    if kind == "patchify":
        return nn.Conv2d(cin, cout, 2, 2), cout
    if kind == "maxpool":
        return nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(cin, cout, 1)), cout
    if kind == "avgpool":
        return nn.AvgPool2d(2), cin
    if kind == "fmaxpool":
        return FunctionalMaxPool(), cin
    if kind == "slice":
        return nn.Sequential(Slice2(), nn.Conv2d(cin, cout, 1)), cout
    if kind == "strided_block":
        return Residual(cin, cout, BlockSpec("residual"), stride=2), cout
    if kind == "reduction":
        block = ReductionBlock(cin, cout)
        return block, block.conv[0].out_channels + cin
    raise AssertionError(kind)


class PatchMerging(nn.Module):
    """Swin's downsampling in NHWC: each 2x2 neighbourhood's channels concatenated, normalised, projected."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.LayerNorm(4 * cin)
        self.proj = nn.Linear(4 * cin, cout, bias=False)

    def forward(self, x):  # (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), cout)
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.proj(self.norm(x))


def down_size(kind: str, n: int) -> int:
    """Output size of a downsampling layer along one spatial dimension of size n."""
    if kind in ("patchify", "maxpool", "avgpool"):
        return n // 2
    return (n - 1) // 2 + 1  # 3x3 stride 2 padding 1, and x[::2]


class ToNHWC(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class ToNCHW(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class FuzzNet(nn.Module):
    def __init__(self, spec: NetSpec):
        super().__init__()
        torch.manual_seed(spec.seed)
        c = spec.stem_width
        if spec.stem in ("conv", "conv_s2"):
            stride = 2 if spec.stem == "conv_s2" else 1
            self.stem = conv_norm_act(spec.in_chans, c, 3, stride, norm=spec.stem_norm, act_kind=spec.stem_act)
        elif spec.stem in ("patch2", "patch4"):
            k = int(spec.stem[-1])
            self.stem = nn.Sequential(nn.Conv2d(spec.in_chans, c, k, k), norm2d(spec.stem_norm, c))
        else:  # "resnet": 5x5 stride 2, norm, act, 3x3 stride 2 max-pool
            self.stem = nn.Sequential(
                conv_norm_act(spec.in_chans, c, 5, 2, norm=spec.stem_norm, act_kind=spec.stem_act),
                nn.MaxPool2d(3, 2, 1),
            )
        stages, nhwc = [], False
        self.layouts = ["NCHW"]  # of the stem's output, then of each stage's
        for s in spec.stages:
            layers = []
            if s.down == "merge":  # NHWC in and out
                layers += [] if nhwc else [ToNHWC()]
                layers.append(PatchMerging(c, s.width))
                c, nhwc = s.width, True
            elif s.down is not None:
                layers += [ToNCHW()] if nhwc else []
                down, c = build_down(s.down, c, s.width)
                layers.append(down)
                nhwc = False
            if s.channels_last != nhwc:
                layers.append(ToNHWC() if s.channels_last else ToNCHW())
                nhwc = s.channels_last
            for b in s.blocks:
                block, c = build_block(b, c)
                layers.append(block)
            stages.append(nn.Sequential(*layers))
            self.layouts.append("NHWC" if nhwc else "NCHW")
        self.stages = nn.Sequential(*stages)
        self.head_kind, self.dropout, self.nhwc = spec.head, spec.dropout, nhwc
        self.head_norm = nn.LayerNorm(c) if spec.head == "nhwc_mean" else None
        self.fc = nn.LazyLinear(5) if spec.head == "flatten" else nn.Linear(c, 5)

    def forward(self, x):
        x = self.stages(self.stem(x))  # (B, C, h, w), or (B, h, w, C) after a channels-last stage
        if self.nhwc and self.head_kind != "nhwc_mean":
            x = x.permute(0, 3, 1, 2)
        elif not self.nhwc and self.head_kind == "nhwc_mean":
            x = x.permute(0, 2, 3, 1)
        if self.head_kind == "avgpool":
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        elif self.head_kind == "mean":
            x = x.mean((2, 3))
        elif self.head_kind == "amax":
            x = x.amax((2, 3))
        elif self.head_kind == "nhwc_mean":
            x = self.head_norm(x.mean((1, 2)))
        else:  # "flatten": no global pooling, the whole last feature map feeds the classifier
            x = torch.flatten(x, 1)
        return self.fc(F.dropout(x, self.dropout, self.training))


def build(spec: NetSpec) -> nn.Module:
    model = FuzzNet(spec)
    if spec.head == "flatten":  # materialise the lazy classifier
        with torch.no_grad():
            model.eval()(torch.zeros(2, spec.in_chans, *spec.size))
        model.train()
    return model


# -- the strategy -----------------------------------------------------------------------------------------


@st.composite
def block_specs(draw, *, channels_last: bool, size: tuple[int, int]) -> BlockSpec:
    if channels_last:
        return BlockSpec(draw(st.sampled_from(NHWC_BLOCKS)), act=draw(st.sampled_from(ACTS)))
    kinds = BLOCKS + (("hourglass",) if min(size) >= 2 else ())
    return BlockSpec(
        draw(st.sampled_from(kinds)),
        norm=draw(st.sampled_from(NORMS)),
        act=draw(st.sampled_from(ACTS)),
        groups=draw(st.sampled_from((1, 2, 4))),
    )


@st.composite
def net_specs(draw) -> NetSpec:
    h = draw(st.integers(16, 32))
    w = draw(st.one_of(st.just(h), st.integers(16, 32)))
    stem = draw(st.sampled_from(("conv", "conv_s2", "patch2", "patch4", "resnet")))
    size = {
        "conv": (h, w),
        "conv_s2": (down_size("conv", h), down_size("conv", w)),
        "patch2": (h // 2, w // 2),
        "patch4": (h // 4, w // 4),
        "resnet": (down_size("conv", down_size("conv", h)), down_size("conv", down_size("conv", w))),
    }[stem]
    stages = []
    for i in range(draw(st.integers(1, 4))):
        down = None
        if min(size) >= 2 and draw(st.booleans() if i == 0 else st.integers(0, 4).map(bool)):
            down = draw(st.sampled_from((*DOWNS, "merge")))
            size = (down_size(down, size[0]), down_size(down, size[1]))
        channels_last = draw(st.integers(0, 5)) == 0 or down == "merge"
        blocks = draw(st.lists(block_specs(channels_last=channels_last, size=size), max_size=3))
        stages.append(StageSpec(down, draw(st.sampled_from((4, 8, 12, 16))), tuple(blocks), channels_last))
    return NetSpec(
        in_chans=draw(st.integers(1, 3)),
        size=(h, w),
        stem=stem,
        stem_width=draw(st.sampled_from((4, 8, 16))),
        stem_norm=draw(st.sampled_from(NORMS)),
        stem_act=draw(st.sampled_from(ACTS)),
        stages=tuple(stages),
        head=draw(st.sampled_from(HEADS)),
        dropout=draw(st.sampled_from((0.0, 0.0, 0.5))),
        seed=draw(st.integers(0, 2**16)),
    )


# -- the property -----------------------------------------------------------------------------------------


def _outputs(model: nn.Module, x: torch.Tensor, *, training: bool):
    """Output and buffers after one forward in the given mode, on a copy, with a fixed RNG."""
    model = copy.deepcopy(model).train(training)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        y = model(x)
    return y, {k: b for k, b in model.named_buffers() if not k.startswith("gc.")}


def _branch_site(node) -> tuple:
    """What a GC-ODE call node reads: (target, enclosing module) of its source and destination states."""
    return tuple(
        (str(a.target), list((a.meta.get("nn_module_stack") or {"": ("",)}).values())[-1][0]) for a in node.args
    )


def stage_levels(model: FuzzNet, spec: NetSpec, x: torch.Tensor) -> list[int]:
    """Reductions (input size / size, rounded to a power of two) of the stem's and the stages' outputs, 1x1 left out."""
    ends = [model.stem, *model.stages]
    sizes = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, out, nhwc=lay == "NHWC": sizes.append(out.shape[1:3] if nhwc else out.shape[2:])
        )
        for m, lay in zip(ends, model.layouts, strict=True)
    ]
    if spec.stem == "resnet":
        hooks.append(model.stem[0].register_forward_hook(lambda m, i, out: sizes.append(out.shape[2:])))
    with torch.no_grad():
        model.eval()(x)
    model.train()
    for hook in hooks:
        hook.remove()
    ratios = [math.sqrt(spec.size[0] * spec.size[1] / (h * w)) for h, w in sizes if (h, w) != (1, 1)]
    return sorted({2 ** max(0, round(math.log2(r))) for r in ratios})


def check(spec: NetSpec) -> str:
    """Runs plan + gcify on the spec's model; returns "exact" or the refusal's message."""
    model = build(spec)
    torch.manual_seed(spec.seed + 1)
    x = torch.randn(2, spec.in_chans, *spec.size)
    levels = stage_levels(model, spec, x)
    before = copy.deepcopy(model.state_dict())
    try:
        gm = gcs.gcify(model, example_inputs=x)
    except GCSurgeryError as e:
        msg = str(e)
        assert len(msg) > 40 and msg.endswith("."), f"uninformative GCSurgeryError: {msg!r}"
        assert type(model).__name__ in msg or str(tuple(x.shape)) in msg, f"the message names no value: {msg!r}"
        assert len(levels) < 2, f"refused a model with stages at reductions {levels}: {msg}"
        return msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "gcify changed the model"
    p = gm.gc_plan
    assert len(p.states) >= 2 and len(gm.gc.ode) == len(p.ode_pairs) >= 1
    assert [s.reduction for s in p.states] == sorted(s.reduction for s in p.states)
    assert sorted({s.reduction for s in p.states}) == levels, f"stages at reductions {levels}, but\n{p}"
    for training in (False, True):
        y0, buf0 = _outputs(model, x, training=training)
        y1, buf1 = _outputs(gm, x, training=training)
        mode = "train" if training else "eval"
        assert torch.equal(y0, y1), f"gcified model differs in {mode} mode\n{p}"
        assert buf0.keys() == buf1.keys() and all(torch.equal(buf0[k], buf1[k]) for k in buf0), f"buffers, {mode}"
    if len(gm.graphs) == 2:  # the train graph's branches sit where the eval graph's do
        train, eval_ = ([_branch_site(n) for n in g.nodes if str(n.target).startswith("gc.ode.")] for g in gm.graphs)
        assert train == eval_, f"branches at other nodes in train mode: {train} vs {eval_}"
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    loss = F.cross_entropy(gm(x), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    gates = [b.gate.grad for b in gm.gc.ode]
    assert all(g is not None and torch.isfinite(g).all() for g in gates), "a GC-ODE gate gets no gradient"
    assert any(g.abs().sum() > 0 for g in gates), "every GC-ODE gate gradient is zero"
    opt.step()
    assert all(torch.isfinite(q).all() for q in gm.parameters())
    return "exact"


class InlineDropPath(nn.Module):
    """A residual conv whose branch is dropped per sample in train mode, written inline (not a leaf module)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            y = y * (torch.rand_like(y[:, :1, :1, :1]) >= 0.5).to(y.dtype)  # (B, 1, 1, 1) mask
        return x + y


class Gated(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


def test_train_graph_nodes_are_named_after_their_eval_counterparts():
    # the train-only `mul` of the drop path took the name `mul` of the eval graph's state (the gate's product),
    # with the same target and shape, so the train graph's branch went to the drop path
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(InlineDropPath(8), Gated(8)),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    x = torch.randn(2, 3, 16, 16)
    gm = gcs.gcify(model, example_inputs=x)
    assert [s.module for s in gm.gc_plan.states] == ["0", "1.1", "3.1"]
    train, eval_ = ([_branch_site(n)[1] for n in g.nodes if str(n.target).startswith("gc.ode.")] for g in gm.graphs)
    assert train == eval_ == [("<built-in function mul>", "1.1"), ("3.1", "3.1")]
    for training in (False, True):
        assert torch.equal(_outputs(model, x, training=training)[0], _outputs(gm, x, training=training)[0])


def test_small_maps_of_a_non_square_input_are_spatial():
    # 22x32 halved three times is 2x4: ratios 11 and 8 by rounding, not another aspect ratio; the /8 stage was lost
    model = nn.Sequential(
        nn.Conv2d(3, 8, 4, 4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    p = gcs.plan(model, torch.randn(2, 3, 22, 32))
    assert [(s.reduction, s.shape) for s in p.states] == [(4, (8, 5, 8)), (8, (8, 2, 4))]


def test_fuzz_builder_is_deterministic():
    spec = NetSpec(
        2, (24, 20), "conv", 8, "bn", "relu", (StageSpec("conv", 8, (BlockSpec("residual"),)),), "mean", 0.0, 3
    )
    a, b = build(spec), build(spec)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(net_specs())
def test_fuzz_gcify_is_exact_or_refused(spec):
    check(spec)


@pytest.mark.slow
@settings(
    max_examples=int(os.environ.get("GCSURGERY_FUZZ_EXAMPLES", "2000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(net_specs())
def test_fuzz_gcify_long(spec):
    check(spec)
