"""Stage finding and the planner: hidden states, GC-ODE pairs and GC-W sites on real and tiny CNNs."""

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import MLP, TinyConvNeXt, TinyResNet, TinyVGG
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import gcsurgery as gcs
from gcsurgery import GCSurgeryError

RESNET18_SITES = ["layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]


@pytest.mark.parametrize("build", [lambda: torchvision.models.resnet18(), lambda: timm.create_model("resnet18")])
def test_resnet18_has_the_papers_four_pairs(build):
    p = gcs.plan(build(), torch.randn(1, 3, 224, 224))
    assert len(p.ode_pairs) == 4
    assert p.ode_pairs == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert [s.module for s in p.gcw_sites] == RESNET18_SITES
    assert [s.param for s in p.gcw_sites] == [f"{m}.weight" for m in RESNET18_SITES]
    assert [s.reduction for s in p.states] == [2, 4, 8, 16, 32]


@pytest.mark.parametrize("depth", [20, 56])
def test_cifar_resnet_has_the_papers_three_pairs(depth):
    n = (depth - 2) // 6
    p = gcs.plan(gcs.cifar_resnet(depth), torch.randn(1, 3, 32, 32))
    assert len(p.ode_pairs) == 3 and len(p.gcw_sites) == 3
    assert [s.module for s in p.gcw_sites] == [f"layer{i}.{n - 1}.conv2" for i in (1, 2, 3)]
    assert [(s.num_chs, s.reduction) for s in p.states] == [(16, 1), (16, 1), (32, 2), (64, 4)]
    assert p.states[0].node == "relu"  # h0 is the stem output, the input of layer1


def test_torchvision_resnet50_states_match_timm_feature_info():
    p = gcs.plan(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))
    info = timm.create_model("resnet50").feature_info
    assert [(s.num_chs, s.reduction) for s in p.states] == [(f["num_chs"], f["reduction"]) for f in info]
    assert [s.module.split(".")[0] for s in p.states[1:]] == [f["module"] for f in info[1:]]
    assert [s.module for s in p.gcw_sites] == ["layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3", "layer4.2.conv3"]


def test_timm_models_are_cross_checked_against_feature_info():
    p = gcs.plan(timm.create_model("resnet18"))
    assert "matches all 5 stages of timm's feature_info" in p.notes


def test_default_example_input_comes_from_timm_pretrained_cfg():
    model = timm.create_model("test_convnext")
    assert gcs.plan(model).input_shape == (1, *model.pretrained_cfg["input_size"]) == (1, 3, 160, 160)
    assert gcs.plan(TinyResNet(), (1, 3, 32, 32)).input_shape == (1, 3, 32, 32)


def test_channels_come_from_the_first_convolution_and_the_size_from_pretrained_cfg(recwarn):
    p = gcs.plan(timm.create_model("resnet18", in_chans=1), verify=False)
    assert p.input_shape == (1, 1, 224, 224)
    assert p.notes[0].startswith(
        "no example_inputs given: input 1x1x224x224 (size from timm's pretrained_cfg['input_size'] (3, 224, 224), "
        "1 channel from the first convolution 'conv1'); the plan depends on the input size"
    )
    assert not [w for w in recwarn if "input size" in str(w.message)]


