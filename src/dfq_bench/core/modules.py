"""Quantizer modules: the activation fake-quantizer (per tensor, per channel or dynamic), the quantized
layer wrapper, and the baked weight quantizer (levels written into the weights). Trainable ones (STE,
AdaRound, LSQ) are in ``learn.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfq_bench.core.grid import Grid, activation_grid, qrange, weight_grid
from dfq_bench.core.planner import LayerPlan


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


A_GRANULARITIES = ("per_tensor", "per_channel", "dynamic")  # protocol.a_granularity


class ActQuant(nn.Module):
    """Activation fake-quantizer with three states.

    ``observe``: feeds inputs to a range rule and passes them through (or, for a sequential rule,
    sets its range from the first batch and quantizes at once, so that downstream quantizers see
    quantized inputs); ``on``: fake-quantizes; ``off``: identity.

    ``granularity`` (``protocol.a_granularity``): ``per_tensor``, one static range; ``per_channel``, one
    static range per channel (dim 1), set from per-channel ranges (``set_range`` with tensors);
    ``dynamic``, the range of every (sample, channel) slice of a 4-D input recomputed from that slice's
    min/max over H x W at every call, evaluation included (GranQ's released quantizer; the range is not
    differentiated, the gradient is straight-through); inputs of other ranks (a Linear's) keep the static
    per-tensor range calibrated as for ``per_tensor``. All three use ``core.grid.activation_grid``.
    """

    def __init__(self, bits: int, symmetric: bool, granularity: str = "per_tensor"):
        super().__init__()
        if granularity not in A_GRANULARITIES:
            raise ValueError(f"activation granularity {granularity!r} is unknown; valid: {', '.join(A_GRANULARITIES)}")
        self.bits, self.symmetric, self.granularity = bits, symmetric, granularity
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.qmin, self.qmax = qrange(bits, False)
        self.lo, self.hi = 0.0, 0.0
        self.state = "off"
        self.rule = None
        self.name = ""  # the layer it feeds, for error messages

    def set_range(self, lo, hi) -> None:
        """The static range: floats, or (per_channel) tensors of one value per channel."""
        grid = activation_grid(lo, hi, self.bits, self.symmetric)
        if torch.is_tensor(lo) and lo.numel() > 1:
            if self.granularity != "per_channel":
                raise ValueError(f"a {self.granularity} activation quantizer takes one static range, not one per "
                                 "channel")
            self.lo, self.hi = float(lo.min()), float(hi.max())
            self.scale = grid.scale.detach().to(self.scale.device, torch.float32).reshape(-1).clone()
            self.zero_point = grid.zero_point.detach().to(self.scale.device, torch.int32).reshape(-1).clone()
        else:
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
            if self.granularity == "dynamic" and x.dim() == 4:
                return self._fake_quant_dynamic(x)
            if self.scale.dim() == 1:
                return self._fake_quant_per_channel(x)
            if x.requires_grad and torch.is_grad_enabled():  # straight-through gradient
                return torch.fake_quantize_per_tensor_affine(
                    x, self.scale, self.zero_point, self.qmin, self.qmax
                )
            return self._fake_quant_eval(x)
        return x

    def _fake_quant_per_channel(self, x: Tensor) -> Tensor:
        """Per channel (dim 1): ``torch.fake_quantize_per_channel_affine``'s values (x * (1/s) rounded half to
        even, + z, clamped, - z, * s) with its straight-through gradient; in place without one."""
        if x.requires_grad and torch.is_grad_enabled():
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, 1, self.qmin, self.qmax)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        s = self.scale.to(x.dtype).reshape(shape)
        z = self.zero_point.to(x.dtype).reshape(shape)
        return torch.mul(x, 1.0 / s).round_().add_(z).clamp_(self.qmin, self.qmax).sub_(z).mul_(s)

    def _fake_quant_dynamic(self, x: Tensor) -> Tensor:
        """Each (sample, channel) slice on the grid of its own min/max over H x W (``activation_grid``), computed
        now; the range is not differentiated, the gradient is straight-through (identity)."""
        xd = x.detach()
        grid = activation_grid(xd.amin(dim=(2, 3), keepdim=True), xd.amax(dim=(2, 3), keepdim=True), self.bits,
                               self.symmetric)
        out = grid.fake(xd)
        if x.requires_grad and torch.is_grad_enabled():
            return x + (out - xd)
        return out

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
        gran = "" if self.granularity == "per_tensor" else f", {self.granularity}"
        return f"bits={self.bits}{gran}, state={self.state}, range=[{self.lo:.4g}, {self.hi:.4g}]"


class EmaActQuant(ActQuant):
    """The zero-shot QAT references' activation quantizer (GDFQ and its descendants, ../shared/docs/methods.md):
    per-tensor asymmetric, its range an exponential moving average of the batch min/max.

    ``state = "ema"``: every call first updates the range, lo <- m * lo + (1 - m) * min(x) (hi likewise; the
    first call takes the batch's min/max), then fake-quantizes on the new range (straight-through gradient);
    ``freeze()`` keeps the range from then on (state ``on``, the base class). ``bias_correction``: the
    references' quirk as we read methods.md: the updated value is divided by (1 - m^t) (t: the number of
    updates) and that corrected value is stored and fed back into the next update, so early ranges are
    inflated (for a constant batch range r: r, 5.3r, 18r, ... before decaying back to r) instead of
    unbiased. The grid is ``core.grid.activation_grid`` of the range, as every other activation quantizer.
    """

    def __init__(self, bits: int, momentum: float = 0.9, bias_correction: bool = False,
                 granularity: str = "per_tensor"):
        if granularity == "per_channel":
            raise ValueError("the EMA activation quantizer keeps one range per tensor; per_channel is not supported")
        super().__init__(bits, symmetric=False, granularity=granularity)
        self.momentum, self.bias_correction = momentum, bias_correction
        self.n_updates = 0
        self.state = "ema"

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"non-finite activation (NaN or Inf) at the input of layer {self.name or '?'}")
        lo, hi = float(x.min()), float(x.max())
        m = self.momentum
        self.n_updates += 1
        if self.bias_correction:  # stored corrected: starts from 0 and feeds back (the quirk)
            prev_lo, prev_hi = (self.lo, self.hi) if self.n_updates > 1 else (0.0, 0.0)
            c = 1.0 - m ** self.n_updates
            lo, hi = (m * prev_lo + (1 - m) * lo) / c, (m * prev_hi + (1 - m) * hi) / c
        elif self.n_updates > 1:
            lo, hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi
        self.set_range(lo, hi)  # sets state "on"
        self.state = "ema"

    def freeze(self) -> None:
        if self.n_updates == 0:
            raise RuntimeError(f"the EMA activation quantizer of layer {self.name or '?'} saw no data before it "
                               "was frozen")
        self.state = "on"

    def forward(self, x: Tensor) -> Tensor:
        if self.state == "ema":
            self.update(x.detach())
            self.state = "on"
            try:
                return super().forward(x)
            finally:
                self.state = "ema"
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ema momentum={self.momentum}, bias_correction={self.bias_correction}"


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
            self.w_grid_kind = "uniform" if type(w_grid) is Grid else type(w_grid).__name__  # export refuses others

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return self.layer(x)

    def weight_levels(self) -> Tensor:
        return torch.round(self.layer.weight / self.w_scale) + self.w_zero_point



def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)



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
            grids[p.name] = grid = weight_grid(w, p.w_bits, per_channel, protocol.w_symmetric,
                                               getattr(protocol, "w_range", "include_zero") == "include_zero")
            levels[p.name] = grid.levels(w) if round_fn is None else round_fn(w, grid, p)
    bake_weights(model, plans, grids, levels)


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


A_PLACEMENTS = ("layer_input", "after_relu")  # protocol.a_placement
RELUS = (nn.ReLU, nn.ReLU6)


def a_placement(protocol) -> str:
    """The protocol's ``a_placement`` as a string (``layer_input`` where it has none)."""
    value = getattr(protocol, "a_placement", None) or "layer_input"
    return str(getattr(value, "value", value))


