"""Shape propagation: every node's output shape, and for feature maps their layout and resolution.

One propagation (fake tensors where the model's ops allow it, the example batch otherwise) gives each
node's output shape. Each 4-D (or square-token 3-D) tensor gets a layout (`layouts.infer_layout`) and a
spatial size, hence a *reduction* relative to the input, rounded to a power of two.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp

from . import layouts
from .errors import GCSurgeryError
from .trace import preserve_buffers

__all__ = ["NodeInfo", "holds_tensor", "permute_dims", "producer_layout", "propagate"]


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """What shape propagation knows of one node's output."""

    shape: tuple[int, ...] | None  # full tensor shape, batch included; None for non-tensors
    layout: str | None = None  # "NCHW" | "NHWC" | "NLC" for spatial tensors
    hw: tuple[int, int] | None = None
    reduction: int | None = None  # input size / spatial size, rounded to a power of two

    @property
    def channels(self) -> int | None:
        return layouts.channels(self.layout, self.shape[1:]) if self.layout else None


def _shape_of(node: fx.Node):
    meta = node.meta.get("val", node.meta.get("tensor_meta"))
    return tuple(meta.shape) if isinstance(meta, torch.Tensor) or hasattr(meta, "dtype") else None


def holds_tensor(value) -> bool:
    """Whether a node's propagated value (a tensor, its metadata, or a container of them) holds a tensor."""
    if isinstance(value, torch.Tensor) or type(value).__name__ == "TensorMetadata":
        return True
    if isinstance(value, list | tuple):
        return any(holds_tensor(v) for v in value)
    return isinstance(value, dict) and any(holds_tensor(v) for v in value.values())