class SpaceToDepthNet(nn.Module):
    """A stem that is no convolution and changes the channel count (TResNet, CSATv2's DCT): the image's (B, C, H, W)
    normalized per channel (C weights: no other count runs), then folded to (B, 4C, H/2, W/2) for the first conv."""

    def __init__(self, in_chans=3):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(in_chans))
        self.body = nn.Sequential(nn.Conv2d(4 * in_chans, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.pixel_unshuffle(F.instance_norm(x, weight=self.weight), 2)
        return self.fc(self.stage(self.body(x)).mean((2, 3)))


def test_channels_are_the_first_count_the_model_runs_on_when_no_convolution_reads_the_input():
    model = SpaceToDepthNet()
    model.pretrained_cfg = {"input_size": (3, 32, 32)}
    p = gcs.plan(model, verify=False)
    assert p.input_shape == (1, 3, 32, 32)
    assert (
        "3 channels from timm's pretrained_cfg['input_size']: the input reaches no convolution directly (the first, "
        "'body.0', takes 12) and the model runs on 3);" in p.notes[0]
    )
    one = SpaceToDepthNet(in_chans=1)  # declared 3 channels still, as timm's pretrained_cfg for in_chans=1
    one.pretrained_cfg = {"input_size": (3, 32, 32)}
    p = gcs.plan(one, verify=False)
    assert p.input_shape == (1, 1, 32, 32)
    assert (
        "1 channel assumed (a one-channel image): the input reaches no convolution directly (the first, 'body.0', "
        "takes 4) and the model runs on 1, not on 3, 4);" in p.notes[0]
    )
    with pytest.raises(GCSurgeryError, match=r"running SpaceToDepthNet on an example input of shape \(1, 12, 32, 32"):
        gcs.plan(model, (1, 12, 32, 32), verify=False)  # a wrong input is refused, as before


def test_a_model_that_runs_on_no_candidate_channel_count_asks_for_example_inputs():
    model = SpaceToDepthNet(in_chans=5)  # takes 5 channels: neither the first convolution's 20, nor 3, nor 1
    with pytest.raises(
        GCSurgeryError,
        match=r"runs on none of \[20, 3, 1\] channels at 224x224 \(with 20: .*"
        r"pass example_inputs=\(1, C, H, W\)",
    ):
        gcs.plan(model, verify=False)
    assert gcs.plan(model, (1, 5, 32, 32), verify=False).input_shape == (1, 5, 32, 32)


def test_assumed_size_is_said_in_the_notes_when_the_model_declares_none():
    p = gcs.plan(TinyResNet(in_chans=2), verify=False)
    assert p.input_shape == (1, 2, 224, 224)
    assert (
        "size assumed: the model declares no input size, 2 channels from the first convolution 'stem.0'" in (p.notes[0])
    )
    assert "pass example_inputs=(1, 2, H, W) for yours" in p.notes[0]
    assert not any(n.startswith("no example_inputs") for n in gcs.plan(TinyResNet(), (1, 3, 32, 32)).notes)


def test_size_from_torchvision_weights_kept_on_the_model_and_a_warning_when_declared_sizes_differ():
    model = TinyResNet()
    model.weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1  # crop size 299
    p = gcs.plan(model, verify=False)
    assert p.input_shape == (1, 3, 299, 299)
    assert "from the torchvision weights Inception_V3_Weights.IMAGENET1K_V1 (3, 299, 299)" in p.notes[0]
    model.pretrained_cfg = {"input_size": (3, 64, 64)}
    with pytest.warns(
        UserWarning,
        match=r"declares input size \(3, 64, 64\), but the torchvision weights .* says "
        r"\(3, 299, 299\); planning at 64x64",
    ):
        assert gcs.plan(model, verify=False).input_shape == (1, 3, 64, 64)


def test_differences_from_feature_info_say_why():
    p = gcs.plan(timm.create_model("resnet18"), (1, 3, 32, 32), verify=False)
    assert (
        "differs from timm's feature_info at: layer4 (512 ch, /32) not a state: its map is 1x1 at this input "
        "size (32x32), read as pooled features, not a resolution level; plan with example_inputs of at least "
        "64x64 to have it" in p.notes
    )
    assert (
        "matches all 5 stages of timm's feature_info"
        in gcs.plan(timm.create_model("resnet18"), (1, 3, 64, 64), verify=False).notes
    )
    p = gcs.plan(timm.create_model("efficientnet_b0"), (1, 3, 224, 224), verify=False)
    assert [n for n in p.notes if "feature_info" in n] == [
        "differs from timm's feature_info as intended at: blocks.6 (320 ch, /32): the plan's last state is bn2 "
        "(1280 ch, /32), the last feature map before global pooling, so the last stage's GC-ODE pair and GC-W site "
        "cover the layers after blocks.6 too"
    ]


def test_plan_restores_mode_and_leaves_model_untouched(tiny_resnet):
    before = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    tiny_resnet.eval()
    gcs.plan(tiny_resnet, torch.randn(2, 3, 32, 32))
    assert not tiny_resnet.training
    tiny_resnet.train()
    gcs.plan(tiny_resnet, torch.randn(2, 3, 32, 32))
    assert tiny_resnet.training
    after = tiny_resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in tiny_resnet.modules())
    tiny_resnet.eval()
    gcs.gcify(tiny_resnet, example_inputs=torch.randn(2, 3, 32, 32), inplace=True)
    assert not any(m.training for m in tiny_resnet.modules())


@pytest.mark.parametrize(
    ("model", "reductions"),
    [(TinyResNet(), [1, 1, 2, 4]), (TinyVGG(), [1, 2, 4]), (TinyConvNeXt(), [4, 4, 8, 16])],
)
def test_tiny_models(model, reductions):
    p = gcs.plan(model, torch.randn(2, 3, 32, 32))
    assert [s.reduction for s in p.states] == reductions
    assert p.ode_pairs == tuple((i, i + 1) for i in range(len(reductions) - 1))


def test_gcw_site_is_the_main_path_not_the_projection_shortcut():
    # a stage made of a single downsampling block: its last conv in graph order is the 1x1 shortcut
    model = TinyResNet()
    model.stages[2] = model.stages[2][0]
    p = gcs.plan(model, torch.randn(2, 3, 32, 32))
    assert p.gcw_sites[-1].module == "stages.2.conv2"


def test_error_no_downsampling():
    with pytest.raises(GCSurgeryError, match="no spatial"):
        gcs.plan(MLP(), torch.randn(2, 3, 32, 32))
    with pytest.raises(GCSurgeryError, match="plain ViTs"):
        gcs.plan(timm.create_model("test_vit"))
    # ConvMixer-like: a patchify stem, then one resolution level; the stem and the last map made one same-level pair
    isotropic = nn.Sequential(
        nn.Conv2d(3, 8, 4, 4), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1)
    )
    with pytest.raises(GCSurgeryError, match=r"no spatial downsampling .* at reduction \[4\]"):
        gcs.plan(isotropic, torch.randn(2, 3, 32, 32))
    # ViT-L's patches, reshaped to (B, 1024, 196) before the permute, are not 32x32 tokens at reduction 8
    vit_l = VisionTransformer(image_size=224, patch_size=16, num_layers=1, num_heads=4, hidden_dim=1024, mlp_dim=64)
    with pytest.raises(GCSurgeryError, match=r"no spatial downsampling .* at reduction \[16\]"):
        gcs.plan(vit_l, torch.randn(1, 3, 224, 224))