class ActAfter(nn.Module):
    """An activation module (ReLU/ReLU6) and the quantizer of its output (``protocol.a_placement=after_relu``)."""

    def __init__(self, act: nn.Module, act_quant: ActQuant):
        super().__init__()
        self.act, self.act_quant = act, act_quant

    def forward(self, x: Tensor) -> Tensor:
        return self.act_quant(self.act(x))


def install_act_quants(model: nn.Module, plans: list[LayerPlan], placement: str, make) -> list[ActQuant]:
    """Puts a quantizer ``make(bits)`` at every site of ``placement`` and returns them, each named after its site.

    ``layer_input`` (the core's): in front of every planned layer with input bits (``QuantLayer.act_quant``), at
    those bits. ``after_relu`` (the zero-shot QAT references' and ZeroQ's): after every ``nn.ReLU``/``nn.ReLU6``
    module, which is wrapped in an ``ActAfter``, at the planned layers' one input bit-width; no layer input is
    quantized there, so a value that leaves no ReLU (the image, a residual add, a linear bottleneck's output)
    stays float. A ReLU module called at several places (``self.relu`` used twice) shares one quantizer."""
    if placement not in A_PLACEMENTS:
        raise ValueError(f"activation placement {placement!r} is unknown; valid: {', '.join(A_PLACEMENTS)}")
    out, device = [], _device_of(model)  # on the model's device: calibration and training run there
    if placement == "layer_input":
        wrapped = quant_layers(model)
        for p in plans:
            if p.a_bits is not None:
                out.append(make(p.a_bits).to(device))
                out[-1].name, wrapped[p.name].act_quant = p.name, out[-1]
        return out
    bits = {p.a_bits for p in plans if p.a_bits is not None}
    if len(bits) > 1:
        raise ValueError(f"activation placement after_relu quantizes every ReLU output at one bit-width, but the "
                         f"planned layers' inputs have {sorted(bits)}")
    sites = [n for n, m in model.named_modules() if isinstance(m, RELUS)] if bits else []
    if bits and not sites:
        raise ValueError("activation placement after_relu found no nn.ReLU/nn.ReLU6 module in the model")
    for name in sites:
        act = model.get_submodule(name)
        out.append(make(next(iter(bits))).to(device))
        out[-1].name = name
        _set_submodule(model, name, ActAfter(act, out[-1]))
    return out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device
