"""Differentiable quantizers for methods that learn their quantization (GENIE-M, BRECQ/QDrop style).

The grid itself (scale, integer zero-point, level range) is always a ``core.grid.Grid`` built by
``core.grid.grid_from_range``; this module only adds what learning needs:

- ``lp_grid_search``: the scale initialisation used by BRECQ/GENIE: shrink the min/max range by
  ratios 1.00, 0.99, ..., 0.01 and keep, per row, the grid minimising mean |x - Q(x)|^p (p = 2.4).
- ``round_ste`` and ``lsq_fake_quant``: fake quantization whose gradient reaches the step size
  (LSQ, Esser et al. 2020; without LSQ's gradient scaling, as GENIE's code).
- ``SoftRoundWeight``: AdaRound soft bits (rectified sigmoid, zeta 1.1, gamma -0.1) on a fixed
  integer base floor(w / s0), with a learnable per-channel step size (GENIE-M). Registered as a
  ``torch.nn.utils.parametrize`` parametrization of a layer's ``weight``; ``hard_levels`` gives the
  final integer levels, so the learned weights are exactly ``Grid(s, zero_point).dequant(levels)``.
- ``SteWeight``: a weight kept on its fixed grid in every forward while the float weight trains
  (straight-through rounding), for fine-tuning (``Method.weight_quantizer = "ste"``).
- ``MinMaxSteWeight``: the zero-shot QAT references' weight quantizer: the grid recomputed from the float
  weight's per-output-channel min/max at every forward (``core.grid.weight_grid``), straight-through.
- ``LsqActQuant``: per-tensor activation fake-quant with a learned step size and QDrop (each element
  kept in float with probability ``drop_p`` while training); ``to_act_quant`` freezes it into the
  shared ``core.modules.ActQuant``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfq_bench.core.grid import Grid, activation_grid, grid_from_range, weight_grid
from dfq_bench.core.modules import ActQuant

ZETA, GAMMA = 1.1, -0.1
# Larger inputs are subsampled (fixed seed, with replacement) for the error of each candidate only;
# the candidate ranges always come from the full tensor's min/max.
_MAX_SEARCH_ELEMS = 1 << 16


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (ties to even) forward; identity gradient."""
    return (torch.round(x) - x).detach() + x


def lsq_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """(clamp(round(x / s) + z, qmin, qmax) - z) * s with straight-through rounding: the gradient
    reaches ``x`` inside the grid and ``scale`` everywhere (LSQ)."""
    return (torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def _subsample(rows: Tensor) -> Tensor:
    if rows.shape[1] <= _MAX_SEARCH_ELEMS:
        return rows
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, rows.shape[1], (_MAX_SEARCH_ELEMS,), generator=g).to(rows.device)
    return rows[:, idx]


