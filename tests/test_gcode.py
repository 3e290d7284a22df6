import json
import math

import pytest
import torch
import torchdiffeq

from gcsurgery.errors import GCSurgeryError
from gcsurgery.gcode import GCODE, ODEOptions, SampledLinear, fixed_grid_solve


def make(layout: str, chs: int, size, batch: int = 2, seed: int = 0):
    """A random hidden state in `layout`, `size` = (H, W)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, chs, *size, generator=g)  # (B, C, H, W)
    if layout == "NHWC":
        return x.permute(0, 2, 3, 1).contiguous()
    if layout == "NLC":
        return x.flatten(2).transpose(1, 2).contiguous()
    return x


def open_gate(branch: GCODE, value: float = 0.5) -> GCODE:
    with torch.no_grad():
        branch.gate.fill_(value)
    return branch


CASES = {  # (Ca, Cb, in_size, out_size, in_layout, out_layout)
    "equal-size": (8, 8, (16, 16), (16, 16), "NCHW", "NCHW"),
    "equal-size-nhwc": (8, 8, (16, 16), (16, 16), "NHWC", "NHWC"),
    "integer-ratio-up": (4, 8, (8, 8), (4, 4), "NCHW", "NCHW"),
    "non-integer-down": (12, 6, (9, 7), (4, 3), "NCHW", "NCHW"),
    "nhwc": (8, 16, (8, 8), (4, 4), "NHWC", "NHWC"),
    "nlc": (8, 16, (8, 6), (4, 3), "NLC", "NLC"),
    "nchw-to-nhwc": (8, 8, (7, 7), (3, 3), "NCHW", "NHWC"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("train", [True, False])
def test_identity_at_zero_gate(case, train):
    ca, cb, si, so, li, lo = CASES[case]
    branch = GCODE(ca, cb, si, so, in_layout=li, out_layout=lo).train(train)
    src, dst = make(li, ca, si, seed=1), make(lo, cb, so, seed=2)
    out = branch(src, dst)
    assert torch.equal(out, dst)
    assert out.shape == dst.shape and out.dtype == dst.dtype
    assert not torch.equal(open_gate(branch)(src, dst), dst)  # the branch computes something


@pytest.mark.parametrize("case", ["equal-size-nhwc", "non-integer-down", "nhwc", "nlc", "nchw-to-nhwc"])
def test_layouts_agree_with_nchw(case):
    ca, cb, si, so, li, lo = CASES[case]
    branch = open_gate(GCODE(ca, cb, si, so, in_layout=li, out_layout=lo))
    ref = open_gate(GCODE(ca, cb, si, so))
    ref.load_state_dict(branch.state_dict())
    src, dst = make(li, ca, si, seed=1), make(lo, cb, so, seed=2)
    src_n, dst_n = make("NCHW", ca, si, seed=1), make("NCHW", cb, so, seed=2)
    out, out_n = branch(src, dst), ref(src_n, dst_n)
    if lo == "NHWC":
        out = out.permute(0, 3, 1, 2)
    elif lo == "NLC":
        out = out.transpose(1, 2).unflatten(2, so)
    torch.testing.assert_close(out, out_n)


@pytest.mark.parametrize(
    "options",
    [ODEOptions(), ODEOptions(recompute="branch"), ODEOptions(recompute="none"), ODEOptions(phi="conv", norm="group")],
)
def test_every_parameter_gets_a_gradient(options):
    branch = GCODE(8, 16, (8, 8), (4, 4), options=options)
    src = make("NCHW", 8, (8, 8)).requires_grad_()
    out = branch(src, make("NCHW", 16, (4, 4)))
    (out * torch.randn_like(out)).sum().backward()
    grads = {n: p.grad for n, p in branch.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["gate"].abs().sum() > 0


def test_pool_reduce():
    src, dst = make("NCHW", 8, (8, 8)), make("NCHW", 16, (4, 4))
    pooled = GCODE(8, 16, (8, 8), (4, 4), options=ODEOptions(reduce="pool"))
    assert torch.equal(pooled(src, dst), dst)
    strided = open_gate(GCODE(8, 16, (8, 8), (4, 4)))
    assert not torch.allclose(open_gate(pooled)(src, dst), strided(src, dst))


def test_recompute_gives_the_same_gradients():
    grads = []
    for recompute in ("ode", "branch", "none"):
        branch = open_gate(GCODE(8, 16, (8, 8), (8, 8), options=ODEOptions(recompute=recompute)))
        out = branch(make("NCHW", 8, (8, 8)), make("NCHW", 16, (8, 8)))
        out.square().sum().backward()
        grads.append([p.grad for p in branch.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "options, nfe",
    [
        (ODEOptions(), 2),
        (ODEOptions(step_size=1.0), 1),
        (ODEOptions(step_size=0.3), 4),
        (ODEOptions(solver="midpoint"), 4),
        (ODEOptions(solver="rk4", step_size=1.0), 4),
        (ODEOptions(solver="rk4", step_size=0.5, phi="conv", time="channel"), 8),
        (ODEOptions(solver="euler", adjoint=True), 2),
    ],
)
def test_fixed_step_nfe(options, nfe):
    branch = open_gate(GCODE(4, 8, (8, 8), (4, 4), options=options))
    out = branch(make("NCHW", 4, (8, 8)), make("NCHW", 8, (4, 4)))
    out.sum().backward()
    assert branch.nfe == nfe
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("adjoint", [False, True])
def test_dopri5_counts_evaluations(adjoint):
    branch = open_gate(GCODE(4, 8, (4, 4), (2, 2), options=ODEOptions(solver="dopri5", adjoint=adjoint)))
    assert branch.nfe == 0
    out = branch(make("NCHW", 4, (4, 4)), make("NCHW", 8, (2, 2)))
    assert branch.nfe >= 6 and branch.nfe % 6 in (0, 2)  # dopri5: 6 evaluations a step, plus 2 to start
    nfe = branch.nfe
    out.sum().backward()
    assert branch.nfe == nfe  # evaluations in backward (adjoint) do not count
    assert all(p.grad is not None for p in branch.parameters())


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("step_size", [0.5, 0.3])
def test_fixed_grid_loop_matches_torchdiffeq(solver, step_size):
    branch = GCODE(4, 4, (4, 4), (4, 4))
    z0 = make("NCHW", branch.width, (4, 4)).double()
    phi = branch.phi.double()
    ours = fixed_grid_solve(phi, z0, solver, ODEOptions(step_size=step_size).grid)
    ref = torchdiffeq.odeint(
        phi, z0, torch.tensor([0.0, 1.0]).double(), method=solver, options={"step_size": step_size}
    )
    torch.testing.assert_close(ours, ref[-1])


@pytest.mark.parametrize("k", [(1, 1), (2, 2), (2, 3)])
def test_sampled_linear_gradients(k):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: SampledLinear.apply(x, w, b, *k), (x, w, b))
    ref = torch.nn.functional.linear(x[:, :, :: k[0], :: k[1]].permute(0, 2, 3, 1), w, b)
    torch.testing.assert_close(SampledLinear.apply(x, w, b, *k), ref)


def test_phi_depends_on_time():
    branch = GCODE(4, 4, (4, 4), (4, 4))
    z = make("NCHW", branch.width, (4, 4))
    assert not torch.allclose(branch.phi(0.0, z), branch.phi(0.5, z))


BAD = [
    ("width", 0, "None or a positive int"),
    ("width", 2.5, "None or a positive int"),
    ("solver", "rk45", "('euler', 'midpoint', 'rk4', 'dopri5', 'none')"),
    ("mode", "exact", "('branch', 'gradient')"),
    ("inject", -0.1, ">= 0"),
    ("inject_warmup", 2.5, "an int >= 0"),
    ("fit_clip", 0, "a number > 0"),
    ("fit_clip", math.nan, "a number > 0"),
    ("out_clip", 0, "a number > 0"),
    ("out_clip", True, "a number > 0"),
    ("step_size", 0, "(0, 1]"),
    ("step_size", 1.5, "(0, 1]"),
    ("rtol", -1e-3, "positive"),
    ("atol", math.nan, "positive"),
    ("adjoint", "yes", "True or False"),
    ("recompute", True, "('ode', 'branch', 'none')"),
    ("reduce", "max", "('stride', 'pool')"),
    ("gate_init", math.inf, "finite"),
    ("phi", "mlp", "('dwsep', 'conv')"),
    ("norm", "batch", "('none', 'input', 'group')"),
    ("act", "gelu", "('relu', 'silu', 'tanh')"),
    ("time", "embed", "('bias', 'channel')"),
    ("time", "channel", "phi='conv'"),
    ("ode_stride", 0, "positive int"),
    ("seed", 1.5, "None or an int"),
]


@pytest.mark.parametrize("field, value, hint", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_options_are_validated(field, value, hint):
    with pytest.raises(GCSurgeryError) as info:
        ODEOptions(**{field: value})
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert field in msg and repr(value) in msg and hint in msg


def test_options_are_keyword_only_and_round_trip():
    with pytest.raises(TypeError):
        ODEOptions(8)
    opts = ODEOptions(width=12, solver="dopri5", rtol=1e-4, phi="conv", norm="group", time="channel", ode_stride=1)
    assert ODEOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    with pytest.raises(GCSurgeryError, match="unknown ODEOptions keys.*'depth'"):
        ODEOptions.from_dict({"depth": 3})
    with pytest.raises(GCSurgeryError, match=r"from_dict needs a dict like ODEOptions\(\).to_dict\(\), got 'width'"):
        ODEOptions.from_dict("width")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_chs": 0}, "in_chs must be a positive int, got 0"),
        ({"out_size": (0, 4)}, r"out_size must be \(H, W\).*\(0, 4\)"),
        ({"in_size": (True, 4)}, r"in_size must be \(H, W\).*\(True, 4\)"),
        ({"in_layout": "NWHC"}, r"in_layout must be one of \('NCHW', 'NHWC', 'NLC'\), got 'NWHC'"),
        ({"options": {"width": 8}}, "options must be an ODEOptions, got dict"),
    ],
)
def test_branch_arguments_are_validated(kwargs, match):
    args = {"in_chs": 4, "out_chs": 8, "in_size": (4, 4), "out_size": (2, 2), **kwargs}
    with pytest.raises(GCSurgeryError, match=match):
        GCODE(args.pop("in_chs"), args.pop("out_chs"), args.pop("in_size"), args.pop("out_size"), **args)


@pytest.mark.parametrize(
    "layout, src, dst, match",
    [
        ("NCHW", (2, 3, 8, 8), (2, 8, 4, 4), r"takes src of shape \(B, 4, H, W\) \(NCHW\), got \(2, 3, 8, 8\)"),
        ("NCHW", (2, 4, 8, 8), (2, 6, 4, 4), r"takes dst of shape \(B, 8, H, W\) \(NCHW\), got \(2, 6, 4, 4\)"),
        ("NCHW", (4, 8, 8), (2, 8, 4, 4), r"src of shape \(B, 4, H, W\).*got \(4, 8, 8\).*gcsurgery.plan"),
        ("NHWC", (2, 4, 8, 8), (2, 4, 4, 8), r"src of shape \(B, H, W, 4\) \(NHWC\), got \(2, 4, 8, 8\)"),
        ("NLC", (2, 100, 4), (2, 25, 8), r"src of shape \(B, 64, 4\) \(NLC\), got \(2, 100, 4\).*another input size"),
        ("NCHW", (3, 4, 8, 8), (2, 8, 4, 4), r"src and dst batch sizes differ: 3 and 2"),
    ],
)
def test_branch_inputs_of_the_wrong_shape_are_refused(layout, src, dst, match):
    branch = GCODE(4, 8, (8, 8), (4, 4), in_layout=layout, out_layout=layout)
    with pytest.raises(GCSurgeryError, match=match):
        branch(torch.randn(*src), torch.randn(*dst))


def test_defaults_and_ode_stride():
    assert GCODE(16, 64, (8, 8), (4, 4)).width == 16 and GCODE(16, 16, (8, 8), (8, 8)).width == 8
    # ImageNet-wide stages keep r at 64 (resnet50's 2048 channels would give 512); an explicit width is kept
    assert GCODE(8, 256, (8, 8), (4, 4)).width == 64 and GCODE(8, 2048, (8, 8), (4, 4)).width == 64
    assert GCODE(8, 2048, (8, 8), (4, 4), options=ODEOptions(width=512)).width == 512
    assert GCODE(8, 8, (16, 16), (16, 16)).ode_stride == 2 and GCODE(8, 8, (32, 32), (16, 16)).ode_stride == 1
    assert GCODE(8, 8, (8, 8), (8, 8)).ode_stride == 1
    branch = open_gate(GCODE(4, 4, (7, 7), (7, 7), options=ODEOptions(ode_stride=3)))
    dst = make("NCHW", 4, (7, 7))
    assert branch(make("NCHW", 4, (7, 7)), dst).shape == dst.shape


def test_follows_dtype():
    branch = open_gate(GCODE(4, 8, (8, 8), (4, 4))).double()
    out = branch(make("NCHW", 4, (8, 8)).double(), make("NCHW", 8, (4, 4)).double())
    assert out.dtype == torch.float64 and all(p.dtype == torch.float64 for p in branch.parameters())


def test_bf16_autocast():
    branch = open_gate(GCODE(4, 8, (8, 8), (4, 4)))
    src, dst = make("NCHW", 4, (8, 8)), make("NCHW", 8, (4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = branch(src, dst)
        out_bf16 = branch(src, dst.bfloat16())
    assert out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
    out.sum().backward()
    torch.testing.assert_close(out, open_gate(branch)(src, dst), atol=0.1, rtol=0.05)
    assert torch.equal(open_gate(branch, 0.0)(src, dst), dst)


def test_channels_last_input():
    branch = GCODE(8, 16, (8, 8), (4, 4))
    src, dst = make("NCHW", 8, (8, 8)), make("NCHW", 16, (4, 4))
    cl = torch.channels_last
    src_cl, dst_cl = src.contiguous(memory_format=cl), dst.contiguous(memory_format=cl)
    assert torch.equal(branch(src_cl, dst_cl), dst)
    out = open_gate(branch)(src_cl, dst_cl)
    assert out.is_contiguous(memory_format=cl)
    torch.testing.assert_close(out, branch(src, dst))


def test_global_rng_untouched():
    state = torch.get_rng_state()
    branch = GCODE(8, 16, (8, 8), (4, 4))
    out = open_gate(branch)(make("NCHW", 8, (8, 8)), make("NCHW", 16, (4, 4)))
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), state)
    again = GCODE(8, 16, (8, 8), (4, 4))
    assert all(torch.equal(a, b) for a, b in zip(branch.phi.parameters(), again.phi.parameters(), strict=True))
    other = GCODE(8, 16, (8, 8), (4, 4), options=ODEOptions(seed=1))
    assert not torch.equal(other.reduce.weight, again.reduce.weight)


def test_torch_compile_matches_eager():
    branch = open_gate(GCODE(4, 8, (8, 8), (4, 4)))
    src, dst = make("NCHW", 4, (8, 8)).requires_grad_(), make("NCHW", 8, (4, 4))
    compiled = torch.compile(branch, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(src, dst), branch(src, dst))
    compiled(src, dst).sum().backward()
    assert branch.nfe == 2 and src.grad is not None


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    branch = open_gate(GCODE(4, 8, (8, 8), (4, 4)))
    src, dst = make("NCHW", 4, (8, 8)).requires_grad_(), make("NCHW", 8, (4, 4))
    compiled = torch.compile(branch, fullgraph=True)
    torch.testing.assert_close(compiled(src, dst), branch(src, dst))
    compiled(src, dst).sum().backward()
    assert src.grad is not None
