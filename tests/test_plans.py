"""Plans as data: the printed table (the README's too), JSON, editing, drawings, validation."""

import json
import re
from pathlib import Path

import pytest
import torch
import torchvision

import gcsurgery as gcs
from gcsurgery import GCSurgeryError, Plan


def test_printed_table_is_aligned_and_deterministic(tiny_resnet):
    a = str(gcs.plan(tiny_resnet, torch.randn(2, 3, 32, 32)))
    assert a == str(gcs.plan(tiny_resnet, (2, 3, 32, 32)))
    lines = a.splitlines()
    assert lines[0].startswith("Plan for TinyResNet [") and lines[0].endswith(
        "on input 2x3x32x32: 4 states, 3 GC-ODE pairs, 3 GC-W sites"
    )
    assert lines[1:] == [
        "idx  node     module      chs  red  shape          inserts",
        "h0   stem_2   stem.2        8    1  8x32x32 NCHW   -",
        "h1   relu_3   stages.0.1    8    1  8x32x32 NCHW   ODE0 h0->h1, GC-W stages.0.1.conv2",
        "h2   relu_7   stages.1.1   16    2  16x16x16 NCHW  ODE1 h1->h2, GC-W stages.1.1.conv2",
        "h3   relu_11  stages.2.1   32    4  32x8x8 NCHW    ODE2 h2->h3, GC-W stages.2.1.conv2",
        "(h_i: hidden state; node: fx node, module: the module making it; chs: channels; red: reduction, input size "
        "/ map size; shape: per sample, in its layout; inserts: the GC-ODE pair ending at h_i, the GC-W site of its "
        "stage)",
        "note: traces differently in train and eval mode; the states exist in both graphs",
        "verified: eval and train mode: outputs, buffers and 47 parameter gradients bit-identical to the eager model "
        "on a 2x3x16x16 batch",
    ]


def test_json_round_trip_and_editing(tiny_resnet, tmp_path):
    p = gcs.plan(tiny_resnet, torch.randn(2, 3, 32, 32))
    assert Plan.from_json(p.to_json()) == p
    assert json.loads(p.to_json())["gcw_sites"][0]["param"] == "stages.0.1.conv2.weight"
    q = p.without(pairs=[0], gcw=["stages.2.1.conv2"])
    assert q.ode_pairs == ((1, 2), (2, 3))
    assert [s.module for s in q.gcw_sites] == ["stages.0.1.conv2", "stages.1.1.conv2"]
    assert Plan.from_json(q.to_json()) == q
    assert q.diff(p) == ["+ GC-ODE pair h0->h1", "+ GC-W stages.2.1.conv2.weight"]
    assert p.diff(p) == []
    with pytest.raises(GCSurgeryError, match="no GC-ODE pair 7"):
        p.without(pairs=[7])
    with pytest.raises(GCSurgeryError, match="no GC-W site 'layer9'"):
        p.without(gcw=["layer9"])
    with pytest.raises(GCSurgeryError, match="not a gcsurgery plan"):
        Plan.from_json('{"states": []}')
    with pytest.raises(GCSurgeryError, match="does not parse"):
        Plan.from_json("{")


def test_drawings(tiny_resnet, tmp_path):
    p = gcs.plan(tiny_resnet, torch.randn(2, 3, 32, 32))
    dot = p.to_dot()
    assert dot.startswith("digraph plan {") and "h0 -> h1 [style=dashed" in dot and dot.count("->") == 6
    import matplotlib.figure

    drawn = []
    save = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        drawn.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return save(fig, *args, **kwargs)

    matplotlib.figure.Figure.savefig = savefig
    try:
        p.draw(tmp_path / "plan.png")
    finally:
        matplotlib.figure.Figure.savefig = save
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    boxes = [t for t in drawn if t.startswith("h")]
    assert len(boxes) == 4 and boxes[0] == "h0  /1\nstem.2\n8 ch, 32x32"
    assert [t.splitlines()[-1] for t in boxes[1:]] == [f"GC-W {s.module}" for s in p.gcw_sites]


def test_bad_plan_data_is_refused(tiny_resnet):
    p = gcs.plan(tiny_resnet, torch.randn(2, 3, 32, 32))
    with pytest.raises(GCSurgeryError, match=r"GC-ODE pair \(2, 1\)"):
        Plan(**{**p.__dict__, "ode_pairs": ((2, 1),)})


def test_readme_plan_table_is_what_plan_prints():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```\n\$ gcsurgery plan torchvision:resnet18\n(.*?)\n```", readme, re.S)
    assert block, "the README shows no resnet18 plan"
    assert block.group(1) == str(gcs.plan(torchvision.models.resnet18()))


def test_the_planner_is_importable_from_plans():
    from gcsurgery import plans, stages

    assert plans.plan is stages.plan is gcs.plan
    assert plans.default_example_inputs is stages.default_example_inputs
    with pytest.raises(AttributeError, match="no attribute 'analyze'"):
        plans.analyze  # noqa: B018


# -- the fingerprint: what a plan depends on ------------------------------------------------------------------


def test_a_plan_fits_the_same_body_with_another_head_and_names_the_first_differing_parameter():
    from conftest import TinyResNet

    p = gcs.plan(TinyResNet(num_classes=10), (2, 3, 32, 32), verify=False)
    assert p.fingerprint_format == 2 and p.depends_on[0] == ("stem.0.weight", (8, 3, 3, 3))
    assert not any(name.startswith("fc.") for name, _ in p.depends_on)
    assert Plan.from_json(p.to_json()) == p
    gm = gcs.gcify(TinyResNet(num_classes=5), p)  # another head: the plan fits
    assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(
        GCSurgeryError,
        match=r"made for a TinyResNet \[fingerprint \w+\], but the model is a TinyResNet \[fingerprint \w+\] \(before "
        r"the last state, parameter 'stages.2.0.conv1.weight' is \(32, 16, 3, 3\) in the plan's model and "
        r"\(64, 16, 3, 3\) in this one\)",
    ):
        gcs.gcify(TinyResNet(widths=(8, 16, 64)), p)


def test_a_torchvision_plan_fits_the_model_with_ten_classes():
    p = gcs.plan(torchvision.models.resnet18(), (1, 3, 32, 32), verify=False)
    gm = gcs.gcify(torchvision.models.resnet18(num_classes=10), p, verify=False)
    assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(
        GCSurgeryError, match=r"but the model is a ResNet \[fingerprint \w+\] \(before the last state, "
    ):
        gcs.gcify(torchvision.models.resnet34(), p, verify=False)


def test_old_plans_with_a_whole_state_dict_fingerprint_still_apply():
    from conftest import TinyResNet

    model = TinyResNet()
    d = gcs.plan(model, (2, 3, 32, 32), verify=False).to_dict()
    del d["fingerprint_format"], d["depends_on"]  # a plan written before format 2
    d["fingerprint"] = gcs.plans.fingerprint(model)
    old = Plan.from_dict(d)
    assert old.fingerprint_format == 1
    gcs.gcify(model, old, verify=False)
    with pytest.raises(GCSurgeryError, match=r"old format 1, over the whole state dict with the classifier head"):
        gcs.gcify(TinyResNet(num_classes=5), old, verify=False)
