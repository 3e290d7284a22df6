"""Random CNNs for the fuzzer: plain frozen specs, the module each one builds, and hypothesis strategies.

A spec is a stem, stages that downsample by stride-2 convs, pools, slicing, strided residual blocks,
Inception-like reductions or Swin's NHWC patch merging, blocks with residual adds, concatenations, grouped and
depthwise convs, norms, squeeze-excite, stochastic depth, an hourglass detour to a coarser level and back,
stages that run channels-last (NHWC) inside blocks or throughout, and a global-pooling head. `build(spec)`
makes the `nn.Module` with seeded weights; `net_specs()` draws specs.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

NORMS = ("bn", "gn", "none")
ACTS = ("relu", "gelu", "silu", "none")
BLOCKS = ("conv", "residual", "bottleneck", "dwsep", "grouped", "dense", "inception", "nhwc", "se", "droppath")
TRAPS = ("isinstance_skip", "function_act")  # where torch.fx records another program than eager mode runs
NHWC_BLOCKS = ("mlp", "dw")  # blocks of a stage that runs channels-last
DOWNS = ("conv", "patchify", "maxpool", "avgpool", "fmaxpool", "slice", "strided_block", "reduction", "pool_w")
HEADS = ("avgpool", "mean", "amax", "nhwc_mean", "flatten", "features")  # features: no head, a map out


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


class OptionalAdd(nn.Module):
    """MONAI's UpCat pattern: the skip is used only when it is a tensor (a traced value is not)."""

    def __init__(self, c, b: BlockSpec):
        super().__init__()
        self.conv = conv_norm_act(c, c, 3, norm=b.norm, act_kind=b.act)

    def forward(self, x, skip=None):
        y = self.conv(x)
        if isinstance(skip, torch.Tensor):
            y = y + skip
        return y


class IsinstanceSkip(nn.Module):
    def __init__(self, c, b: BlockSpec):
        super().__init__()
        self.body = OptionalAdd(c, b)

    def forward(self, x):
        return self.body(x, x)


class Swish(torch.autograd.Function):
    """efficientnet_pytorch's memory-efficient Swish, with a deliberately different backward (2x) so that a
    traced-inline forward (autograd's own gradient) would show."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return 2 * g * (s * (1 + x * (1 - s)))


class FunctionAct(nn.Module):
    def __init__(self, c, b: BlockSpec):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return Swish.apply(self.conv(x))


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
        "isinstance_skip": IsinstanceSkip,
        "function_act": FunctionAct,
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
    if kind == "pool_w":  # along the width only, like a spectrogram's time axis
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d((1, 2))), cout
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


def down_sizes(kind: str, size: tuple[int, int]) -> tuple[int, int]:
    """Output (h, w) of a downsampling layer."""
    if kind == "pool_w":
        return size[0], size[1] // 2
    return down_size(kind, size[0]), down_size(kind, size[1])


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
        self.fc = nn.LazyLinear(5) if spec.head == "flatten" else nn.Linear(c, 5) if spec.head != "features" else None

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
        elif self.head_kind == "features":  # a backbone: the last feature map is the output
            return x
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
    kinds = BLOCKS + TRAPS + (("hourglass",) if min(size) >= 2 else ())
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
            size = down_sizes(down, size)
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
