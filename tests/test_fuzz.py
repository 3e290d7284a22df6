"""Fuzzing plan + gcify with random CNNs built from hypothesis-drawn specs (`fuzz_models.py`).

Each example is a spec (plain frozen dataclasses) turned into an `nn.Module` with seeded weights: a stem,
stages that downsample in many ways, blocks of many kinds, NCHW and NHWC, and a global-pooling head
(`fuzz_models.py` lists them). For every spec, either `gcify` succeeds, its states lie at the reductions of
the stem's and stages' outputs, the gcified model is bit-exact in eval and train mode (its branches at the
same nodes in both graphs) and trains for a step with gradients reaching the GC-ODE gates; or `plan` refuses
with an informative `GCSurgeryError`, and the model has fewer than two such reductions. Anything else is a bug.

The default suite runs a few dozen derandomized examples; `pytest -m slow tests/test_fuzz.py` runs
GCSURGERY_FUZZ_EXAMPLES (default 2000) random ones.
"""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import branch_site, outputs
from fuzz_models import BlockSpec, FuzzNet, NetSpec, StageSpec, build, net_specs
from hypothesis import HealthCheck, given, settings

import gcsurgery as gcs
from gcsurgery import GCSurgeryError

# -- the property -----------------------------------------------------------------------------------------


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
        y0, buf0 = outputs(model, x, training=training)
        y1, buf1 = outputs(gm, x, training=training)
        mode = "train" if training else "eval"
        assert torch.equal(y0, y1), f"gcified model differs in {mode} mode\n{p}"
        assert buf0.keys() == buf1.keys() and all(torch.equal(buf0[k], buf1[k]) for k in buf0), f"buffers, {mode}"
    if len(gm.graphs) == 2:  # the train graph's branches sit where the eval graph's do
        train, eval_ = ([branch_site(n) for n in g.nodes if str(n.target).startswith("gc.ode.")] for g in gm.graphs)
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