def test_hrnet_parallel_streams_are_spanned_by_one_pair():
    # the /4../32 streams run side by side; states are cut nodes only: the last map before the split, the merged map
    p = gcs.plan(timm.create_model("hrnet_w18_small"), torch.randn(1, 3, 64, 64))
    assert [(s.module, s.reduction) for s in p.states] == [("act1", 2), ("layer1.0.act3", 4), ("final_layer.2", 32)]
    assert p.ode_pairs == ((0, 1), (1, 2))
    assert "no hidden state at reduction 8, 16" in p.notes[0]


@pytest.mark.parametrize(
    ("name", "kw", "last_blocks"), [("mvitv2_tiny", {"img_size": 64}, (0, 1, 4, 1)), ("pvt_v2_b0", {}, (1, 1, 1, 1))]
)
def test_token_stages_end_where_the_queries_downsample(name, kw, last_blocks):
    # MViTv2's feat_size arithmetic ran beside the tokens and hid every cut node; both models pool keys and values
    # to /32 inside /4 blocks, which is not where a stage ends
    p = gcs.plan(timm.create_model(name, **kw), torch.randn(1, 3, 64, 64))
    assert [s.reduction for s in p.states] == [4, 4, 8, 16, 32]
    assert [s.module for s in p.gcw_sites] == [f"stages.{i}.blocks.{b}.mlp.fc2" for i, b in enumerate(last_blocks)]


def test_attention_maps_are_not_a_resolution_level():
    # CaiT's talking-heads linears mix (B, N, N, heads) attention maps: 64 tokens at 64 px look like reduction 1
    cait = timm.create_model("cait_xxs24_224", depth=2, img_size=64, patch_size=8, embed_dim=24)
    with pytest.raises(GCSurgeryError, match=r"no spatial downsampling .* feature maps at reduction \[8\]"):
        gcs.plan(cait, torch.randn(1, 3, 64, 64))


