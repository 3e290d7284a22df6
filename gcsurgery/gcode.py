"""GC-ODE: the hidden-state gradient-correction branch between two stage outputs.

For a pair of hidden states `h_src` (stage i-1 output) and `h_dst` (stage i output)::

    z0  = R(h_src)                    # sample src on the ODE grid, then 1×1 conv Ca → r
    z1  = ODESolve(φ, z0, t ∈ [0, 1])  # dz/dt = φ(z, t), two Euler steps by default
    out = h_dst + γ ⊙ E(z1)           # E: 1×1 conv r → Cb; γ per channel, initialised to 0

The ODE grid is dst's size, or half of it for a pair without downsampling (E's output is then upsampled).
With γ = 0 the branch returns `h_dst` exactly, so inserting it does not change the model. The gate is
folded into E's weights (`(γ⊙W) z + γ⊙b`, the same function), so backward keeps no copy of `h_dst`.

Two more designs separate what the branch does (`ODEOptions`):

- ``solver="none"``: no ODE solve, z1 = z0; the branch is `h_dst + γ ⊙ E(R(h_src))`, a linear
  stage-spanning shortcut (the ablation that says whether the ODE matters).
- ``out_clip``: each sample's correction is bounded to that multiple of its `h_dst`'s norm, so the
  branch cannot outgrow the stage it spans (off by default; counted in `GCODE.fit_stats`).
- ``mode="gradient"``: the forward returns `h_dst` itself at every step, so the network computes exactly
  what the original does, always; backward adds the vector-Jacobian product of the branch's `E(z1)` (with
  dst's gradient as the vector) to src's gradient, bounded to ``inject`` times the norm of the gradient
  src gets from the network and ramped up over ``inject_warmup`` training steps. The branch's own
  parameters are trained to mimic the stage, on the gradient of ``mean((E(z1) - h_dst)²)`` alone (its norm
  clipped to ``fit_clip``), so the injected gradient estimates the stage's with a smoother map. A non-finite
  injection or regression gradient is dropped, never added, and counted (`GCODE.fit_stats`).
  `gcsurgery.strip` then gives back the original architecture with the weights so trained.

The default φ is depthwise-separable with the time as a learned per-channel bias,
`φ(z, t) = pw(relu(dw3×3(z) + a·t + b))`, integrated in a plain Python loop (no host syncs; torchdiffeq's
fixed-grid solver calls `.item()` and copies the states into a solution buffer), with the solver's
activations recomputed in backward. The ODE runs channels-last, where CPU kernels for convolutions this
thin are several times faster. torchdiffeq runs `dopri5` and the adjoint method. `docs/gcode.md` has
the cost measurements behind these defaults.
"""

import contextlib
import dataclasses
import itertools
import math

import torch
import torch.nn.functional as F
import torchdiffeq
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import layouts
from .errors import GCSurgeryError
from .layouts import LAYOUTS

__all__ = ["ODEOptions", "GCODE", "LAYOUTS", "MAX_WIDTH", "default_width", "neutral"]

REDUCES = ("stride", "pool")
RECOMPUTES = ("ode", "branch", "none")
MODES = ("branch", "gradient")
_CL = torch.channels_last
STAGES = {"euler": 1, "midpoint": 2, "rk4": 4}  # φ evaluations per step of each fixed-step solver
SOLVERS = (*STAGES, "dopri5", "none")  # none: no ODE solve, z1 = z0
PHIS = ("dwsep", "conv")
NORMS = ("none", "input", "group")
ACTS = {"relu": F.relu, "silu": F.silu, "tanh": torch.tanh}
TIMES = ("bias", "channel")


