"""Layouts and shape propagation: which tensors are feature maps, their channels, size and reduction."""

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TinyConvNeXt
from torch import fx, nn

import gcsurgery as gcs
from gcsurgery import GCSurgeryError, layouts
from gcsurgery.shapes import propagate


@pytest.mark.parametrize(
    ("layout", "shape", "chs", "hw"),
    [("NCHW", (8, 4, 6), 8, (4, 6)), ("NHWC", (4, 6, 8), 8, (4, 6)), ("NLC", (16, 8), 8, (4, 4))],
)
def test_channels_and_spatial_size_by_layout(layout, shape, chs, hw):
    assert layouts.channels(layout, shape) == chs
    assert layouts.spatial_size(layout, shape) == hw
    x = torch.randn(2, *shape)
    assert layouts.matches(x, layout, chs, hw)
    assert not layouts.matches(x, layout, chs + 1, hw)
    assert layouts.to_nchw(x, layout, hw).shape == (2, chs, *hw)


def test_to_nchw_is_a_view_and_describe_names_the_shape():
    x = torch.randn(2, 4, 6, 8)  # NHWC
    y = layouts.to_nchw(x, "NHWC", (4, 6))
    assert y.data_ptr() == x.data_ptr() and y.is_contiguous(memory_format=torch.channels_last)
    assert layouts.describe("NCHW", 8, (4, 6)) == "(B, 8, H, W)"
    assert layouts.describe("NHWC", 8, (4, 6)) == "(B, H, W, 8)"
    assert layouts.describe("NLC", 8, (4, 6)) == "(B, 24, 8)"


def test_reduction_rounds_to_a_power_of_two():
    assert layouts.reduction((224, 224), (56, 56)) == 4
    assert [layouts.reduction((299, 299), (s, s)) for s in (35, 17, 8)] == [8, 16, 32]
    assert layouts.reduction((32, 32), (32, 32)) == 1


def test_infer_layout_by_shape_parent_and_permute():
    assert layouts.infer_layout((2, 8, 16, 16), (32, 32), None) == "NCHW"
    assert layouts.infer_layout((2, 16, 16, 8), (32, 32), None) == "NHWC"
    assert layouts.infer_layout((2, 16, 16, 16), (32, 32), "NHWC") == "NHWC"  # a tie: the producer's layout
    assert layouts.infer_layout((2, 16, 16, 16), (32, 32), "NCHW", permute=(0, 2, 3, 1)) == "NHWC"
    assert layouts.infer_layout((2, 64, 8), (32, 32), "NCHW") == "NLC"
    assert layouts.infer_layout((2, 64, 8), (32, 32), None) is None  # tokens only when they come from a map
    assert layouts.infer_layout((2, 10), (32, 32), "NCHW") is None


def test_propagate_gives_nhwc_blocks_their_layout():
    gm = fx.symbolic_trace(TinyConvNeXt())
    infos = propagate(gm, torch.randn(2, 3, 32, 32))
    found = {(i.layout, i.reduction) for i in infos.values() if i.layout}
    assert {("NCHW", 4), ("NHWC", 4), ("NCHW", 8), ("NHWC", 16)} <= found
    assert all(i.channels == (i.shape[1] if i.layout == "NCHW" else i.shape[-1]) for i in infos.values() if i.layout)


def test_propagate_failure_keeps_the_cause():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(7, 2)))
    with pytest.raises(GCSurgeryError, match=r"example input of shape \(2, 3, 8, 8\) failed: RuntimeError"):
        propagate(gm, torch.randn(2, 3, 8, 8))


def test_small_maps_of_a_non_square_input_are_spatial():
    # 22x32 halved three times is 2x4: ratios 11 and 8 by rounding, not another aspect ratio; the /8 stage was lost
    model = nn.Sequential(
        nn.Conv2d(3, 8, 4, 4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    p = gcs.plan(model, torch.randn(2, 3, 22, 32))
    assert [(s.reduction, s.shape) for s in p.states] == [(4, (8, 5, 8)), (8, (8, 2, 4))]


def test_tensors_with_the_batch_folded_in_are_not_feature_maps():
    # TNT's inner pixel tokens are (B*196, 16, C) at 224 px: read as 4x4 maps of the batch, they made a state
    # whose GC-ODE branch failed on batch size; with windows (Swin, HaloNet) folded alike, no level comes from them
    tnt = timm.create_model("tnt_s_legacy_patch16_224", img_size=64, depth=2)
    with pytest.raises(GCSurgeryError, match=r"no spatial downsampling .* feature maps at reduction \[4\]"):
        gcs.gcify(tnt, example_inputs=torch.randn(2, 3, 64, 64))


def test_a_permute_of_an_anisotropic_map_is_read_off_the_op():
    # (B, 8, 8, 4) NCHW after pooling the width only, permuted to (B, 8, 4, 8): no 16x16 input has an 8x4 map at
    # one reduction, so the shape test refused it and the /4 stage was lost (found by the long fuzz run)
    assert layouts.infer_layout((2, 8, 4, 8), (16, 16), "NCHW", permute=(0, 2, 3, 1)) == "NHWC"
    assert layouts.infer_layout((2, 8, 8, 4), (16, 16), "NHWC", permute=(0, 3, 1, 2)) == "NCHW"


def test_a_concatenation_keeps_its_inputs_layout():
    # Inception-like reduction of an anisotropic map: cat of two (B, 4, 8, 4) NCHW maps read as NHWC by its shape
    class Reduce(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, 2, 1)

        def forward(self, x):  # (B, 4, 16, 8)
            return torch.cat([self.conv(x), F.max_pool2d(x, 3, 2, 1)], 1)  # (B, 8, 8, 4)

    gm = fx.symbolic_trace(Reduce())
    infos = propagate(gm, torch.randn(2, 4, 16, 8))
    assert (infos["cat"].layout, infos["cat"].reduction) == ("NCHW", 2)