def test_error_example_input_rank_and_channels(tiny_resnet):
    with pytest.raises(GCSurgeryError, match=r"4-D image batch.*\(3, 32, 32\)"):
        gcs.plan(tiny_resnet, torch.randn(3, 32, 32))
    with pytest.raises(GCSurgeryError, match="has 1 channels.*expects 3"):
        gcs.plan(tiny_resnet, torch.randn(2, 1, 32, 32))
    with pytest.raises(GCSurgeryError, match="must be a tensor"):
        gcs.plan(tiny_resnet, "image")


def test_error_not_a_module():
    with pytest.raises(GCSurgeryError, match="expected a torch.nn.Module"):
        gcs.plan(lambda x: x, torch.randn(1, 3, 32, 32))


class SEBlock(nn.Module):
    """A residual block with squeeze-excitation (timm's, MONAI's and pretrainedmodels' SE alike)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(x)))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))  # (B, C, 1, 1)
        return F.relu(x + y * gate)


def test_gcw_site_is_on_the_main_path_not_the_squeeze_excitation_gate():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), SEBlock(8), nn.MaxPool2d(2), SEBlock(8), nn.MaxPool2d(2), SEBlock(8)
    )
    p = gcs.plan(model, torch.randn(2, 3, 32, 32))
    assert [s.module for s in p.gcw_sites] == ["1.conv2", "3.conv2", "5.conv2"]
    assert [s.module for s in gcs.plan(timm.create_model("seresnet18"), (1, 3, 64, 64)).gcw_sites] == RESNET18_SITES


def test_pooling_along_one_axis_keeps_every_level():
    # a spectrogram CNN pools time only: (16, 128, 128) after the first pool read as NHWC with 128 channels
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d((1, 2))]

    model = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    p = gcs.plan(model, torch.randn(2, 1, 128, 256))
    assert [(s.layout, s.reduction, s.shape) for s in p.states] == [
        ("NCHW", 1, (16, 128, 256)),
        ("NCHW", 2, (32, 128, 128)),
        ("NCHW", 4, (64, 128, 64)),
        ("NCHW", 8, (64, 128, 32)),
    ]
    assert [s.module for s in p.gcw_sites] == ["4", "8"]


def audio_cnn():
    def block(cin, cout):
        return [nn.Conv1d(cin, cout, 3, padding=1), nn.BatchNorm1d(cout), nn.ReLU(), nn.MaxPool1d(2)]

    return nn.Sequential(*block(1, 8), *block(8, 16), *block(16, 16), nn.AdaptiveAvgPool1d(1), nn.Flatten())


def volume_cnn():
    def block(cin, cout):
        return [nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(), nn.MaxPool3d(2)]

    return nn.Sequential(
        *block(1, 8), *block(8, 16), nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1)
    )


def test_1d_and_3d_cnns_get_plans_of_their_own_dimensionality():
    p = gcs.plan(audio_cnn(), torch.randn(2, 1, 256))
    assert [(s.layout, s.reduction, s.shape) for s in p.states] == [
        ("NCL", 1, (8, 256)),
        ("NCL", 2, (16, 128)),
        ("NCL", 4, (16, 64)),
        ("NCL", 8, (16, 32)),
    ]
    assert [s.module for s in p.gcw_sites] == ["4", "8"]
    q = gcs.plan(volume_cnn(), torch.randn(2, 1, 16, 32, 32))
    assert [(s.layout, s.reduction, s.shape) for s in q.states] == [
        ("NCDHW", 1, (8, 16, 32, 32)),
        ("NCDHW", 2, (16, 8, 16, 16)),
        ("NCDHW", 4, (16, 4, 8, 8)),
    ]
    with pytest.raises(GCSurgeryError, match=r"is a 1-D CNN \(Conv1d layers\), which takes \(B, C, L\) batches"):
        gcs.plan(audio_cnn(), torch.randn(2, 1, 16, 16))
    with pytest.raises(GCSurgeryError, match=r"4-D image batch.*unsqueeze"):  # a 2-D model given one image
        gcs.plan(TinyResNet(), torch.randn(3, 32, 32))
