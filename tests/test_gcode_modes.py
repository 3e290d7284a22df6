"""The GC-ODE designs beside the paper's branch: no ODE solve (a linear shortcut) and the gradient-only mode."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gcsurgery
from gcsurgery.gcode import GCODE, ODEOptions, neutral
from gcsurgery.harness.models import build_model


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 16, 4, 4, generator=g)


def test_solver_none_is_a_linear_shortcut_without_phi():
    branch = GCODE(8, 16, (8, 8), (4, 4), options=ODEOptions(solver="none", gate_init=0.5))
    assert branch.phi is None and branch.nfe == 0
    src, dst = _pair()
    z = F.conv2d(src[:, :, ::2, ::2], branch.reduce.weight, branch.reduce.bias)  # R: every 2nd position, then 1x1
    want = dst + 0.5 * F.conv2d(z, branch.expand.weight, branch.expand.bias)  # E, gated
    torch.testing.assert_close(branch(src, dst), want)
    branch(src, dst).sum().backward()
    assert all(p.grad is not None for p in branch.parameters())


def test_out_clip_bounds_each_samples_correction_by_its_dst_and_counts_it():
    src, dst = _pair()
    free = GCODE(8, 16, (8, 8), (4, 4), options=ODEOptions(gate_init=1.0))
    e = (free(src, dst) - dst).detach()  # the unbounded correction
    ratio = e.flatten(1).norm(dim=1) / dst.flatten(1).norm(dim=1)
    clip = float(ratio.mean())  # between the two samples' ratios: one is scaled down, the other kept
    assert ratio.min() < clip < ratio.max()
    bounded = GCODE(8, 16, (8, 8), (4, 4), options=ODEOptions(gate_init=1.0, out_clip=clip))
    bounded.load_state_dict(free.state_dict())
    out = bounded(src, dst)
    big = int(ratio.argmax())
    k = clip * dst[big].norm() / e[big].norm()
    torch.testing.assert_close(out[big], dst[big] + k * e[big])  # scaled to clip x its dst's norm
    assert torch.equal(out[1 - big], free(src, dst)[1 - big])  # where it does not bind: bit-identical
    assert bounded.fit_stats() == {"capped": 1}  # one sample, one training forward
    out.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in bounded.parameters())
    with torch.no_grad():
        bounded(src, dst)
    assert bounded.fit_stats() == {"capped": 1}  # counted in training forwards only
    assert "capped" not in bounded.state_dict()  # a count, not a weight


def test_out_clip_keeps_a_gcified_model_exact_at_insertion_and_reports_through_the_harness():
    from gcsurgery.harness.loop import ode_summary

    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=10, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    gm = gcsurgery.gcify(model, example_inputs=x, ode=ODEOptions(out_clip=1.0))  # gcify verifies it exact
    model.eval(), gm.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert ode_summary(gm) == {f"gc.ode.{i}": {"capped": 0} for i in range(3)}
    assert ode_summary(gcsurgery.gcify(model, example_inputs=x)) is None  # no bound, nothing to report


class Chain(nn.Module):
    """src -> stage -> dst -> head, with a gradient-mode branch across the stage."""

    def __init__(self, options: ODEOptions):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.branch = GCODE(8, 16, (8, 8), (4, 4), options=options)
        self.head = nn.Linear(16, 3)

    def forward(self, x, *, with_branch: bool = True):
        src = self.stem(x)
        dst = self.stage(src)
        out = self.branch(src, dst) if with_branch else dst
        return self.head(out.mean((2, 3))), src, out, dst


def _grads(model, x, y, *, with_branch: bool):
    model.zero_grad()
    logits, src, out, dst = model(x, with_branch=with_branch)
    src.retain_grad()
    F.cross_entropy(logits, y).backward()
    return logits, src.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out, dst


def _mse_grads(model, x):
    """The branch's parameters' gradients of mean((E(z1) - dst)²), unclipped, from a copy of it."""
    ref = copy.deepcopy(model.branch)
    with torch.no_grad():
        src = model.stem(x)
        dst = model.stage(src)
    F.mse_loss(ref._output(src, dst), dst).backward()
    return [q.grad for q in ref.parameters()]


def test_gradient_mode_forward_is_the_stage_and_backward_adds_a_bounded_vjp():
    torch.manual_seed(0)
    model = Chain(ODEOptions(mode="gradient", inject=0.2, inject_warmup=2))
    assert "gate" not in dict(model.branch.named_parameters()) and "steps" in model.branch.state_dict()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    plain = _grads(model, x, y, with_branch=False)
    for step in range(3):
        logits, src_grad, grads, out, dst = _grads(model, x, y, with_branch=True)
        assert out is dst and torch.equal(logits, plain[0])  # the forward is the network's, at every step
        assert torch.equal(grads["head.weight"], plain[2]["head.weight"])  # downstream of dst: untouched
        assert torch.equal(grads["stage.0.weight"], plain[2]["stage.0.weight"])
        extra = src_grad - plain[1]
        if step == 0:  # the warm-up starts at 0: exactly the network's gradient
            assert torch.equal(src_grad, plain[1]) and torch.equal(grads["stem.weight"], plain[2]["stem.weight"])
        else:  # ramps to the bound: ‖injected‖ <= (step / warmup) · inject · ‖network's gradient at src‖
            assert 0 < extra.norm() <= min(1, step / 2) * 0.2 * plain[1].norm() * (1 + 1e-5)
            assert not torch.equal(grads["stem.weight"], plain[2]["stem.weight"])
    # the branch learns to mimic the stage: its gradient is that of mean((E(z1) - dst)²) alone
    for (n, p), g in zip(model.branch.named_parameters(), _mse_grads(model, x), strict=True):
        torch.testing.assert_close(p.grad, g, msg=n)  # below fit_clip (1): not clipped


def test_gradient_mode_clips_the_regression_and_keeps_a_diverged_branch_out_of_the_network():
    torch.manual_seed(0)
    model = Chain(ODEOptions(mode="gradient", inject_warmup=0, fit_clip=1e-4))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    plain = _grads(model, x, y, with_branch=False)
    want = _mse_grads(model, x)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want]))
    assert norm > 1e-4
    _, src_grad, grads, _, _ = _grads(model, x, y, with_branch=True)
    for (n, p), g in zip(model.branch.named_parameters(), want, strict=True):  # scaled to norm fit_clip
        torch.testing.assert_close(p.grad, g * (1e-4 / norm), msg=n)
    assert not torch.equal(src_grad, plain[1])  # the injection is on
    assert model.branch.fit_stats() == {"steps": 1, "clipped": 1, "dropped": 0}
    with torch.no_grad():  # the branch diverges: its output, its injection and its regression are NaN
        model.branch.expand.weight[0, 0] = math.nan
    _, src_grad, grads, _, _ = _grads(model, x, y, with_branch=True)
    assert torch.equal(src_grad, plain[1])  # the network's gradient, exactly: nothing non-finite added
    assert all(torch.equal(grads[n], plain[2][n]) for n in plain[2])
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.branch.parameters())  # dropped, not NaN
    assert model.branch.fit_stats() == {"steps": 2, "clipped": 1, "dropped": 2}  # the injection and the fit
    assert GCODE(8, 16, (8, 8), (4, 4)).fit_stats() == {"capped": 0}  # a branch-mode branch counts its out_clip


def test_gradient_mode_is_exact_in_eval_under_no_grad_and_when_neutral():
    model = Chain(ODEOptions(mode="gradient", inject_warmup=0))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    plain = _grads(model, x, y, with_branch=False)
    with neutral([model.branch]):
        _, src_grad, grads, _, _ = _grads(model, x, y, with_branch=True)
    assert torch.equal(src_grad, plain[1]) and not any(n.startswith("branch.") for n in grads)
    assert torch.equal(_grads(model, x, y, with_branch=True)[0], plain[0])  # out of the context: injects again
    assert not torch.equal(model.branch.steps, torch.tensor(0))
    with torch.no_grad():
        _, _, out, dst = model(x)
        assert out is dst
    model.eval()
    _, _, out, dst = model(x)
    assert out is dst


def test_a_gradient_mode_model_stays_the_original_network_through_training():
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=10, in_chans=1)
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    gm = gcsurgery.gcify(model, example_inputs=x[:2], ode=ODEOptions(mode="gradient", inject_warmup=0))
    assert "bit-identical" in gm.gc_plan.verified  # checked with the injection off
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    stripped = gcsurgery.strip(gm, keep_ode=False)
    twin = copy.deepcopy(model)
    twin.load_state_dict(stripped.state_dict())
    gm.eval(), twin.eval()
    torch.testing.assert_close(gm(x), twin(x), rtol=0, atol=0)
    assert not torch.equal(twin.conv1.weight, model.conv1.weight)  # trained weights, the user's architecture


@pytest.mark.parametrize("options", [ODEOptions(mode="gradient"), ODEOptions(solver="none"), ODEOptions(out_clip=1.0)])
def test_the_nd_branches_refuse_the_2d_only_designs(options):
    from gcsurgery.gcode_nd import GCODEND

    with pytest.raises(gcsurgery.GCSurgeryError, match="mode='branch'"):
        GCODEND(8, 8, (16,), (8,), options=options)