def lp_grid_search(rows: Tensor, bits: int, symmetric: bool, signed: bool, p: float = 2.4,
                   n_ratios: int = 100) -> Grid:
    """Per row of ``rows`` (R, K), the grid over [r*min, r*max] (r = 1, 0.99, ..., 1/n_ratios)
    minimising mean |x - Q(x)|^p. Returns a Grid whose scale/zero_point have shape (R, 1)."""
    rows = rows.detach()
    lo, hi = rows.min(dim=1, keepdim=True).values, rows.max(dim=1, keepdim=True).values
    sample = _subsample(rows)
    best_err = torch.full_like(lo, float("inf"))
    best = grid_from_range(lo, hi, bits, symmetric, signed)
    for i in range(n_ratios):
        r = 1.0 - i / n_ratios
        grid = grid_from_range(lo * r, hi * r, bits, symmetric, signed)
        err = (sample - grid.fake(sample)).abs().pow(p).mean(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = Grid(torch.where(better, grid.scale, best.scale),
                    torch.where(better, grid.zero_point, best.zero_point), grid.qmin, grid.qmax)
    return best


def weight_grid_lp(w: Tensor, bits: int, per_channel: bool, symmetric: bool, p: float = 2.4) -> Grid:
    """``lp_grid_search`` on a weight tensor (per output channel or per tensor), broadcastable to w."""
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    g = lp_grid_search(rows, bits, symmetric, signed=True, p=p)
    shape = (-1,) + (1,) * (w.dim() - 1) if per_channel else ()
    return Grid(g.scale.reshape(shape), g.zero_point.reshape(shape), g.qmin, g.qmax)


def act_grid_lp(x: Tensor, bits: int, symmetric: bool, p: float = 2.4, n_ratios: int = 100) -> Grid:
    """Per-tensor activation grid (``core.grid.activation_grid`` semantics: signed only when symmetric
    and the data has negatives) chosen by the |x - Q(x)|^p search over shrunk min/max ranges."""
    flat = _subsample(x.detach().reshape(1, -1))[0]
    lo, hi = float(x.min()), float(x.max())
    best, best_err = None, float("inf")
    for i in range(n_ratios):
        r = 1.0 - i / n_ratios
        grid = activation_grid(lo * r, hi * r, bits, symmetric)
        err = float((flat - grid.fake(flat.to(grid.scale.dtype))).abs().pow(p).mean())
        if err < best_err:
            best, best_err = grid, err
    return best


def rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """v with rectified_sigmoid(v) = h for h in (0, 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


class SoftRoundWeight(nn.Module):
    """AdaRound weight quantizer with a learnable step size: w_q = s * (clamp(B + h(V) + z) - z),
    B = floor(w / s0) fixed at init, h the rectified sigmoid. At init h(V) = frac(w / s0), so the
    soft weight equals w wherever w is inside the grid. ``hard`` switches h(V) to (V >= 0)."""

    def __init__(self, w: Tensor, grid: Grid):
        super().__init__()
        w = w.detach()
        x = w / grid.scale
        base = torch.floor(x)
        self.register_buffer("base", base)
        self.register_buffer("zero_point", grid.zero_point.detach().clone())
        self.qmin, self.qmax = grid.qmin, grid.qmax
        self.scale = nn.Parameter(grid.scale.detach().clone())
        self.logit = nn.Parameter(inverse_rectified_sigmoid((x - base).clamp(1e-4, 1 - 1e-4)))
        self.hard = False

    def soft_bits(self) -> Tensor:
        return rectified_sigmoid(self.logit)

    def hard_levels(self) -> Tensor:
        """Final integer levels (float tensor), clamped to the grid."""
        return torch.clamp(self.base + (self.logit >= 0).to(self.base.dtype) + self.zero_point,
                           self.qmin, self.qmax)

    def grid(self) -> Grid:
        return Grid(self.scale.detach().clone(), self.zero_point.clone(), self.qmin, self.qmax)

    def round_loss(self, beta: float) -> Tensor:
        """AdaRound's regulariser: sum of 1 - |2h - 1|^beta (pushes every soft bit to 0 or 1)."""
        return (1.0 - (2.0 * self.soft_bits() - 1.0).abs().pow(beta)).sum()

    def forward(self, w: Tensor) -> Tensor:  # the parametrized weight; ``w`` (original) is unused
        if self.hard:
            return (self.hard_levels() - self.zero_point) * self.scale
        levels = torch.clamp(self.base + self.soft_bits() + self.zero_point, self.qmin, self.qmax)
        return (levels - self.zero_point) * self.scale


class SteWeight(nn.Module):
    """Parametrization w -> grid.fake(w) with a straight-through gradient: the float weight trains,
    the layer always computes with a weight on ``grid`` (at most qmax - qmin + 1 levels per channel)."""

    def __init__(self, grid: Grid):
        super().__init__()
        self.register_buffer("scale", grid.scale.detach().clone())
        self.register_buffer("zero_point", grid.zero_point.detach().clone())
        self.qmin, self.qmax = grid.qmin, grid.qmax

    def forward(self, w: Tensor) -> Tensor:
        return lsq_fake_quant(w, self.scale, self.zero_point, self.qmin, self.qmax)


class MinMaxSteWeight(nn.Module):
    """Parametrization w -> grid(w).fake(w) where grid(w) is ``core.grid.weight_grid`` of the current float
    weight (asymmetric, per output channel, the channel's [min, max] as is unless ``include_zero``),
    recomputed at every forward (not differentiated); straight-through (identity) gradient. ``grid(w)`` gives
    the grid the last forward used."""

    def __init__(self, bits: int, per_channel: bool = True, include_zero: bool = False):
        super().__init__()
        self.bits, self.per_channel, self.include_zero = bits, per_channel, include_zero

    def grid(self, w: Tensor) -> Grid:
        return weight_grid(w.detach(), self.bits, self.per_channel, symmetric=False, include_zero=self.include_zero)

    def forward(self, w: Tensor) -> Tensor:
        wd = w.detach()  # identity gradient everywhere: the range is the weight's own, nothing is clipped
        return w + (self.grid(wd).fake(wd) - wd)


class LsqActQuant(nn.Module):
    """Per-tensor activation quantizer with a learned step size (LSQ) and QDrop.

    States: ``init`` (the first call sets the grid by ``act_grid_lp`` on that batch, then quantizes),
    ``on``. In training mode with ``drop_p`` > 0 each element is kept in float with probability
    ``drop_p`` (QDrop), drawn from ``generator`` so that runs are reproducible.
    """

    def __init__(self, bits: int, symmetric: bool, drop_p: float = 0.0, p: float = 2.4,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.bits, self.symmetric, self.drop_p, self.p = bits, symmetric, drop_p, p
        self.generator = generator
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.qmin, self.qmax = 0, 2**bits - 1
        self.state = "init"

    def init_from(self, x: Tensor) -> None:
        grid = act_grid_lp(x, self.bits, self.symmetric, self.p)
        with torch.no_grad():
            self.scale.fill_(float(grid.scale))
            self.zero_point.fill_(float(grid.zero_point))
        self.qmin, self.qmax = grid.qmin, grid.qmax
        self.state = "on"

    def forward(self, x: Tensor) -> Tensor:
        if self.state == "init":
            self.init_from(x)
        xq = lsq_fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax)
        if self.training and self.drop_p > 0:
            keep = torch.rand(x.shape, generator=self.generator, device=x.device) < self.drop_p
            xq = torch.where(keep, x, xq)
        return xq


def to_act_quant(q: LsqActQuant) -> ActQuant:
    """The frozen ``core.modules.ActQuant`` computing exactly what ``q`` computes in eval mode."""
    aq = ActQuant(q.bits, q.symmetric)
    scale, zp = float(q.scale.detach()), int(q.zero_point)
    aq.scale.fill_(scale)
    aq.zero_point.fill_(zp)
    aq.qmin, aq.qmax = q.qmin, q.qmax
    aq.lo, aq.hi = (q.qmin - zp) * scale, (q.qmax - zp) * scale
    aq.state = "on"
    return aq.to(q.scale.device)
