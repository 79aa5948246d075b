"""Uniform affine grids: the integer levels of a tensor and back. The one place the grid math lives.

Conventions (those of SQuant, ZeroQ and GENIE, see shared/docs/methods.md):
- A grid maps x to the integer level q = clamp(round(x / scale) + zero_point, qmin, qmax) and back to
  (q - zero_point) * scale. Zero-points are integers, so 0.0 is always exactly representable.
- Weights use a signed grid [-2^(b-1), 2^(b-1) - 1]. Asymmetric: scale = (max - min) / (2^b - 1) over
  a range widened to include 0 (``protocol.w_range=minmax``: the channel's [min, max] as is, SQuant's
  reference grid). Symmetric: scale = max|w| / (2^(b-1) - 1), zero-point 0.
- Activations are per tensor (or per channel, or per sample and channel: ``protocol.a_granularity``, the
  same grid with tensor ranges). A non-negative range uses the unsigned grid [0, 2^b - 1]; a signed one
  uses the signed grid when symmetric, and the unsigned grid with a zero-point when asymmetric.
- torch.round rounds exact .5 ties to even (the paper-era SQuant kernel rounded them up).

A grid is any object with ``scaled``, ``levels``, ``dequant``, ``fake`` and ``qmin``/``qmax`` (the
``grid`` stage of ``core.method`` returns one per layer); ``Grid`` is the uniform one. A non-uniform
grid implements the same five members.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer level range of a ``bits``-bit grid."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass
class Grid:
    """A uniform affine grid; ``scale`` and ``zero_point`` broadcast against the quantized tensor."""

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int

    def scaled(self, x: Tensor) -> Tensor:
        """x in units of the grid step, shifted by the zero-point (not yet rounded or clamped)."""
        return x / self.scale + self.zero_point

    def levels(self, x: Tensor) -> Tensor:
        """Round-to-nearest integer levels (as a float tensor), clamped to the grid."""
        return torch.clamp(torch.round(self.scaled(x)), self.qmin, self.qmax)

    def dequant(self, q: Tensor) -> Tensor:
        return (q - self.zero_point) * self.scale

    def fake(self, x: Tensor) -> Tensor:
        return self.dequant(self.levels(x))


def grid_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool, signed: bool,
                    include_zero: bool = True) -> Grid:
    """Grid covering [lo, hi], widened to include 0 (``include_zero=False``, asymmetric only: the range
    as is, SQuant's reference weight grid; its integer zero-point may then lie outside [qmin, qmax], and
    a channel with lo == hi keeps the widened grid). ``lo``/``hi`` may be per-channel tensors."""
    lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
    dtype = lo.dtype if lo.is_floating_point() else torch.float32
    lo, hi = lo.to(dtype), hi.to(dtype)
    if include_zero or symmetric:
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    else:
        flat = hi <= lo  # no width of its own: the widened range (still exact at lo == hi)
        lo, hi = torch.where(flat, torch.clamp(lo, max=0.0), lo), torch.where(flat, torch.clamp(hi, min=0.0), hi)
    qmin, qmax = qrange(bits, signed)
    if symmetric:
        amax = torch.maximum(-lo, hi) if signed else hi
        scale = amax / qmax
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = qmin - torch.round(lo / safe)
        if include_zero:
            zero_point = torch.clamp(zero_point, qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero channel: any scale works
    return Grid(scale, zero_point, qmin, qmax)


def weight_grid(w: Tensor, bits: int, per_channel: bool, symmetric: bool, include_zero: bool = True) -> Grid:
    """Min/max grid of a weight tensor: per output channel (dim 0) or per tensor; signed levels.
    ``include_zero=False``: the ``protocol.w_range=minmax`` grid (see ``grid_from_range``)."""
    if per_channel:
        flat = w.detach().reshape(w.shape[0], -1)
        shape = (-1,) + (1,) * (w.dim() - 1)
        lo, hi = flat.min(dim=1).values.reshape(shape), flat.max(dim=1).values.reshape(shape)
    else:
        lo, hi = w.detach().min(), w.detach().max()
    return grid_from_range(lo, hi, bits, symmetric, signed=True, include_zero=include_zero)


def activation_grid(lo, hi, bits: int, symmetric: bool) -> Grid:
    """The activation grid of [lo, hi]: floats (per tensor) or tensors (one range per channel, or per sample
    and channel: ``protocol.a_granularity``). Signed only when symmetric and some range reaches below 0."""
    lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
    signed = symmetric and bool((lo < 0).any())
    return grid_from_range(lo, hi, bits, symmetric, signed)


# ---------------------------------------------------------------------------------------------
# Non-uniform grids: the same five members as ``Grid``. Neither is one uniform integer grid, so a
# method using one cannot be exported for integer execution (its ``deploy_refusal``, checked by
# config.validate_config before a model is built).


def power(x: Tensor, a: float) -> Tensor:
    """sign(x) |x|^a; exactly ``x`` at a == 1 (no pow is computed)."""
    return x if a == 1 else torch.sign(x) * x.abs().pow(a)


@dataclass
class PowerGrid:
    """PowerQuant's grid: a uniform grid on u = sign(w) |w|^a, mapped back by sign(v) |v|^(1/a).

    ``uniform`` is the protocol's grid of u (``power_weight_grid``), so the levels of a channel are
    still at most 2^b integers and its values at most 2^b distinct reals; a < 1 puts them closer
    together near 0. At a == 1 every member is the uniform grid's own (bitwise RTN). ``scale`` and
    ``zero_point`` are the uniform grid's (``QuantLayer`` keeps them; its ``weight_levels()``
    holds only for a == 1)."""

    a: float
    uniform: Grid

    @property
    def scale(self) -> Tensor:
        return self.uniform.scale

    @property
    def zero_point(self) -> Tensor:
        return self.uniform.zero_point

    @property
    def qmin(self) -> int:
        return self.uniform.qmin

    @property
    def qmax(self) -> int:
        return self.uniform.qmax

    def scaled(self, x: Tensor) -> Tensor:
        return self.uniform.scaled(power(x, self.a))

    def levels(self, x: Tensor) -> Tensor:
        return self.uniform.levels(power(x, self.a))

    def dequant(self, q: Tensor) -> Tensor:
        return power(self.uniform.dequant(q), 1.0 / self.a)

    def fake(self, x: Tensor) -> Tensor:
        return self.dequant(self.levels(x))


def power_weight_grid(w: Tensor, a: float, bits: int, per_channel: bool, symmetric: bool,
                      include_zero: bool = True) -> PowerGrid:
    """The ``PowerGrid`` of a weight tensor: ``weight_grid`` (the protocol's min/max grid) of
    sign(w) |w|^a. sign and |.|^a commute with the range rules: the power map is odd and monotone,
    so u's per-channel [min, max] is the power of w's, and u = 0 where w = 0."""
    return PowerGrid(float(a), weight_grid(power(w.detach(), a), bits, per_channel, symmetric, include_zero))


@dataclass
class SumGrid:
    """A weight made of several quantized terms (REx's residual orders): levels ``q`` of shape
    (K, *weight.shape), q[k] on ``grids[k]``, and w_hat = sum_k mask_k * grids[k].dequant(q[k]).

    ``masks[k]`` is a bool tensor broadcasting against the weight (REx: the output channels the
    order keeps), or None for all; order 0 is always dense. ``levels(x)`` is the expansion by round
    to nearest on these fixed grids: q[0] = levels of x, q[k] = levels of the masked residual
    x - (the first k orders). K == 1: every member is ``grids[0]``'s own. ``scaled``, ``scale``,
    ``zero_point``, ``qmin``/``qmax`` are order 0's (``QuantLayer`` keeps them)."""

    grids: list
    masks: list

    @property
    def scale(self) -> Tensor:
        return self.grids[0].scale

    @property
    def zero_point(self) -> Tensor:
        return self.grids[0].zero_point

    @property
    def qmin(self) -> int:
        return self.grids[0].qmin

    @property
    def qmax(self) -> int:
        return self.grids[0].qmax

    def scaled(self, x: Tensor) -> Tensor:
        return self.grids[0].scaled(x)

    def term(self, k: int, q: Tensor) -> Tensor:
        """Order k's contribution: its dequantized levels, zero outside its mask."""
        v = self.grids[k].dequant(q)
        return v if self.masks[k] is None else torch.where(self.masks[k], v, torch.zeros_like(v))

    def levels(self, x: Tensor) -> Tensor:
        out, residual = [], x
        for k, grid in enumerate(self.grids):
            r = residual if self.masks[k] is None else torch.where(self.masks[k], residual, torch.zeros_like(residual))
            out.append(grid.levels(r))
            if k + 1 < len(self.grids):
                residual = residual - self.term(k, out[-1])
        return torch.stack(out)

    def dequant(self, q: Tensor) -> Tensor:
        w = self.term(0, q[0])
        for k in range(1, len(self.grids)):
            w = w + self.term(k, q[k])
        return w

    def fake(self, x: Tensor) -> Tensor:
        return self.dequant(self.levels(x))
