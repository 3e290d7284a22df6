"""GC-ODE for 1-D and 3-D CNNs: the branch of `gcode.py` with convolutions of the model's own dimensionality.

For feature maps (B, C, L) (audio, time series) or (B, C, D, H, W) (volumes, video)::

    z0  = R(pool(h_src))              # adaptive average pooling to dst's size, then 1x1 conv Ca -> r
    z1  = ODESolve(φ, z0, t ∈ [0, 1])  # φ(z, t) = pw(act(dw3(z) + a·t + b)), a fixed-step solver
    out = h_dst + γ ⊙ E(z1)           # E: 1x1 conv r -> Cb; γ per channel, folded into E's weights

With γ = 0 the branch adds exact zeros, so inserting it does not change the model. The options are
`gcode.ODEOptions`; this plain form supports the fixed-step solvers and phi="dwsep" (the default), and
refuses the others by name.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GCSurgeryError
from .gcode import ACTS, STAGES, ODEOptions, default_width, fixed_grid_solve

__all__ = ["GCODEND"]

CONVS = {1: (nn.Conv1d, F.conv1d), 3: (nn.Conv3d, F.conv3d)}


class PhiND(nn.Module):
    """φ(z, t) = pw(act(dw3(z) + a·t + b)) on (B, r, *size)."""

    def __init__(self, chs: int, dims: int, options: ODEOptions):
        super().__init__()
        conv, self.conv_fn = CONVS[dims]
        self.act = ACTS[options.act]
        self.dw = conv(chs, chs, 3, padding=1, groups=chs, bias=False)
        bound = 1 / math.sqrt(self.dw.weight[0].numel())
        self.t_scale = nn.Parameter(torch.empty(chs).uniform_(-bound, bound))  # a
        self.t_bias = nn.Parameter(torch.empty(chs).uniform_(-bound, bound))  # b
        self.pw = conv(chs, chs, 1)

    def forward(self, t, z):
        bias = torch.add(self.t_bias, self.t_scale, alpha=t)
        return self.pw(self.act(self.conv_fn(z, self.dw.weight, bias, padding=1, groups=self.dw.groups)))


class GCODEND(nn.Module):
    """GC-ODE branch between 1-D (NCL) or 3-D (NCDHW) states: `branch(src, dst)` = `dst + γ ⊙ E(ODESolve(φ, R(src)))`.

    Args:
        in_chs: channels of src.
        out_chs: channels of dst.
        in_size: spatial size of src, (L,) or (D, H, W).
        out_size: spatial size of dst.
        options: `ODEOptions` (fixed-step solvers and phi="dwsep" only).
    """

    def __init__(self, in_chs: int, out_chs: int, in_size, out_size, *, options: ODEOptions = ODEOptions()):  # noqa: B008 (frozen, hence safe)
        super().__init__()
        sizes = (tuple(in_size), tuple(out_size))
        if len(sizes[0]) not in CONVS or len(sizes[0]) != len(sizes[1]):
            raise GCSurgeryError(f"GCODEND takes 1-D or 3-D sizes of one dimensionality, got {in_size} and {out_size}.")
        supported = options.solver in STAGES and options.phi == "dwsep" and options.norm == "none"
        if not supported or options.adjoint or options.mode != "branch" or options.out_clip != math.inf:
            raise GCSurgeryError(
                f"1-D and 3-D GC-ODE branches support solver in {tuple(STAGES)}, adjoint=False, phi='dwsep', "
                f"norm='none', mode='branch' and out_clip=math.inf; got solver={options.solver!r}, "
                f"adjoint={options.adjoint}, phi={options.phi!r}, norm={options.norm!r}, mode={options.mode!r}, "
                f"out_clip={options.out_clip!r}."
            )
        self.in_chs, self.out_chs, (self.in_size, self.out_size) = in_chs, out_chs, sizes
        self.dims, self.options = len(sizes[0]), options
        self.width = r = options.width or default_width(out_chs)
        conv, self.conv_fn = CONVS[self.dims]
        with torch.random.fork_rng(devices=[], enabled=options.seed is not None):
            if options.seed is not None:
                torch.manual_seed(options.seed)
            self.reduce = conv(in_chs, r, 1)  # R
            self.phi = PhiND(r, self.dims, options)
            self.expand = conv(r, out_chs, 1)  # E
        self.gate = nn.Parameter(torch.full((out_chs,), float(options.gate_init)))  # γ
        self._neutral = False  # gcsurgery.gcode.neutral sets it; the zero gate is what makes this branch neutral
        self._grid = options.grid

    @property
    def nfe(self) -> int:
        return STAGES[self.options.solver] * (len(self._grid) - 1)

    def extra_repr(self) -> str:
        return f"{self.in_chs}x{self.in_size} -> {self.out_chs}x{self.out_size}, r={self.width}, nfe={self.nfe}"

    def _check(self, name: str, t: torch.Tensor, chs: int) -> None:
        if t.dim() != self.dims + 2 or t.shape[1] != chs:
            want = "(B, C, L)" if self.dims == 1 else "(B, C, D, H, W)"
            raise GCSurgeryError(
                f"this {self.dims}-D GC-ODE branch takes {name} of shape {want} with C={chs}, got {tuple(t.shape)}; "
                "the plan does not match the model (rebuild it with gcsurgery.plan(model))."
            )

    def forward(self, src, dst):
        """Returns dst + γ ⊙ E(z1), with dst's shape and dtype."""
        self._check("src", src, self.in_chs)
        self._check("dst", dst, self.out_chs)
        size = dst.shape[2:]
        x = src if src.shape[2:] == size else getattr(F, f"adaptive_avg_pool{self.dims}d")(src, size)
        z = fixed_grid_solve(self.phi, self.reduce(x), self.options.solver, self._grid)  # (B, r, *size)
        shape = (-1,) + (1,) * (self.dims + 1)
        w, b = self.expand.weight * self.gate.view(shape), self.expand.bias * self.gate
        return dst + self.conv_fn(z, w, b).to(dst.dtype)