def _fail(name, value, valid: str):
    raise GCSurgeryError(f"ODEOptions.{name} must be {valid}, got {value!r}.")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ODEOptions:
    """How every GC-ODE branch is built; validated on construction.

    Attributes:
        width: r, the channels the ODE runs on; None gives `default_width(out_chs)`:
            `min(MAX_WIDTH, max(8, out_chs // 4))`, a quarter of the destination's channels, 8 to 64.
        solver: fixed-step "euler", "midpoint", "rk4", adaptive "dopri5" (torchdiffeq), or "none": no ODE
            (z1 = z0, no φ), which makes the branch a linear shortcut E(R(h_src)).
        step_size: fixed-step solvers take `ceil(1 / step_size)` steps over t ∈ [0, 1] (the last one
            shorter when 1 / step_size is not a whole number).
        rtol: relative tolerance of dopri5.
        atol: absolute tolerance of dopri5.
        adjoint: backpropagate with `torchdiffeq.odeint_adjoint` (memory O(1) in the steps, more compute).
        gate_init: initial value of the per-channel gate γ; 0 makes the branch an exact identity.
        phi: "dwsep" (depthwise 3×3 → act → pointwise) or "conv" (norm → act → 3×3 conv, twice).
        norm: "none", "input" (one GroupNorm on z0), or "group" (a GroupNorm in every φ evaluation).
        act: the activation in φ: "relu", "silu" or "tanh".
        time: how φ sees t: "bias" (a learned per-channel a·t + b after each 3×3 conv) or "channel"
            (a constant t plane concatenated to each 3×3 conv's input; phi="conv" only).
        reduce: how R brings src to the ODE grid when the sizes differ by a whole factor k: "stride"
            takes every k-th position (a strided 1×1 conv, like ResNet's projection shortcut), "pool"
            averages k×k windows first (smoother, about 3× slower on CPU). Other ratios use adaptive
            average pooling.
        ode_stride: the ODE runs on a grid this many times coarser than the destination (size rounded
            up) and γ⊙E(z1) is upsampled (nearest) back; None means 2 for a pair whose source and
            destination have the same size, at least 16×16 (the costly full-resolution pair, which has
            no downsampling of its own), and 1 for the others.
        recompute: what backward recomputes instead of keeping (non-reentrant `torch.utils.checkpoint`):
            "ode" the solver's activations, "branch" all of the branch (R, the solve, E), "none" nothing.
            Not applied with adjoint=True, which keeps no solver activations anyway.
        mode: "branch" adds γ ⊙ E(z1) to dst (the paper's GC-ODE); "gradient" returns dst unchanged and adds the
            branch's bounded vector-Jacobian product to src's gradient in backward, the branch trained to mimic
            the stage (see the module docstring). The gate γ is then unused and not a parameter.
        inject: mode="gradient": the injected gradient's norm is at most this times the norm of the gradient
            src gets from the network (per batch).
        inject_warmup: mode="gradient": training steps over which that bound ramps up linearly from 0 (0: none).
        fit_clip: mode="gradient": the norm to which the branch's regression gradient (all its parameters, one
            step) is clipped, so that one bad batch cannot throw the branch's weights off; ``math.inf``: none.
        out_clip: mode="branch": each sample's correction γ ⊙ E(z1) is scaled down to at most this times the
            norm of its h_dst (one factor per sample, 1 where it is already smaller), so that the branch cannot
            outgrow the stage it spans; ``math.inf``: no bound. Where it does not bind the output is
            bit-identical to the unbounded one.
        seed: seed of the private generator that initialises the branch, so that building branches
            leaves the global RNG untouched; None draws from the global RNG instead.
    """

    width: int | None = None
    solver: str = "euler"
    step_size: float = 0.5
    rtol: float = 1e-3
    atol: float = 1e-4
    adjoint: bool = False
    gate_init: float = 0.0
    phi: str = "dwsep"
    norm: str = "none"
    act: str = "relu"
    time: str = "bias"
    reduce: str = "stride"
    ode_stride: int | None = None
    recompute: str = "ode"
    mode: str = "branch"
    inject: float = 0.1
    inject_warmup: int = 100
    fit_clip: float = 1.0
    out_clip: float = math.inf
    seed: int | None = 0

    def __post_init__(self):
        if self.width is not None and not _positive_int(self.width):
            _fail("width", self.width, "None or a positive int (channels of the ODE state)")
        choices_of = {"solver": SOLVERS, "phi": PHIS, "norm": NORMS, "act": tuple(ACTS), "time": TIMES}
        for name, choices in (*choices_of.items(), ("reduce", REDUCES), ("recompute", RECOMPUTES), ("mode", MODES)):
            if getattr(self, name) not in choices:
                _fail(name, getattr(self, name), f"one of {choices}")
        if self.time == "channel" and self.phi != "conv":
            _fail("time", self.time, f"'bias' when phi={self.phi!r} (a t channel needs phi='conv'); choices {TIMES}")
        if not (_is_real(self.step_size) and 0 < self.step_size <= 1):
            _fail("step_size", self.step_size, "a number in (0, 1] (t runs over [0, 1]; 0.5 gives 2 steps)")
        for name in ("rtol", "atol"):
            if not (_is_real(getattr(self, name)) and getattr(self, name) > 0):
                _fail(name, getattr(self, name), "a positive finite number (dopri5 tolerance)")
        if not isinstance(self.adjoint, bool):
            _fail("adjoint", self.adjoint, "True or False")
        if not _is_real(self.gate_init):
            _fail("gate_init", self.gate_init, "a finite number (0 keeps the model's function at insertion)")
        if not (_is_real(self.inject) and self.inject >= 0):
            _fail("inject", self.inject, "a finite number >= 0 (the injected gradient's norm over the network's)")
        if not (_positive_int(self.inject_warmup) or self.inject_warmup == 0 and type(self.inject_warmup) is int):
            _fail("inject_warmup", self.inject_warmup, "an int >= 0 (training steps)")
        if not (isinstance(self.fit_clip, int | float) and not isinstance(self.fit_clip, bool) and self.fit_clip > 0):
            _fail("fit_clip", self.fit_clip, "a number > 0 (the branch's regression gradient norm; math.inf: no clip)")
        if not (isinstance(self.out_clip, int | float) and not isinstance(self.out_clip, bool) and self.out_clip > 0):
            _fail(
                "out_clip", self.out_clip, "a number > 0 (the correction's norm over dst's per sample; math.inf: none)"
            )
        if self.ode_stride is not None and not _positive_int(self.ode_stride):
            _fail("ode_stride", self.ode_stride, "None or a positive int (1 runs the ODE at the destination's size)")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            _fail("seed", self.seed, "None or an int")

    @property
    def grid(self) -> tuple[float, ...]:
        """Time points of the fixed-step solvers, from 0 to 1 inclusive."""
        n = max(1, math.ceil(1 / self.step_size - 1e-9))
        return (*(k * self.step_size for k in range(n)), 1.0)

    def to_dict(self) -> dict:
        """JSON-able dict of every field, for checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "ODEOptions":
        """Inverse of `to_dict`; unknown keys are an error."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict):
            raise GCSurgeryError(f"ODEOptions.from_dict needs a dict like ODEOptions().to_dict(), got {d!r}.")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise GCSurgeryError(f"unknown ODEOptions keys {unknown}; valid keys are {names}.")
        return cls(**d)


