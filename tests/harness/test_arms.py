"""Arms: specs and variants, the arm's model and sites, and the base optimizers (torch and timm)."""

import copy
import math
import re

import pytest
import torch

from gcsurgery.errors import GCSurgeryError
from gcsurgery.gcw import GCWOptions
from gcsurgery.harness.arms import (
    ALL_ARMS,
    ArmSpec,
    arm_spec,
    build_arm,
    build_optimizer,
    gcw_site_names,
    parse_arm,
)
from gcsurgery.harness.config import RunConfig
from gcsurgery.harness.models import build_model
from gcsurgery.optim import GCOptimizer

SITES = ("layer1.2.conv2.weight", "layer2.2.conv2.weight", "layer3.2.conv2.weight")


def test_arms_start_from_the_same_weights_and_leave_the_rng_alone():
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=10, in_chans=1)
    reference = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    example = torch.zeros(2, 1, 32, 32)
    sites = {}
    for arm in ALL_ARMS:
        net, sites[arm] = build_arm(copy.deepcopy(model), arm, example_inputs=example)
        state = net.state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.items()), arm
        assert any(k.startswith("gc.ode.") for k in state) == (arm in ("gcode", "gcgd"))
        assert net.training and all(m.training for m in net.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert sites["baseline"] == sites["gcode"] == sites["lookahead"] == sites["sam"] == sites["gradcent"] == ()
    assert sites["gcw"] == sites["gcgd"] == SITES


def test_sites_convs_puts_gcw_on_every_convolution():
    model = build_model("cifar_resnet20", in_chans=1)
    _, sites = build_arm(model, parse_arm("gcw:sites=convs"), example_inputs=torch.zeros(2, 1, 32, 32))
    assert len(sites) == 19 and sites[0] == "conv1.weight"


def test_arm_variants_parse_into_options_and_bad_specs_say_how_to_write_them():
    a = parse_arm("gcgd:ode.gate_init=0.1,ode.solver=rk4,gcw.horizons=(5,50),sites=convs", seed=3)
    assert (a.arm, a.sites, a.ode.gate_init, a.ode.solver, a.ode.seed) == ("gcgd", "convs", 0.1, "rk4", 3)
    assert (a.gcw.horizons, a.gcw.seed, a.gcw.rho) == ((5, 50), 3, GCWOptions().rho)
    assert a.filename == "gcgd_ode.gate_init=0.1_ode.solver=rk4_gcw.horizons=_5_50__sites=convs"
    assert parse_arm("lookahead") == ArmSpec("lookahead", "lookahead")
    assert parse_arm("gcode:ode.mode=gradient,ode.fit_clip=inf").ode.fit_clip == math.inf  # no literal for inf
    for spec, says in [
        ("adam", "unknown arm 'adam'"),
        ("lookahead:gcw.lr=0.1", "only ['gcw', 'gcode', 'gcgd'] take options"),
        ("gcgd:ode.gate=1", "cannot read 'ode.gate=1'"),
        ("gcgd:gcw.seed=1", "cannot read 'gcw.seed=1'"),  # seeds come from --seeds
        ("gcw:sites=all", "cannot read 'sites=all'"),
        ("gcode:sites=convs", "the gcode arm has none"),
        ("gcw:gcw.rho=-1", "GCWOptions.rho must be a positive finite number, got -1"),
    ]:
        with pytest.raises(GCSurgeryError, match=re.escape(says)):
            parse_arm(spec)


def test_gcw_and_ode_options_of_a_run_join_its_arm():
    spec = arm_spec(RunConfig(arm="gcgd", gcw="lr=0.01,horizons=(5,50)", ode="gate_init=0.1,solver=rk4", seed=4))
    assert (spec.gcw.lr, spec.gcw.horizons, spec.gcw.seed) == (0.01, (5, 50), 4)
    assert (spec.ode.gate_init, spec.ode.solver, spec.ode.seed) == (0.1, "rk4", 4)
    same = arm_spec(RunConfig(arm="gcgd:gcw.lr=0.01,ode.gate_init=0.1"))
    assert arm_spec(RunConfig(arm="gcgd", gcw="lr=0.01", ode="gate_init=0.1")).gcw == same.gcw
    with pytest.raises(GCSurgeryError, match=r"--gcw 'lr=0.01' sets options of the gcw and gcgd arms.*'gcode'"):
        RunConfig(arm="gcode", gcw="lr=0.01")
    with pytest.raises(GCSurgeryError, match=r"--ode: cannot read 'gate=1'; write KEY=VALUE,.*gate_init"):
        RunConfig(arm="gcgd", ode="gate=1")
    with pytest.raises(GCSurgeryError, match=r"--ode: cannot read 'seed=1'"):
        RunConfig(arm="gcgd", ode="seed=1")


def test_optimizers_from_torch_and_timm():
    model = build_model("cifar_resnet20")
    sgd = build_optimizer(model, lr=0.1, momentum=0.9)
    assert type(sgd) is torch.optim.SGD and len(sgd.param_groups) == 1
    lamb = build_optimizer(model, name="lamb", lr=1e-3, weight_decay=0.01)
    assert type(lamb).__name__ == "Lamb"
    wrapped = build_optimizer(model, name="lion", sites=SITES, lr=1e-4, weight_decay=0.01)
    assert isinstance(wrapped, GCOptimizer) and type(wrapped.base).__name__ == "Lion"
    look = build_optimizer(model, peer="lookahead", lr=0.1)
    assert type(look).__name__ == "Lookahead"
    with pytest.raises(GCSurgeryError, match="unknown optimizer 'lamb2'.*did you mean lamb"):
        build_optimizer(model, name="lamb2", lr=0.1)
    with pytest.raises(GCSurgeryError, match="unknown arm 'gc'"):
        build_arm(torch.nn.Linear(2, 2), "gc", example_inputs=torch.zeros(2, 2))


def test_baseline_site_lr_trains_the_gcw_sites_at_a_scaled_lr_without_a_corrector():
    spec = parse_arm("baseline:site_lr=2")
    assert (spec.arm, spec.site_lr, spec.filename) == ("baseline", 2.0, "baseline_site_lr=2")
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=10, in_chans=1)
    twin = copy.deepcopy(model)
    names = gcw_site_names(model, torch.zeros(2, 1, 32, 32))
    assert names == SITES
    scaled = build_optimizer(model, scaled=(names, spec.site_lr), lr=0.1, momentum=0.9)
    plain = build_optimizer(twin, lr=0.1, momentum=0.9)
    assert type(scaled) is torch.optim.SGD and [g["lr"] for g in scaled.param_groups] == [0.1, 0.2]
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    before = copy.deepcopy(model.state_dict())
    for m, opt in ((model, scaled), (twin, plain)):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if n in names:  # twice the step of plain SGD; every other parameter the same step
            torch.testing.assert_close(before[n] - p, 2 * (before[n] - q), rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(p, q), n
    for bad, says in [("baseline:site_lr=0", "site_lr=X (X > 0"), ("baseline:gcw.lr=1", "got 'gcw.lr=1'")]:
        with pytest.raises(GCSurgeryError, match=re.escape(says)):
            parse_arm(bad)
    with pytest.raises(GCSurgeryError, match="a site_lr group runs plain"):
        build_optimizer(model, scaled=(names, 2.0), sites=names, lr=0.1)
    with pytest.raises(GCSurgeryError, match="does not have: \\['nope'\\]"):
        build_optimizer(model, scaled=(("nope",), 2.0), lr=0.1)
