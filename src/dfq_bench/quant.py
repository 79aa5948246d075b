"""Quantization primitives shared by every method: uniform affine grids, weight fake-quantization,
activation fake-quant modules, BN folding, and the planners (per-layer bits; the protocol's rules by
default). The stages that compose them are in ``method.py``.

Conventions (those of SQuant, ZeroQ and GENIE, see shared/docs/methods.md):
- A grid maps x to the integer level q = clamp(round(x / scale) + zero_point, qmin, qmax) and back to
  (q - zero_point) * scale. Zero-points are integers, so 0.0 is always exactly representable.
- Weights use a signed grid [-2^(b-1), 2^(b-1) - 1]. Asymmetric: scale = (max - min) / (2^b - 1) over
  a range widened to include 0. Symmetric: scale = max|w| / (2^(b-1) - 1), zero-point 0.
- Activations are per tensor. A non-negative range uses the unsigned grid [0, 2^b - 1]; a signed one
  uses the signed grid when symmetric, and the unsigned grid with a zero-point when asymmetric.
- torch.round rounds exact .5 ties to even (the paper-era SQuant kernel rounded them up).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfq_bench.graph import BATCHNORM, CONV_LINEAR, TraceError, conv_bn_pairs, module_conv_bn_pairs, split_norm_act
from dfq_bench.registry import Registry


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


def grid_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool, signed: bool) -> Grid:
    """Grid covering [lo, hi] (widened to include 0). ``lo``/``hi`` may be per-channel tensors."""
    lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
    dtype = lo.dtype if lo.is_floating_point() else torch.float32
    lo, hi = torch.clamp(lo.to(dtype), max=0.0), torch.clamp(hi.to(dtype), min=0.0)
    qmin, qmax = qrange(bits, signed)
    if symmetric:
        amax = torch.maximum(-lo, hi) if signed else hi
        scale = amax / qmax
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(qmin - torch.round(lo / safe), qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero channel: any scale works
    return Grid(scale, zero_point, qmin, qmax)


def weight_grid(w: Tensor, bits: int, per_channel: bool, symmetric: bool) -> Grid:
    """Min/max grid of a weight tensor: per output channel (dim 0) or per tensor; signed levels."""
    if per_channel:
        flat = w.detach().reshape(w.shape[0], -1)
        shape = (-1,) + (1,) * (w.dim() - 1)
        lo, hi = flat.min(dim=1).values.reshape(shape), flat.max(dim=1).values.reshape(shape)
    else:
        lo, hi = w.detach().min(), w.detach().max()
    return grid_from_range(lo, hi, bits, symmetric, signed=True)


def activation_grid(lo: float, hi: float, bits: int, symmetric: bool) -> Grid:
    signed = symmetric and lo < 0
    return grid_from_range(torch.tensor(lo), torch.tensor(hi), bits, symmetric, signed)


class NonFiniteError(RuntimeError):
    """A NaN or Inf where a finite value is needed; the message names the layer."""


@torch.no_grad()
def first_nonfinite(model: nn.Module, x: Tensor) -> str | None:
    """Name of the first module (in call order) whose output holds a NaN or Inf when ``model`` runs
    on ``x``; None if every output is finite."""
    found: list[str] = []

    def hook(name):
        def fn(module, args, out):
            if not found and isinstance(out, Tensor) and not bool(torch.isfinite(out).all()):
                found.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


class ActQuant(nn.Module):
    """Per-tensor activation fake-quantizer with three states.

    ``observe``: feeds inputs to a range rule and passes them through (or, for a sequential rule,
    sets its range from the first batch and quantizes at once, so that downstream quantizers see
    quantized inputs); ``on``: fake-quantizes; ``off``: identity.
    """

    def __init__(self, bits: int, symmetric: bool):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.qmin, self.qmax = qrange(bits, False)
        self.lo, self.hi = 0.0, 0.0
        self.state = "off"
        self.rule = None
        self.name = ""  # the layer it feeds, for error messages

    def set_range(self, lo: float, hi: float) -> None:
        grid = activation_grid(lo, hi, self.bits, self.symmetric)
        self.lo, self.hi = float(lo), float(hi)
        self.scale.fill_(float(grid.scale))
        self.zero_point.fill_(int(grid.zero_point))
        self.qmin, self.qmax = grid.qmin, grid.qmax
        self.state = "on"

    def grid(self) -> Grid:
        return Grid(self.scale, self.zero_point.float(), self.qmin, self.qmax)

    def forward(self, x: Tensor) -> Tensor:
        if self.state == "observe":
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(f"non-finite activation (NaN or Inf) at the input of layer "
                                     f"{self.name or '?'} during calibration")
            self.rule.update(x)
            if not self.rule.sequential:
                return x
            self.set_range(*self.rule.range())
            self.rule = None
        if self.state == "on":
            if x.requires_grad and torch.is_grad_enabled():  # straight-through gradient
                return torch.fake_quantize_per_tensor_affine(
                    x, self.scale, self.zero_point, self.qmin, self.qmax
                )
            return self._fake_quant_eval(x)
        return x

    def _fake_quant_eval(self, x: Tensor) -> Tensor:
        """The same values as ``torch.fake_quantize_per_tensor_affine`` (x * (1/s) rounded half to even,
        + z, clamped, - z, * s, in float32), in place on one new tensor: about 6x faster on CPU, where the
        fused op also builds a gradient mask. Used when no gradient is needed (evaluation)."""
        scale = self.scale.to(x.dtype)
        inv, s, z = (1.0 / scale).item(), scale.item(), float(self.zero_point)
        y = torch.mul(x, inv).round_()
        if z:
            y.add_(z)
        y.clamp_(self.qmin, self.qmax)
        if z:
            y.sub_(z)
        return y.mul_(s)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, state={self.state}, range=[{self.lo:.4g}, {self.hi:.4g}]"


class QuantLayer(nn.Module):
    """A Conv/Linear whose weights are already fake-quantized, with an input quantizer in front.

    Buffers ``w_scale``/``w_zero_point`` keep the weight grid, so the integer levels can be
    recovered exactly (export, tests): levels = round(weight / w_scale) + w_zero_point.
    """

    def __init__(self, layer: nn.Module, act_quant: ActQuant | None, w_grid: Grid | None, w_bits):
        super().__init__()
        self.layer = layer
        self.act_quant = act_quant
        self.w_bits = w_bits
        if w_grid is not None:
            self.register_buffer("w_scale", w_grid.scale.detach().clone())
            self.register_buffer("w_zero_point", w_grid.zero_point.detach().clone())
            self.w_qmin, self.w_qmax = w_grid.qmin, w_grid.qmax

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return self.layer(x)

    def weight_levels(self) -> Tensor:
        return torch.round(self.layer.weight / self.w_scale) + self.w_zero_point


@dataclass
class LayerPlan:
    """What the protocol asks of one Conv/Linear layer (``None`` bits = kept in float)."""

    name: str
    module: nn.Module
    w_bits: int | None
    a_bits: int | None
    is_first: bool
    is_last: bool


def fold_bn(model: nn.Module, info: dict | None = None) -> int:
    """Folds every BN whose input is a conv used only by it into that conv, in place; the BN
    becomes ``nn.Identity``. Returns the number of folded BNs.

    Fused norm-activation modules are split first (``graph.split_norm_act``), so only their BN part
    is folded and their activation stays. The pairs come from the traced graph; a model torch.fx
    cannot trace falls back to an exact module-level rule (``graph.module_conv_bn_pairs``: a conv
    followed by a BN inside an ``nn.Sequential`` or a timm ``ConvNormAct``). ``info``, if given,
    receives the row fields ``bn_fold_rule`` ("graph" | "module"), ``n_norm_act_split`` and
    ``n_bn_unfolded`` (BN modules left in the model: not after a conv, or not plain BN)."""
    n_split = split_norm_act(model)
    try:
        pairs, rule = conv_bn_pairs(model), "graph"
    except TraceError:
        pairs, rule = module_conv_bn_pairs(model), "module"
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = (gamma / std).detach()
        bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
        with torch.no_grad():
            conv.weight.mul_(factor.reshape((-1,) + (1,) * (conv.weight.dim() - 1)))
            new_bias = (bias - bn.running_mean) * factor + beta
        conv.bias = nn.Parameter(new_bias.detach().clone())
        _set_submodule(model, bn_name, nn.Identity())
    if info is not None:
        info["bn_fold_rule"] = rule
        info["n_norm_act_split"] = info.get("n_norm_act_split", 0) + n_split
        info["n_bn_unfolded"] = count_bn(model)
    return len(pairs)


def count_bn(model: nn.Module) -> int:
    return len({id(m) for m in model.modules() if isinstance(m, BATCHNORM + (nn.SyncBatchNorm,))})


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare_model(model: nn.Module, fold: bool, info: dict | None = None) -> tuple[nn.Module, int]:
    """A deep copy in eval mode with fused norm-activation modules split, and BN folded when asked
    (``fold_bn``, which fills ``info``); the float model is never touched."""
    qmodel = copy.deepcopy(model).eval()
    if fold:
        return qmodel, fold_bn(qmodel, info)
    n_split = split_norm_act(qmodel)
    if info is not None:
        info.update(bn_fold_rule=None, n_norm_act_split=n_split, n_bn_unfolded=count_bn(qmodel))
    return qmodel, 0


def execution_order(model: nn.Module, example_input: Tensor) -> list[str]:
    """Names of the Conv/Linear modules in the order a forward pass calls them (each once)."""
    order, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, CONV_LINEAR):
            handles.append(m.register_forward_pre_hook(lambda mod, inp, n=name: order.append(n)))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def plan_layers(model: nn.Module, example_input: Tensor, protocol, wbits: int, abits) -> list[LayerPlan]:
    """Applies the protocol's first/last-layer rules to every Conv/Linear, in execution order."""
    names = execution_order(model, example_input)
    plans = []
    for i, name in enumerate(names):
        first, last = i == 0, i == len(names) - 1
        w = wbits
        if first and protocol.first_wbits is not None:
            w = protocol.first_wbits
        if last and protocol.last_wbits is not None:
            w = protocol.last_wbits
        a = abits
        if a is not None and last and protocol.last_abits is not None:
            a = protocol.last_abits
        if first and not protocol.quantize_first_input:
            a = None
        plans.append(LayerPlan(name, model.get_submodule(name), w, a, first, last))
    return plans


