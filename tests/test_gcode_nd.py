"""GC-ODE branches for 1-D and 3-D CNNs: exact at insertion, trained, refused where an option does not apply."""

import pytest
import torch
from test_stages import audio_cnn, volume_cnn
from test_verify import assert_trains

import gcsurgery as gcs
from gcsurgery import GCSurgeryError, ODEOptions
from gcsurgery.gcode_nd import GCODEND


@pytest.mark.parametrize(("sizes", "shape"), [(((32,), (16,)), (2, 6, 32)), (((8, 8, 8), (4, 4, 4)), (2, 6, 8, 8, 8))])
def test_branch_is_exact_at_gate_zero_and_moves_once_opened(sizes, shape):
    branch = GCODEND(6, 4, *sizes)
    src = torch.randn(*shape)
    dst = torch.randn(2, 4, *sizes[1])
    assert torch.equal(branch(src, dst), dst)
    opened = GCODEND(6, 4, *sizes, options=ODEOptions(gate_init=0.5))
    out = opened(src, dst)
    assert out.shape == dst.shape and not torch.equal(out, dst)
    out.sum().backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in opened.parameters())


def test_branch_refuses_options_it_does_not_implement_and_wrong_inputs():
    with pytest.raises(GCSurgeryError, match=r"support solver in .*got solver='dopri5'"):
        GCODEND(4, 4, (8,), (4,), options=ODEOptions(solver="dopri5"))
    with pytest.raises(GCSurgeryError, match="1-D or 3-D sizes"):
        GCODEND(4, 4, (8, 8), (4, 4))
    with pytest.raises(GCSurgeryError, match=r"1-D GC-ODE branch takes src of shape \(B, C, L\) with C=4"):
        GCODEND(4, 4, (8,), (4,))(torch.randn(2, 3, 8), torch.randn(2, 4, 4))


@pytest.mark.parametrize(("build", "shape"), [(audio_cnn, (2, 1, 256)), (volume_cnn, (2, 1, 16, 32, 32))])
def test_gcified_1d_and_3d_models_are_verified_and_every_branch_trains(build, shape):
    torch.manual_seed(0)
    model = build()
    gm = gcs.gcify(model, example_inputs=shape)
    assert all(isinstance(b, GCODEND) for b in gm.gc.ode) and "the gcified graph too" in gm.gc_plan.verified
    x = torch.randn(*shape)
    for training in (False, True):
        model.train(training), gm.train(training)
        torch.manual_seed(1)
        y0 = model(x)
        torch.manual_seed(1)
        assert torch.equal(y0, gm(x))
    assert_trains(gm, x)
