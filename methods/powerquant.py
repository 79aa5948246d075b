"""PowerQuant: non-uniform weight quantization through a power automorphism, exponent found data-free.

Paper: Yvinec, Dapogny, Cord, Bailly, "PowerQuant: Automorphism Search for Non-Uniform Quantization",
ICLR 2023 (NUPES, TPAMI 2025, extends it by learning the exponent with gradient-based PTQ; not
implemented here). Reference code: none public; this is an implementation from the description in
shared/docs/methods.md ("w -> sign(w) |w|^a, quantize that uniformly, map back with the inverse
power; a found data-free by minimizing the weight reconstruction error of each layer, locally convex").
Licence: ours.

Weights (``core.grid.PowerGrid``). u = sign(w) |w|^a is put on the protocol's uniform weight grid
(``core.grid.weight_grid``: per channel or per tensor, asymmetric or symmetric, ``w_range``) and
rounded to nearest; the weight is sign(v) |v|^(1/a) of the dequantized v. So every channel takes at
most 2^b distinct values, denser near 0 for a < 1. At a == 1 no power is computed: the grid and the
levels are RTN's, bit for bit.

The exponent: a in [``a_min``, ``a_max``] minimizing E(a) = ||W - Q_a(W)||^2 over the layer's
weights (summed in float64), per layer (``scope=per_layer``, default) or one a for the network
(``scope=global``: the sum over layers of E_l(a) / ||W_l||^2, so that no layer dominates by its size).
``method.a`` fixes the exponent instead (no search; ``a=1`` is RTN). The search evaluates E on every
point of the lattice a_j = a_min + j * tol (j = 0, 1, ... while a_j <= a_max; rounded to 10 decimals,
so a = 1 is exactly a lattice point whenever (1 - a_min) / tol is an integer, as by default) and
takes the smallest (ties: the point nearest a = 1, then the smaller a). So the result is the
minimizer of E on that lattice, to the tolerance tol, and never worse than RTN in E when a = 1 is on
the lattice. Why not a convex search (golden section, bounded Brent): E(a) is convex only in its
envelope. Rounding makes it jagged: on resnet20_fmnist at 3-4 bits, 7 to 111 strict local minima per
layer on [0.1, 2] at step 1e-3, within ~0.1% of each other near the optimum; on small or 6-bit
tensors the jags reach several percent. A coarse scan (25 points) refined by the full lattice within
one coarse step of its best point missed the lattice minimizer in 33 of 288 synthetic cases (tol
0.005 and 0.01, 2-6 bits; E up to 10% above it), so the search is the full scan, and ``tol`` sets
its cost: (a_max - a_min) / tol + 1 evaluations of Q_a per layer (131 by default). The row records
``powerquant_a`` (layer -> a) and ``powerquant_scope``.

Assumptions and deviations (what the description leaves open):
- Grid of u: the protocol's. The paper's power function is symmetric (odd) and so is its grid
  (``protocol.w_symmetric=true``: scale = max|u| / (2^(b-1) - 1), zero-point 0). With the protocol's
  asymmetric default we apply the power map, then the asymmetric min/max grid of u with its integer
  zero-point (0 stays exact); at a = 1 this is RTN's grid.
- Default interval [0.2, 1.5] and tol 0.01 are ours (a > 1 included, so a = 1 is inside the
  interval and the search is not biased towards a < 1; per-layer optima on resnet20_fmnist are
  0.63-1.01).
- Per-layer exponent by default, a key for the global one: methods.md says "of each layer".
- Activations: methods.md states nothing about them. The paper says its quantized network needs
  only a modified activation function, which suggests activations are power-mapped too; that is not
  implemented (the harness's activation quantizer is uniform). Assumed: activations on the uniform
  grid with the protocol's range rule, min/max on the calibration batches by default, as RTN.
  Weight-only runs (abits=null) do not depend on this.
- Not deployable: a power grid is not one uniform integer grid, so ``deploy=onnxruntime`` is
  refused before a model is built (``deploy_refusal``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from dfq_bench.config import ConfigError
from dfq_bench.core.grid import PowerGrid, power_weight_grid
from dfq_bench.core.method import Method, QuantState
from dfq_bench.core.planner import LayerPlan

SCOPES = ("per_layer", "global")


def lattice(a_min: float, a_max: float, tol: float) -> list[float]:
    """a_min + j * tol for j = 0.. while <= a_max, rounded to 10 decimals (so 1.0 is exactly 1.0)."""
    n = int((a_max - a_min) / tol + 1e-9)
    return [round(a_min + j * tol, 10) for j in range(n + 1)]


def search_exponent(err: Callable[[float], float], a_min: float, a_max: float,
                    tol: float) -> tuple[float, dict[float, float]]:
    """The point of ``lattice(a_min, a_max, tol)`` minimizing ``err`` (every point evaluated; ties:
    the one nearest a = 1, then the smaller a).

    Returns:
        (the best a, every lattice a -> its err).
    """
    seen = {a: float(err(a)) for a in lattice(a_min, a_max, tol)}
    return min(seen, key=lambda a: (seen[a], abs(a - 1.0), a)), seen


def recon_error(w: Tensor, grid: PowerGrid) -> float:
    """||w - Q(w)||^2 in float64."""
    return float((w.double() - grid.fake(w).double()).pow(2).sum())


class PowerQuant(Method):
    name = "powerquant"
    version = "1"
    default_act_range = "minmax"
    deploy_refusal = "its weights lie on a power grid (sign(v) |v|^(1/a)), not a uniform integer grid"

    @dataclass
    class Config:
        name: str = "powerquant"
        scope: str = "per_layer"  # per_layer: one a per layer | global: one a for every layer
        a_min: float = 0.2  # the search interval of a
        a_max: float = 1.5
        tol: float = 0.01  # the search's lattice step: a is a_min + j * tol
        a: float | None = None  # a fixed exponent (no search); 1.0 = RTN

    @staticmethod
    def check_config(c) -> None:
        """Values the types cannot express; one-line ``ConfigError`` (checked before any model is built)."""
        if c.scope not in SCOPES:
            raise ConfigError(f"method.scope={c.scope!r} is invalid; valid: {', '.join(SCOPES)}")
        if not c.a_min > 0:
            raise ConfigError(f"method.a_min={c.a_min!r} is invalid; valid: a number > 0")
        if not c.a_max > c.a_min:
            raise ConfigError(f"method.a_max={c.a_max!r} is invalid; valid: a number > method.a_min={c.a_min!r}")
        if not 0 < c.tol <= c.a_max - c.a_min:
            raise ConfigError(f"method.tol={c.tol!r} is invalid; valid: a number in (0, a_max - a_min]")
        if c.a is not None and not c.a > 0:
            raise ConfigError(f"method.a={c.a!r} is invalid; valid: a number > 0, or null (search)")

    def _grid(self, w: Tensor, a: float, bits: int, state: QuantState) -> PowerGrid:
        p = state.protocol
        return power_weight_grid(w, a, bits, p.w_granularity == "per_channel", p.w_symmetric,
                                 include_zero=getattr(p, "w_range", "include_zero") == "include_zero")

    def _search(self, err: Callable[[float], float]) -> float:
        c = self.cfg
        return search_exponent(err, c.a_min, c.a_max, c.tol)[0]

    def grid(self, state: QuantState) -> None:
        """Per-layer grids (``weight_grid``); for ``scope=global`` the one exponent is searched first."""
        state.scratch["a"] = {}
        if self.cfg.a is None and self.cfg.scope == "global":
            layers = [(p.module.weight.detach(), p.w_bits) for p in state.plans if p.w_bits is not None]
            norms = [float(w.double().pow(2).sum()) for w, _ in layers]

            def err(a: float) -> float:
                return sum(recon_error(w, self._grid(w, a, b, state)) / n
                           for (w, b), n in zip(layers, norms, strict=True) if n > 0)

            state.scratch["a_global"] = self._search(err)
        super().grid(state)
        state.info["powerquant_scope"] = "fixed" if self.cfg.a is not None else self.cfg.scope
        state.info["powerquant_a"] = dict(state.scratch["a"])

    def weight_grid(self, w: Tensor, plan: LayerPlan, state: QuantState) -> PowerGrid:
        """The layer's power grid, at the fixed, the global or its own searched exponent."""
        if self.cfg.a is not None:
            a = float(self.cfg.a)
        elif "a_global" in state.scratch:
            a = state.scratch["a_global"]
        else:
            a = self._search(lambda a: recon_error(w, self._grid(w, a, plan.w_bits, state)))
        state.scratch["a"][plan.name] = a
        return self._grid(w, a, plan.w_bits, state)


__all__ = ["PowerQuant", "lattice", "recon_error", "search_exponent"]