PLANNERS = Registry("planner")
PLANNERS.register("protocol", plan_layers)
"""A planner maps (model, example_input, protocol, wbits, abits) to the ``LayerPlan`` of every
Conv/Linear; ``protocol`` (``plan_layers``) applies the run's bits with the protocol's first/last-layer
rules. Per-layer bits (mixed precision) are another planner registered here."""


def bake_weights(model: nn.Module, plans: list[LayerPlan], grids: dict, levels: dict) -> None:
    """Replaces each planned layer's weight by ``grids[name].dequant(levels[name])``, in place, and
    wraps every planned layer in a ``QuantLayer`` (no input quantizer yet; layers without a grid
    keep float weights)."""
    for p in plans:
        grid = grids.get(p.name)
        if grid is not None:
            with torch.no_grad():
                p.module.weight.copy_(grid.dequant(levels[p.name]))
        _set_submodule(model, p.name, QuantLayer(p.module, None, grid, p.w_bits))


def quantize_weights(model: nn.Module, plans: list[LayerPlan], protocol, round_fn=None) -> None:
    """The protocol's grid and ``round_fn`` (``(weight, grid, plan) -> integer levels``; default
    round-to-nearest) for every planned layer, then ``bake_weights``: the grid, round and weights
    stages of ``method.Method`` in one call."""
    per_channel = protocol.w_granularity == "per_channel"
    grids, levels = {}, {}
    for p in plans:
        if p.w_bits is not None:
            w = p.module.weight.detach()
            grids[p.name] = grid = weight_grid(w, p.w_bits, per_channel, protocol.w_symmetric)
            levels[p.name] = grid.levels(w) if round_fn is None else round_fn(w, grid, p)
    bake_weights(model, plans, grids, levels)


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