def permute_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a `permute` node (method or function form) when they are constants, else None."""
    dims = None
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 else None
        dims = dims or node.kwargs.get("dims")
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    return tuple(dims) if isinstance(dims, list | tuple) and all(isinstance(d, int) for d in dims) else None


NCHW_MODULES = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.BatchNorm2d,
    nn.InstanceNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
    nn.Upsample,
)
NCHW_FUNCTIONS = frozenset(
    {
        F.conv2d,
        F.conv_transpose2d,
        F.max_pool2d,
        F.avg_pool2d,
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d,
        F.batch_norm,
        F.instance_norm,
        F.interpolate,
        torch.conv2d,
        torch.max_pool2d,
        torch.batch_norm,
    }
)


ND_MODULES = {
    "NCL": (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.MaxPool1d, nn.AvgPool1d),
    "NCDHW": (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.MaxPool3d, nn.AvgPool3d),
}
ND_FUNCTIONS = {
    "NCL": frozenset({F.conv1d, F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, torch.conv1d}),
    "NCDHW": frozenset({F.conv3d, F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, torch.conv3d}),
}
BY_RANK = {
    4: ("NCHW", NCHW_MODULES, NCHW_FUNCTIONS),
    3: ("NCL", (*ND_MODULES["NCL"], nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d), ND_FUNCTIONS["NCL"]),
    5: ("NCDHW", (*ND_MODULES["NCDHW"], nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d), ND_FUNCTIONS["NCDHW"]),
}


def producer_layout(gm: fx.GraphModule, node: fx.Node, ndim: int = 4) -> str | None:
    """The layout an op's output has by the op's contract, whatever its shape looks like: "NCHW" for the 4-D
    output of a 2-D convolution, batch norm, pooling or upsampling (pooling only along time keeps a
    spectrogram's 128 frequency rows), "NCL" / "NCDHW" for their 1-D / 3-D counterparts; None otherwise."""
    if ndim not in BY_RANK:
        return None
    layout, modules, functions = BY_RANK[ndim]
    if node.op == "call_module":
        try:
            module = gm.get_submodule(node.target)
        except AttributeError:
            return None
        return layout if isinstance(module, modules) else None
    if node.op == "call_function" and node.target in functions:
        return layout
    return None


def _same_layout(node: fx.Node, infos: dict, ndim: int) -> bool:
    """Whether every input of `node` is a feature map of one layout and rank `ndim`."""
    ins = [infos.get(a.name) for a in node.all_input_nodes]
    return (
        bool(ins)
        and all(i is not None and i.layout and len(i.shape) == ndim for i in ins)
        and (len({i.layout for i in ins}) == 1)
    )


def propagate(gm: fx.GraphModule, example: torch.Tensor, *, training: bool = False) -> dict[str, NodeInfo]:
    """Runs the model once on `example` (no grad; eval mode unless `training`) and describes every node's output.

    The buffers are left as they were (`preserve_buffers`): train mode counts BatchNorm batches, and a leaf that
    caches a table on its first call would keep a fake tensor.
    """
    was_training = gm.training
    gm.train(training)
    try:
        with torch.no_grad(), preserve_buffers(gm):
            try:  # fake tensors: shapes without compute
                FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(example)
            except Exception:
                for node in gm.graph.nodes:
                    node.meta.pop("val", None)
                ShapeProp(gm).propagate(example)
    except Exception as e:
        raise GCSurgeryError(
            f"running {type(gm).__name__} on an example input of shape {tuple(example.shape)} failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"Pass example_inputs= of the size the model expects (e.g. torch.randn(2, 3, 224, 224))."
        ) from e
    finally:
        gm.train(was_training)
    in_hw = tuple(example.shape[2:])
    nd = {3: "NCL", 5: "NCDHW"}.get(example.dim())  # a 1-D or 3-D model's feature maps
    infos: dict[str, NodeInfo] = {}
    flat: set[str] = set()
    for node in gm.graph.nodes:
        shape = _shape_of(node)
        if shape is None:
            infos[node.name] = NodeInfo(None)
            continue
        if node.op != "placeholder" and (not shape or shape[0] != example.shape[0]):
            infos[node.name] = NodeInfo(shape)  # batch folded with windows, heads or TNT's pixel tokens: no state
            continue
        parent = next((a for a in node.all_input_nodes if infos.get(a.name, NodeInfo(None)).layout), None)
        parent_layout = infos[parent.name].layout if parent is not None else None
        if parent is None and any(a.name in flat for a in node.all_input_nodes):
            parent_layout = "NLC"  # the transpose of a flattened feature map (B, C, H*W) is tokens
        if parent_layout == "NCHW" and shape == (*infos[parent.name].shape[:2], math.prod(infos[parent.name].hw)):
            infos[node.name] = NodeInfo(shape)
            flat.add(node.name)  # (B, C, H*W): a flattened feature map, not tokens, even where C is a square
            continue
        by_op = producer_layout(gm, node, len(shape))
        if by_op in layouts.ND_LAYOUTS and nd is None:
            by_op = None  # a 2-D model's Conv1d (an ECA gate) makes no 1-D feature maps of it
        if node.op == "placeholder":
            layout = nd or "NCHW"
        elif by_op is not None:
            layout = by_op
        elif parent is not None and shape == infos[parent.name].shape and permute_dims(node) is None:
            layout = parent_layout  # elementwise ops, norms, residual adds keep their input's layout
        elif node.op == "call_function" and node.target is torch.cat and _same_layout(node, infos, len(shape)):
            layout = parent_layout  # a concatenation of feature maps of one layout (Inception, DenseNet)
        elif nd is not None:
            layout = None  # 1-D and 3-D maps only by what ops make them
        else:
            layout = layouts.infer_layout(shape, in_hw, parent_layout, permute=permute_dims(node))
        if layout is None:
            infos[node.name] = NodeInfo(shape)
            continue
        hw = layouts.spatial_size(layout, shape[1:])
        infos[node.name] = NodeInfo(shape, layout, hw, layouts.reduction(in_hw, hw))
    return infos
