"""Tensor layouts: the one place that knows where a feature map keeps its channels and its spatial size.

A feature map is "NCHW" (B, C, H, W), "NHWC" (B, H, W, C) — ConvNeXt's and Swin's channels-last blocks —
or "NLC" (B, H·W, C) tokens of a square grid. Shape propagation asks which layout a tensor has
(`infer_layout`), the planner reads channels, spatial size and reduction off a layout and a shape, and the
GC-ODE branch checks its inputs against a layout and views them as NCHW. Shapes here are without the batch
dimension unless a name says otherwise.
"""

import math

import torch

__all__ = [
    "LAYOUTS",
    "ND_LAYOUTS",
    "PERMUTE_TO_NCHW",
    "PERMUTE_TO_NHWC",
    "channels",
    "describe",
    "infer_layout",
    "is_point",
    "matches",
    "plausible",
    "reduction",
    "spatial_size",
    "to_nchw",
]

LAYOUTS = ("NCHW", "NHWC", "NLC")  # 2-D feature maps
ND_LAYOUTS = {"NCL": 1, "NCDHW": 3}  # 1-D (audio, time series) and 3-D (volumes, video) maps: their dimensionality
PERMUTE_TO_NHWC = (0, 2, 3, 1)
PERMUTE_TO_NCHW = (0, 3, 1, 2)


def channels(layout: str, shape: tuple[int, ...]) -> int:
    """Channels of a feature map of `shape` (no batch) in `layout`."""
    return shape[0] if layout == "NCHW" or layout in ND_LAYOUTS else shape[-1]


def spatial_size(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """(H, W) of a feature map of `shape` (no batch) in `layout`; NLC tokens form a square grid. (L,) and
    (D, H, W) for the 1-D and 3-D layouts."""
    if layout in ND_LAYOUTS:
        return tuple(shape[1:])
    if layout == "NCHW":
        return shape[1], shape[2]
    if layout == "NHWC":
        return shape[0], shape[1]
    side = math.isqrt(shape[0])
    return side, side


def is_point(size: tuple[int, ...]) -> bool:
    """Whether a spatial size is a single position (global pooling's output)."""
    return all(s == 1 for s in size)


def reduction(in_hw: tuple[int, ...], hw: tuple[int, ...]) -> int:
    """Input size / spatial size, rounded to a power of two (Inception's 8.5, 17.6, 37.4 give 8, 16, 32); of the
    most reduced side, so that pooling along one axis only (a spectrogram's time) still counts every level."""
    if len(in_hw) != len(hw):
        return 1
    ratio = max(a / b for a, b in zip(in_hw, hw, strict=True))
    return 2 ** max(0, round(math.log2(ratio))) if ratio > 0 else 1


def plausible(in_hw: tuple[int, int], h: int, w: int) -> bool:
    """Whether (h, w) can be a spatial size of a network fed `in_hw` (same aspect ratio, not larger).

    Halving a size k times rounds it down or up, which skews the aspect ratio of small maps: a 22x32 input has
    2x4 maps at /8 (ratios 11 and 8), so those sizes count too.
    """
    if h < 1 or w < 1 or h > in_hw[0] or w > in_hw[1]:
        return False
    rh, rw = in_hw[0] / h, in_hw[1] / w
    if max(rh, rw) / min(rh, rw) < 1.35 or (h <= 2 and w <= 2):
        return True
    n, m = in_hw
    return any(h in (n >> k, -(-n >> k)) and w in (m >> k, -(-m >> k)) for k in range(1, max(n, m).bit_length()))


def infer_layout(
    shape: tuple[int, ...], in_hw: tuple[int, int], parent_layout: str | None, *, permute: tuple[int, ...] | None = None
) -> str | None:
    """Layout of a tensor of `shape` (batch included), or None when it is no feature map.

    Args:
        shape: the tensor's shape.
        in_hw: the network input's spatial size.
        parent_layout: the layout of the producing op's first feature-map input, if any.
        permute: the dims when the producing op is a permute (`permute(0, 2, 3, 1)` makes NCHW NHWC).
    """
    if len(shape) == 4:
        _, a, b, c = shape
        nchw, nhwc = plausible(in_hw, b, c), plausible(in_hw, a, b)
        if permute is not None and parent_layout in ("NCHW", "NHWC"):
            flips = {("NCHW", PERMUTE_TO_NHWC): "NHWC", ("NHWC", PERMUTE_TO_NCHW): "NCHW"}
            flipped = flips.get((parent_layout, tuple(d % 4 for d in permute)))
            if flipped:  # the op says it: no need for the shape to look like one (anisotropic maps do not)
                return flipped
        if nchw and nhwc:
            if parent_layout in ("NCHW", "NHWC"):
                return parent_layout
            return "NCHW" if c > 1 or a == 1 else "NHWC"
        if nchw:
            return "NCHW"
        if nhwc:
            return "NHWC"
        return None
    if len(shape) == 3 and parent_layout in LAYOUTS:
        side = math.isqrt(shape[1])
        if side * side == shape[1] and side > 1 and plausible(in_hw, side, side):
            return "NLC"
    return None


def matches(t: torch.Tensor, layout: str, chs: int, size: tuple[int, int]) -> bool:
    """Whether `t` is a batch of feature maps with `chs` channels in `layout` (NLC: of `size` tokens too)."""
    if layout == "NLC":
        return t.dim() == 3 and t.shape[1] == size[0] * size[1] and t.shape[2] == chs
    return t.dim() == 4 and t.shape[1 if layout == "NCHW" else 3] == chs


def describe(layout: str, chs: int, size: tuple[int, int]) -> str:
    """The shape `matches` accepts, for messages: "(B, 64, H, W)"."""
    if layout == "NLC":
        return f"(B, {size[0] * size[1]}, {chs})"
    return f"(B, {chs}, H, W)" if layout == "NCHW" else f"(B, H, W, {chs})"


def to_nchw(x: torch.Tensor, layout: str, size: tuple[int, int]) -> torch.Tensor:
    """A (B, C, H, W) view of `x` (NHWC and NLC give channels_last strides, no copy)."""
    if layout == "NHWC":
        return x.permute(0, 3, 1, 2)
    if layout == "NLC":
        return x.transpose(1, 2).unflatten(2, size)
    return x
