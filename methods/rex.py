"""REx: data-free residual quantization error expansion, group-sparse orders.

Paper: Yvinec, Dapogny, Cord, Bailly, "REx: Data-Free Residual Quantization Error Expansion",
NeurIPS 2023. Reference code: none public; this is an implementation from the description in
shared/docs/methods.md ("R_1 = Q(W), R_k = Q(W - sum_{j<k} R_j) for k = 2..K; orders k >= 2 kept
group-sparse, only the output channels with the largest residual norms, e.g. 50%"). Licence: ours.

Weights. Each planned layer's weight becomes R_1 + ... + R_K (``core.grid.SumGrid``): R_1 is the
base method's quantization of W; order k >= 2 quantizes the residual W - sum_{j<k} R_j of the kept
output channels only (zero elsewhere). Every order has its own grid (the base method's
``weight_grid`` of that order's masked residual: the protocol's min/max grid, per channel or per
tensor) at the layer's planned bits, and is rounded by the base method's ``round_weights``
(``base=rtn``: to nearest; ``base=squant``: SQuant's flips, mode ``squant``, default k table).
Kept channels of order k: the ceil(keep * O) output channels (at least one) with the largest L2 norm
of the residual entering order k, ties by channel index. ``orders=1`` is the base method exactly
(bitwise: the same grid and levels, no sum computed).

Effective bits per weight (``eff_wbits``, a field of every row; here with all orders), over the
planned (quantized) layers l with b_l bits and n_l weights, order k >= 2 keeping m_lk weights (kept
channels times weights per channel):

    eff_wbits = sum_l b_l * (n_l + sum_{k>=2} m_lk) / sum_l n_l

and ``rex_base_wbits`` the same without the orders >= 2 (the uniform point at the same settings,
first/last layers at their own bits included), so the reporter can place a REx point at its true
size next to uniform and mixed-precision points. Not counted (as for every uniform point of the
harness): the float scale and zero-point of each channel of each order, and the channel mask of
orders >= 2 (one bit per output channel). The row also has ``rex_orders``, ``rex_keep``,
``rex_base`` and ``rex_werr``: after each order, sum_l ||W_l - sum_{j<=k} R_j||^2 / sum_l ||W_l||^2.

Assumptions and deviations (what the description leaves open):
- Every order at the layer's own bits (the first/last layer's 8 bits where the protocol says so);
  the expansion applies to every planned layer, first and last included.
- keep counts output channels (the residual's group structure as described), and the same
  fraction applies to every order >= 2, each order re-selecting by its own residual.
- Activations: methods.md says nothing; REx expands the weights only. Assumed: activations on the
  uniform grid with the protocol's range rule, min/max on the calibration batches by default (also
  with base=squant: its ``squant`` range rule is available as protocol.act_range=squant).
- Not deployable: a sum of orders is not one uniform integer grid, so ``deploy=onnxruntime`` is
  refused before a model is built (``deploy_refusal``). An integer deployment would run K convs
  (the sparse ones on the kept channels) and add their outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from dfq_bench.methods.rtn import RTN
from dfq_bench.methods.squant import Squant
from torch import Tensor

from dfq_bench.config import ConfigError
from dfq_bench.core.grid import Grid, SumGrid
from dfq_bench.core.method import Method, QuantState
from dfq_bench.core.planner import LayerPlan

BASES = {"rtn": RTN, "squant": Squant}


def kept_channels(residual: Tensor, keep: float) -> Tensor:
    """Bool mask over the output channels (dim 0): the ceil(keep * O) largest residual L2 norms (at
    least one), ties by channel index."""
    o = residual.shape[0]
    n = min(o, max(1, math.ceil(round(keep * o, 9))))
    norms = residual.detach().reshape(o, -1).double().norm(dim=1)
    order = torch.sort(-norms, stable=True).indices
    mask = torch.zeros(o, dtype=torch.bool, device=residual.device)
    mask[order[:n]] = True
    return mask


def effective_bits(layers: list[tuple[int, int, list[int]]]) -> tuple[float, float]:
    """(eff_wbits, rex_base_wbits) of ``layers``: (bits b_l, weights n_l, [weights kept by each
    order >= 2]) per quantized layer (module docstring)."""
    n = sum(n_l for _, n_l, _ in layers)
    if n == 0:
        return float("nan"), float("nan")
    base = sum(b * n_l for b, n_l, _ in layers)
    extra = sum(b * sum(kept) for b, _, kept in layers)
    return (base + extra) / n, base / n


class Rex(Method):
    name = "rex"
    version = "1"
    default_act_range = "minmax"
    deploy_refusal = "its weights are a sum of quantized orders (residual expansion), not one uniform integer grid"
    mp_refusal = "its extra orders add weights a per-layer size budget does not count"

    @dataclass
    class Config:
        name: str = "rex"
        orders: int = 2  # K: quantized terms per weight (1 = the base method)
        keep: float = 0.5  # fraction of output channels kept in orders >= 2, by residual norm
        base: str = "rtn"  # rounding of every order: rtn | squant

    @staticmethod
    def check_config(c) -> None:
        """Values the types cannot express; one-line ``ConfigError`` (checked before any model is built)."""
        if c.orders < 1:
            raise ConfigError(f"method.orders={c.orders!r} is invalid; valid: an integer >= 1")
        if not 0 < c.keep <= 1:
            raise ConfigError(f"method.keep={c.keep!r} is invalid; valid: a fraction in (0, 1]")
        if c.base not in BASES:
            raise ConfigError(f"method.base={c.base!r} is invalid; valid: {', '.join(BASES)}")

    def __init__(self, cfg=None):
        super().__init__(cfg)  # checks it (check_config)
        self.base = BASES[self.cfg.base]()  # its default keys

    def weight_grid(self, w: Tensor, plan: LayerPlan, state: QuantState) -> Grid:
        return self.base.weight_grid(w, plan, state)

    def round_weights(self, w: Tensor, grid: Grid, plan: LayerPlan | None, state: QuantState | None = None) -> Tensor:
        return self.base.round_weights(w, grid, plan, None)  # state=None: the base keeps no row counts

    def round(self, state: QuantState) -> None:
        """Order 1 on the grid stage's grid, then each order k >= 2 on its own grid of its residual;
        ``state.grids`` becomes each layer's ``SumGrid`` and ``state.levels`` its (K, ...) levels."""
        c = self.cfg
        super().round(state)  # order 1: the base method's levels
        sizes, err, norm = [], [0.0] * c.orders, 0.0
        for p in state.plans:
            if p.name not in state.grids:
                continue
            w = p.module.weight.detach()
            grids, masks, levels = [state.grids[p.name]], [None], [state.levels[p.name]]
            approx = grids[0].dequant(levels[0])
            norm += float(w.double().pow(2).sum())
            err[0] += float((w.double() - approx.double()).pow(2).sum())
            kept = []
            for k in range(1, c.orders):
                residual = w - approx
                channels = kept_channels(residual, c.keep)
                mask = channels.reshape((-1,) + (1,) * (w.dim() - 1))
                r = torch.where(mask, residual, torch.zeros_like(residual))
                grid = self.weight_grid(r, p, state)
                q = self.round_weights(r, grid, p, state)
                grids.append(grid)
                masks.append(mask)
                levels.append(q)
                approx = approx + torch.where(mask, grid.dequant(q), torch.zeros_like(r))
                err[k] += float((w.double() - approx.double()).pow(2).sum())
                kept.append(int(channels.sum()) * (w.numel() // w.shape[0]))
            sizes.append((p.w_bits, w.numel(), kept))
            if c.orders > 1:
                state.grids[p.name] = SumGrid(grids, masks)
                state.levels[p.name] = torch.stack(levels)
        eff, base = effective_bits(sizes)
        state.info.update(rex_orders=c.orders, rex_keep=c.keep, rex_base=c.base, eff_wbits=eff,
                          rex_base_wbits=base, rex_werr=[e / norm if norm > 0 else 0.0 for e in err])


__all__ = ["Rex", "effective_bits", "kept_channels"]
