"""Uniform affine grids: the integer levels of a tensor and back. The one place the grid math lives.

Conventions (those of SQuant, ZeroQ and GENIE, see shared/docs/methods.md):
- A grid maps x to the integer level q = clamp(round(x / scale) + zero_point, qmin, qmax) and back to
  (q - zero_point) * scale. Zero-points are integers, so 0.0 is always exactly representable.
- Weights use a signed grid [-2^(b-1), 2^(b-1) - 1]. Asymmetric: scale = (max - min) / (2^b - 1) over
  a range widened to include 0 (``protocol.w_range=minmax``: the channel's [min, max] as is, SQuant's
  reference grid). Symmetric: scale = max|w| / (2^(b-1) - 1), zero-point 0.
- Activations are per tensor. A non-negative range uses the unsigned grid [0, 2^b - 1]; a signed one
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


def activation_grid(lo: float, hi: float, bits: int, symmetric: bool) -> Grid:
    signed = symmetric and lo < 0
    return grid_from_range(torch.tensor(lo), torch.tensor(hi), bits, symmetric, signed)