@contextlib.contextmanager
def neutral(branches):
    """Within this context the GC-ODE ``branches`` (`GCODE`, `GCODEND`) change nothing: gates are zero (the
    branch adds exact zeros, its parameters still get gradients) and gradient-mode branches inject nothing.
    gcify checks a rewrite so; the gates' values come back on exit."""
    branches = list(branches)
    opened = [b.gate.detach().clone() for b in branches]
    was = [b._neutral for b in branches]
    try:
        with torch.no_grad():
            for b in branches:
                b._neutral = True
                if isinstance(b.gate, nn.Parameter):
                    b.gate.zero_()
        yield branches
    finally:
        with torch.no_grad():
            for b, g, w in zip(branches, opened, was, strict=True):
                b.gate.copy_(g)
                b._neutral = w


MAX_WIDTH = 64  # cap of the default ODE width: R and E cost r·(Ca + Cb) per position (docs/gcode.md)


def default_width(out_chs: int) -> int:
    """The ODE width r of a branch into ``out_chs`` channels when `ODEOptions.width` is None."""
    return min(MAX_WIDTH, max(8, out_chs // 4))


def _group_norm(chs: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(chs, 8), chs)


class TimeConv(nn.Module):
    """3×3 conv that sees t, as a per-channel `a·t + b` (time="bias") or a concatenated t plane ("channel")."""

    def __init__(self, chs: int, *, depthwise: bool, time: str):
        super().__init__()
        self.time = time
        extra = int(time == "channel")
        self.conv = nn.Conv2d(chs + extra, chs, 3, padding=1, groups=chs if depthwise else 1, bias=extra == 1)
        if time == "bias":
            bound = 1 / math.sqrt(self.conv.weight[0].numel())
            self.t_scale = nn.Parameter(torch.empty(chs).uniform_(-bound, bound))  # a
            self.t_bias = nn.Parameter(torch.empty(chs).uniform_(-bound, bound))  # b

    def forward(self, t, z):  # t: float or 0-d tensor; z: (B, r, H, W)
        if self.time == "channel":
            plane = torch.ones_like(z[:, :1]) * t  # (B, 1, H, W)
            return self.conv(torch.cat([z, plane], 1))
        bias = torch.add(self.t_bias, self.t_scale, alpha=t) if isinstance(t, float) else self.t_bias + t * self.t_scale
        return F.conv2d(z, self.conv.weight, bias, padding=1, groups=self.conv.groups)


class Phi(nn.Module):
    """The vector field φ(z, t); r channels in and out, no BatchNorm."""

    def __init__(self, chs: int, options: ODEOptions):
        super().__init__()
        self.kind, self.act = options.phi, ACTS[options.act]
        n_conv = 1 if options.phi == "dwsep" else 2
        self.norms = nn.ModuleList(
            _group_norm(chs) if options.norm == "group" else nn.Identity() for _ in range(n_conv)
        )
        self.convs = nn.ModuleList(
            TimeConv(chs, depthwise=self.kind == "dwsep", time=options.time) for _ in range(n_conv)
        )
        self.pw = nn.Conv2d(chs, chs, 1) if self.kind == "dwsep" else None

    def forward(self, t, z):  # (B, r, H, W) -> (B, r, H, W)
        if self.kind == "dwsep":
            return self.pw(self.act(self.convs[0](t, self.norms[0](z))))
        for norm, conv in zip(self.norms, self.convs, strict=True):
            z = conv(t, self.act(norm(z)))
        return z


def fixed_grid_solve(phi, z, solver: str, grid: tuple[float, ...]):
    """Integrates dz/dt = phi(t, z) over `grid` with euler, midpoint or rk4 (3/8 rule, as torchdiffeq's)."""
    for t0, t1 in itertools.pairwise(grid):
        dt = t1 - t0
        k1 = phi(t0, z)
        if solver == "euler":
            z = torch.add(z, k1, alpha=dt)
        elif solver == "midpoint":
            z = torch.add(z, phi(t0 + dt / 2, torch.add(z, k1, alpha=dt / 2)), alpha=dt)
        else:
            k2 = phi(t0 + dt / 3, torch.add(z, k1, alpha=dt / 3))
            k3 = phi(t0 + dt * 2 / 3, z + dt * (k2 - k1 / 3))
            k4 = phi(t1, z + dt * (k1 - k2 + k3))
            z = z + (k1 + 3 * (k2 + k3) + k4) * (dt / 8)
    return z


class SampledLinear(torch.autograd.Function):
    """`linear(x[:, :, ::kh, ::kw] as (B, h, w, C), weight, bias)` that keeps `x` itself for backward, not the
    gathered samples, and scatters its input gradient in one pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, kh: int, kw: int):  # (B, C, H, W) -> (B, h, w, r)
        ctx.save_for_backward(x, weight)
        ctx.k = (kh, kw)
        return F.linear(x[:, :, ::kh, ::kw].permute(0, 2, 3, 1), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # (B, h, w, r)
        x, weight = ctx.saved_tensors
        (kh, kw), g2 = ctx.k, g.flatten(0, 2)  # (N, r)
        samples = x[:, :, ::kh, ::kw].permute(0, 2, 3, 1).to(g.dtype).flatten(0, 2)  # (N, C), a copy
        gw = (g2.t() @ samples).to(weight.dtype)  # (r, C)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.zeros_like(x)
            gx[:, :, ::kh, ::kw] = (g2 @ weight.to(g.dtype)).unflatten(0, g.shape[:3]).permute(0, 3, 1, 2)
        return gx, gw, g2.sum(0).to(weight.dtype), None, None


def _reduce(x, size, how: str, weight, bias):
    """R: (B, C, H, W) -> (B, h, w, r) on the ODE grid `size`, by sampling every k-th position ("stride") or
    averaging k×k windows ("pool") for whole ratios, by adaptive average pooling otherwise, then a 1×1 map."""
    (h, w), (oh, ow) = x.shape[-2:], size
    if h % oh == 0 and w % ow == 0 and (how == "stride" or (h, w) == (oh, ow)):
        return SampledLinear.apply(x, weight, bias, h // oh, w // ow)
    x = F.avg_pool2d(x, (h // oh, w // ow)) if h % oh == 0 and w % ow == 0 else F.adaptive_avg_pool2d(x, size)
    return F.linear(x.permute(0, 2, 3, 1), weight, bias)


class GCODE(nn.Module):
    """GC-ODE branch: `branch(src, dst)` returns `dst + γ ⊙ E(ODESolve(φ, R(src)))` in dst's layout.

    Args:
        in_chs: channels of src (Ca).
        out_chs: channels of dst (Cb).
        in_size: spatial size (H, W) of src.
        out_size: spatial size (H, W) of dst; at most src's size in each dimension is the usual case.
        in_layout: "NCHW", "NHWC" or "NLC" (B, H*W, C tokens).
        out_layout: layout of dst and of the output.
        options: `ODEOptions`.

    Attributes:
        nfe: φ evaluations in the last forward; static for the built-in fixed-step loop, counted when
            torchdiffeq runs the solve (dopri5 or adjoint).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        in_size: tuple[int, int],
        out_size: tuple[int, int],
        *,
        in_layout: str = "NCHW",
        out_layout: str = "NCHW",
        options: ODEOptions = ODEOptions(),  # noqa: B008 (frozen, hence safe)
    ):
        super().__init__()
        for name, v in (("in_chs", in_chs), ("out_chs", out_chs)):
            if not _positive_int(v):
                raise GCSurgeryError(f"GCODE {name} must be a positive int, got {v!r}.")
        for name, v in (("in_size", in_size), ("out_size", out_size)):
            if not (isinstance(v, tuple | list) and len(v) == 2 and all(_positive_int(s) for s in v)):
                raise GCSurgeryError(f"GCODE {name} must be (H, W), two positive ints, got {v!r}.")
        for name, v in (("in_layout", in_layout), ("out_layout", out_layout)):
            if v not in LAYOUTS:
                raise GCSurgeryError(f"GCODE {name} must be one of {LAYOUTS}, got {v!r}.")
        if not isinstance(options, ODEOptions):
            raise GCSurgeryError(f"GCODE options must be an ODEOptions, got {type(options).__name__}.")
        self.in_chs, self.out_chs, self.in_size, self.out_size = in_chs, out_chs, tuple(in_size), tuple(out_size)
        self.in_layout, self.out_layout, self.options = in_layout, out_layout, options
        self.width = r = options.width or default_width(out_chs)
        self._fixed = options.solver in (*STAGES, "none") and not options.adjoint
        self._neutral = False
        self._grid = options.grid
        self._recompute = "none" if options.adjoint else options.recompute
        coarsen = self.in_size == self.out_size and min(self.out_size) >= 16
        self.ode_stride = options.ode_stride or (2 if coarsen else 1)
        self._nfe = STAGES.get(options.solver, 0) * (len(self._grid) - 1) if self._fixed else 0
        with torch.random.fork_rng(devices=[], enabled=options.seed is not None):
            if options.seed is not None:
                torch.manual_seed(options.seed)
            self.reduce = nn.Conv2d(in_chs, r, 1)  # R, applied after resampling (cheaper than before)
            self.in_norm = _group_norm(r) if options.norm == "input" else nn.Identity()
            self.phi = Phi(r, options) if options.solver != "none" else None
            self.expand = nn.Conv2d(r, out_chs, 1)  # E
        if options.mode == "branch":
            self.gate = nn.Parameter(torch.full((out_chs,), float(options.gate_init)))  # γ
            self.register_buffer("capped", torch.zeros((), dtype=torch.long), persistent=False)
        else:  # the branch mimics the stage and adds nothing in forward; the steps set the injection's warm-up
            self.register_buffer("gate", torch.ones(out_chs), persistent=False)
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
            for name in ("clipped", "dropped"):  # counted on the device (no sync), read by fit_stats
                self.register_buffer(name, torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def nfe(self) -> int:
        return self._nfe

    def fit_stats(self) -> dict[str, int]:
        """What the branch's bounds did since this module was built (counts not saved with the weights).

        Gradient mode: training ``steps`` (saved with the weights: they set the warm-up), regression gradients
        ``clipped`` to ``fit_clip`` and non-finite gradients ``dropped`` (an injection and a regression gradient
        count one each); a branch whose drops keep growing has diverged and adds nothing. Branch mode: the
        samples whose correction was ``capped`` to ``out_clip`` in training forwards. Reads the device."""
        if self.options.mode == "branch":
            return {"capped": int(self.capped)}
        return {name: int(getattr(self, name)) for name in ("steps", "clipped", "dropped")}

    def extra_repr(self) -> str:
        return (
            f"{self.in_chs}x{self.in_size} {self.in_layout} -> {self.out_chs}x{self.out_size} {self.out_layout}, "
            f"r={self.width}, ode_stride={self.ode_stride}, solver={self.options.solver}, "
            f"nfe={self.nfe if self._fixed else 'counted'}, mode={self.options.mode}"
        )

    def _solve(self, z):  # (B, r, h, w) -> (B, r, h, w)
        o = self.options
        if o.solver == "none":
            return z
        if self._fixed:
            return fixed_grid_solve(self.phi, z, o.solver, self._grid)
        calls = [0]

        def func(t, y):
            calls[0] += 1
            return self.phi(t, y)

        span = torch.tensor([0.0, 1.0], dtype=z.dtype if z.dtype == torch.float64 else torch.float32, device=z.device)
        kw = {"rtol": o.rtol, "atol": o.atol, "method": o.solver}
        if o.solver in STAGES:
            kw["options"] = {"step_size": o.step_size}
        if o.adjoint:
            zs = torchdiffeq.odeint_adjoint(func, z, span, adjoint_params=tuple(self.phi.parameters()), **kw)
        else:
            zs = torchdiffeq.odeint(func, z, span, **kw)
        self._nfe = calls[0]
        return zs[-1]

    def _correction(self, x, ode_hw, channels_last: bool):
        """γ ⊙ E(z1) on the ODE grid: (B, h, w, Cb) if channels_last else (B, Cb, h, w); x: (B, Ca, Ha, Wa)."""
        z = _reduce(x, ode_hw, self.options.reduce, self.reduce.weight.flatten(1), self.reduce.bias)  # (B, h, w, r)
        z = z.permute(0, 3, 1, 2)  # (B, r, h, w), channels_last strides
        z = self.in_norm(z)
        if self._recompute == "ode" and torch.is_grad_enabled() and self.phi is not None:
            z = checkpoint(self._solve, z, use_reentrant=False, preserve_rng_state=False)
        else:
            z = self._solve(z)  # (B, r, h, w), channels_last strides
        w = self.expand.weight.flatten(1) * self.gate[:, None]  # (Cb, r)
        b = self.expand.bias * self.gate  # (Cb,)
        if channels_last:
            return F.linear(z.permute(0, 2, 3, 1), w, b)  # (B, h, w, Cb)
        return torch.baddbmm(b[:, None], w.expand(len(z), -1, -1), z.flatten(2)).unflatten(2, ode_hw)

    def _check_input(self, name: str, t, chs: int, layout: str, size: tuple[int, int]) -> None:
        if not layouts.matches(t, layout, chs, size):
            raise GCSurgeryError(
                f"this GC-ODE branch takes {name} of shape {layouts.describe(layout, chs, size)} ({layout}), got "
                f"{tuple(t.shape)}. If gcify built it, the plan does not match the model (rebuild it with "
                "gcsurgery.plan(model)), or a token (NLC) model runs at another input size than the plan's (build the "
                "plan at the size you run)."
            )

    def _output(self, src, dst):
        """γ ⊙ E(z1) in dst's shape and layout (γ is 1 in gradient mode)."""
        lay = self.out_layout
        out_hw = tuple(self.out_size if lay == "NLC" else dst.shape[1:3] if lay == "NHWC" else dst.shape[2:])
        ode_hw = (-(-out_hw[0] // self.ode_stride), -(-out_hw[1] // self.ode_stride))
        # E runs in dst's memory order, except that upsampling is cheaper channels-last
        cl = lay != "NCHW" or ode_hw != out_hw or (not dst.is_contiguous() and dst.is_contiguous(memory_format=_CL))
        x = layouts.to_nchw(src, self.in_layout, self.in_size)  # (B, Ca, Ha, Wa)
        if self._recompute == "branch" and torch.is_grad_enabled():
            e = checkpoint(self._correction, x, ode_hw, cl, use_reentrant=False, preserve_rng_state=False)
        else:
            e = self._correction(x, ode_hw, cl)
        if ode_hw != out_hw:  # nearest upsampling
            e = F.interpolate(e.permute(0, 3, 1, 2), size=out_hw, mode="nearest").permute(0, 2, 3, 1)
        if cl:  # e: (B, Hb, Wb, Cb)
            e = e.flatten(1, 2) if lay == "NLC" else e.permute(0, 3, 1, 2) if lay == "NCHW" else e
        return e.to(dst.dtype)

    def _inject(self, src, dst):
        """Gradient mode: returns dst itself; hooks add the branch's bounded VJP to src's gradient and train
        the branch on ``mean((E(z1) - dst)²)``, both in backward."""
        if self._neutral or not (self.training and torch.is_grad_enabled() and dst.requires_grad):
            return dst
        o = self.options
        warm = (self.steps.float() / o.inject_warmup).clamp(max=1.0) if o.inject_warmup else 1.0
        with torch.no_grad():
            self.steps += 1
        leaf = src.detach().requires_grad_(src.requires_grad)
        with torch.enable_grad():
            e = self._output(leaf, dst)
        resid = (e.detach().float() - dst.detach().float()).mul_(2 / e.numel()).to(e.dtype)  # d mean(.²) / d e
        params = [p for p in self.parameters() if p.requires_grad]
        injected = {}

        def on_dst(g):  # dst's gradient: the VJP for src, then the branch's own (regression) gradient
            if leaf.requires_grad:
                injected["g"] = torch.autograd.grad(e, leaf, g, retain_graph=bool(params))[0]
            if params:
                self._fit(params, torch.autograd.grad(e, params, resid, allow_unused=True))

        def on_src(g):  # src's gradient from the network: add the injection, bounded relative to it
            inj = injected.pop("g", None)
            if inj is None:
                return None
            norm = inj.float().norm()
            ok = norm.isfinite()  # a diverged branch must not reach the network: a 0-d test, no host sync
            with torch.no_grad():
                self.dropped += ~ok
            scale = (o.inject * g.float().norm() / norm.clamp_min(1e-30)).clamp(max=1.0) * warm
            return g + torch.where(ok, inj * scale.to(g.dtype), 0)

        dst.register_hook(on_dst)
        if leaf.requires_grad:
            src.register_hook(on_src)
        return dst

    def _fit(self, params, grads) -> None:
        """Accumulates the regression gradients into the parameters' ``.grad``, their joint norm clipped to
        ``fit_clip``; a non-finite one is dropped (all of it) and counted."""
        pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        norm = torch.nn.utils.get_total_norm([g for _, g in pairs]).float()  # no sync; NaN if any is
        ok = norm.isfinite()
        clip = self.options.fit_clip
        with torch.no_grad():
            self.clipped += ok & (norm > clip)
            self.dropped += ~ok
        scale = (clip / norm.clamp_min(1e-30)).clamp(max=1.0)
        with torch.enable_grad():  # through each parameter's AccumulateGrad, where DDP's reducer hooks sit
            views = [p.view_as(p) for p, _ in pairs]
        torch.autograd.backward(views, [torch.where(ok, g * scale.to(g.dtype), 0) for _, g in pairs])

    def forward(self, src, dst):
        """Returns dst + γ ⊙ E(z1) (gradient mode: dst itself), with dst's shape, layout and dtype."""
        self._check_input("src", src, self.in_chs, self.in_layout, self.in_size)
        self._check_input("dst", dst, self.out_chs, self.out_layout, self.out_size)
        if src.shape[0] != dst.shape[0]:
            raise GCSurgeryError(f"GC-ODE src and dst batch sizes differ: {src.shape[0]} and {dst.shape[0]}.")
        if self.options.mode == "gradient":
            return self._inject(src, dst)
        e = self._output(src, dst)
        if self.options.out_clip != math.inf:
            e = self._clip_output(e, dst)
        return dst + e

    def _clip_output(self, e, dst):
        """e scaled per sample to at most ``out_clip`` × ‖dst‖ (factor 1, exactly, where it is smaller)."""
        dims = tuple(range(1, e.dim()))
        ne = torch.linalg.vector_norm(e, dim=dims, dtype=torch.float32)
        nd = torch.linalg.vector_norm(dst, dim=dims, dtype=torch.float32)
        k = (self.options.out_clip * nd / ne.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
        if self.training and torch.is_grad_enabled():
            self.capped += (k < 1).sum()  # on the device: no sync
        return e * k.to(e.dtype).view(-1, *(1,) * (e.dim() - 1))
