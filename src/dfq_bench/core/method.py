"""The staged quantization core: the plugin interface every method is written on.

A method is a class with a ``name``, a ``version`` (bump it when its numerics change; it is written
into every row), a ``Config`` dataclass for its own keys, and the stages below. ``quantize(model,
ctx)`` returns a NEW fake-quantized model and leaves ``model`` untouched; the runner and the Python
API (``dfq_bench.quantize``) hand it everything it may need in ``QuantContext``; a method never
loads data or files itself.

One ``QuantState`` travels through the stages, in this order (``STAGES``):

    prepare    copy the float model, split fused norm-activations, fold BN (protocol.fold_bn)
    transform  float-equivalent rewrites (DFQ's equalization, absorption)
    plan       per-layer bits and roles: a Planner (``core.planner.PLANNERS``; the protocol rules by default,
               ``mixed``: per-layer weight bits under a size budget from sensitivities, core/mixed.py)
    grid       a weight grid per planned layer (``weight_grid``: the uniform min/max grid by default)
    round      integer weight levels on that grid (``round_weights``: round to nearest by default)
    weights    the weight quantizer modules: baked levels (default) or STE-trainable weights
               (``weight_quantizer = "ste"``); GENIE installs AdaRound soft bits here
    correct    corrections after rounding (DFQ's bias correction)
    calibrate  activation quantizers and their ranges: the range rule (``act_range``) with its own
               options (``rule_options``), on the calibration source's batches
    train      optional optimisation of the quantized model (GENIE's block reconstruction)

A method overrides the stages it changes and calls ``super()`` for the rest; per-run values live in
``state.scratch``, never on the method instance. The calibration source may be a list of batches or
a callable that takes the state (``state.batches()``): it then sees the partially quantized student,
so a generator can be trained against it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from torch import Tensor, nn

from dfq_bench.config import UnsupportedError
from dfq_bench.core.bn import prepare_model
from dfq_bench.core.grid import Grid, weight_grid
from dfq_bench.core.learn import SteWeight
from dfq_bench.core.modules import QuantLayer, bake_weights
from dfq_bench.core.planner import LayerPlan, get_planner
from dfq_bench.core.ranges import calibrate_activations
from dfq_bench.graph import TraceError, trace

STAGES = ("prepare", "transform", "plan", "grid", "round", "weights", "correct", "calibrate", "train")
CalibSource = Callable[["QuantState"], list[Tensor]]


@dataclass
class QuantContext:
    """What the runner supplies to a method."""

    wbits: int
    abits: int | None
    protocol: Any  # the protocol config node (attribute access)
    seed: int
    device: str
    example_input: Tensor  # one input batch of the right shape, on ``device``
    calib: list[Tensor] | CalibSource | None = None  # batches, or a source called with the state
    progress: Callable = lambda it, **kw: it  # wraps long loops in a progress bar
    info: dict = field(default_factory=dict)  # method-specific fields for the result row
    planner: Any = None  # a ``core.planner.PLANNERS`` name or a Planner; None: the protocol's rules
    eval_data: Any = None  # (images, labels) batches of the evaluation set, for a method with ``needs_eval``
    checkpoint: str | None = None  # a file where a long stage saves progress, to resume from (dfq_bench/checkpoint.py)


@dataclass
class QuantState:
    """What one quantization hands from stage to stage."""

    float_model: nn.Module  # the caller's model: never modified
    ctx: QuantContext
    model: nn.Module | None = None  # the working copy the stages quantize in place
    plans: list[LayerPlan] = field(default_factory=list)
    grids: dict[str, Grid] = field(default_factory=dict)  # planned layer -> its weight grid
    levels: dict[str, Tensor] = field(default_factory=dict)  # planned layer -> integer weight levels
    teacher: nn.Module | None = None  # a prepared float reference, for methods that need one
    scratch: dict = field(default_factory=dict)  # the method's own per-run values
    _batches: list[Tensor] | None = None

    @property
    def info(self) -> dict:
        return self.ctx.info

    @property
    def protocol(self):
        return self.ctx.protocol

    def batches(self) -> list[Tensor] | None:
        """The calibration batches; a callable source is called once, with this state."""
        if self._batches is None and self.ctx.calib is not None:
            calib = self.ctx.calib
            self._batches = list(calib(self) if callable(calib) else calib)
        return self._batches


class Method:
    """Base class: round-to-nearest weights and the protocol's (or the method's) activation rule."""

    name = "base"
    version = "1"
    default_act_range = "minmax"
    needs_data = False  # True if the method itself (not only its activation rule) uses batches
    needs_eval = False  # True: it monitors accuracy while it trains (the runner passes ``ctx.eval_data``)
    w_ranges = ("include_zero", "minmax")  # protocol.w_range values the method's weight grid honours
    weight_quantizer = "baked"  # "baked": weights replaced by their levels | "ste": trainable on the grid
    mp_refusal: str | None = None  # why this method cannot take a mixed-precision plan (``mp.allocator``)
    a_granularities = ("per_tensor", "per_channel", "dynamic")  # activation granularities its quantizers honour
    a_placements = ("layer_input", "after_relu")  # protocol.a_placement values its quantizers honour

    @dataclass
    class Config:
        name: str = MISSING

    def __init__(self, cfg: Any = None):
        """``cfg``: the method's ``Config`` (a DictConfig from the runner); None: its defaults."""
        self.cfg = cfg if cfg is not None else OmegaConf.structured(self.Config(name=self.name))
        if hasattr(self, "check_config"):
            self.check_config(self.cfg)

    # ---- what the runner asks before any work ---------------------------------------------------

    def act_range(self, ctx: QuantContext) -> str:
        return ctx.protocol.act_range or self.default_act_range

    def activation_granularity(self, protocol) -> str:
        """The activation granularity of this run (``core.modules.ActQuant``): the protocol's
        ``a_granularity``; a method with its own activation quantizer (GranQ) may choose its own."""
        g = getattr(protocol, "a_granularity", "per_tensor")
        return str(getattr(g, "value", g))

    def needs_graph(self, ctx: QuantContext) -> bool:
        """Whether this run needs the traced layer graph (the runner refuses an untraceable model
        up front). The base class needs it only for the ``bn`` range rule."""
        return ctx.abits is not None and self.act_range(ctx) == "bn"

    def check_model(self, model: nn.Module, ctx: QuantContext, label: str | None = None) -> None:
        """Raises ``UnsupportedError`` (one line, before any work) if this run cannot be done on
        ``model``: here, if it needs the layer graph and torch.fx cannot trace the model."""
        if not self.needs_graph(ctx) or getattr(ctx, "_checked_model", None) is model:
            return  # nothing to check, or checked already for this context (runner, then quantize)
        try:
            trace(model)
            ctx._checked_model = model
        except TraceError as e:
            why = "the bn range rule" if type(self).needs_graph is Method.needs_graph else "its steps"
            raise UnsupportedError(f"method {self.name} cannot run on {label or type(model).__name__}: {why} "
                                   f"need the layer graph, and {e}") from None

    def wants_data(self, ctx: QuantContext) -> bool:
        """Whether the runner must produce calibration batches (timed as t_synth_s): for the method, for
        the activation ranges, or for the planner (mixed precision's sensitivities)."""
        return self.needs_data or ctx.abits is not None or bool(getattr(get_planner(ctx.planner), "needs_data", False))

    # ---- the stages -----------------------------------------------------------------------------

    def quantize(self, model: nn.Module, ctx: QuantContext) -> nn.Module:
        self.check_model(model, ctx)
        state = QuantState(model, ctx)
        for stage in STAGES:
            getattr(self, stage)(state)
        return state.model

    def prepare(self, state: QuantState) -> None:
        state.model, state.info["n_bn_folded"] = prepare_model(state.float_model, state.protocol.fold_bn,
                                                               state.info)

    def transform(self, state: QuantState) -> None:
        """Float-equivalent rewrites of ``state.model`` before weight quantization."""

    def plan(self, state: QuantState) -> None:
        ctx = state.ctx
        planner = get_planner(ctx.planner)
        if hasattr(planner, "plan_state"):  # it needs this method's rounding and the batches (core/mixed.py)
            state.plans = planner.plan_state(self, state)
        else:
            state.plans = planner(state.model, ctx.example_input, ctx.protocol, ctx.wbits, ctx.abits)
        state.info["n_layers"] = len(state.plans)
        state.info["eff_wbits"] = effective_wbits(state.plans)

    def grid(self, state: QuantState) -> None:
        for p in state.plans:
            if p.w_bits is not None:
                state.grids[p.name] = self.weight_grid(p.module.weight.detach(), p, state)

    def weight_grid(self, w: Tensor, plan: LayerPlan, state: QuantState) -> Grid:
        """The grid of one layer's weights; the protocol's uniform min/max grid by default."""
        proto = state.protocol
        return weight_grid(w, plan.w_bits, proto.w_granularity == "per_channel", proto.w_symmetric,
                           include_zero=getattr(proto, "w_range", "include_zero") == "include_zero")

    def round(self, state: QuantState) -> None:
        for p in state.plans:
            if p.name in state.grids:
                state.levels[p.name] = self.round_weights(p.module.weight.detach(), state.grids[p.name], p, state)

    def round_weights(self, w: Tensor, grid: Grid, plan: LayerPlan | None, state: QuantState | None = None) -> Tensor:
        """Integer levels of ``w`` on ``grid``; the base class rounds to nearest."""
        return grid.levels(w)

    def weights(self, state: QuantState) -> None:
        """Baked: each planned layer's weight becomes ``grid.dequant(levels)`` inside a ``QuantLayer``.
        ``ste``: the weight stays a float parameter, fake-quantized on its grid in every forward with a
        straight-through gradient (``learn.SteWeight``), so fine-tuning keeps it on the grid."""
        bake_weights(state.model, state.plans, state.grids, state.levels)
        if self.weight_quantizer == "ste":
            for name, grid in state.grids.items():
                layer = state.model.get_submodule(name).layer
                torch.nn.utils.parametrize.register_parametrization(layer, "weight", SteWeight(grid))

    def correct(self, state: QuantState) -> None:
        """Corrections after the weights are quantized (e.g. bias correction)."""

    def calibrate(self, state: QuantState) -> None:
        """Activation quantizers and their ranges (returns nothing; counts go into the row)."""
        ctx = state.ctx
        rule = self.act_range(ctx)
        state.info["act_range"] = rule if ctx.abits is not None else None
        if ctx.abits is None:
            return
        granularity = self.activation_granularity(ctx.protocol)
        state.info.update(calibrate_activations(
            state.model, state.plans, rule, ctx.protocol, state.batches(), float_model=state.float_model,
            bn_sources=self.bn_sources(state), rule_options=self.rule_options(rule, state),
            granularity=granularity))
        state.info["a_granularity"] = granularity

    def rule_options(self, rule: str, state: QuantState) -> dict:
        """Keyword options for the range rule's constructor (SQuant passes its k table)."""
        return {}

    def bn_sources(self, state: QuantState) -> dict | None:
        """The ``bn`` rule's BN statistics per layer; None: read from the float model (DFQ passes the
        statistics as its equalization rescaled them)."""
        return None

    def train(self, state: QuantState) -> None:
        """Optional optimisation of the quantized model (block reconstruction, fine-tuning)."""


def effective_wbits(plans: list[LayerPlan]) -> float | None:
    """Stored bits per weight over the layers with quantized weights: sum of bits x weights / weights
    (the first and last layers at their own bits; scales, zero-points and float layers not counted).
    None when no layer has quantized weights."""
    sized = [(p.w_bits, p.module.weight.numel()) for p in plans if p.w_bits is not None]
    n = sum(k for _, k in sized)
    return sum(b * k for b, k in sized) / n if n else None


def copy_frozen(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters do not require gradients (a student built from a teacher)."""
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


__all__ = ["STAGES", "CalibSource", "Method", "QuantContext", "QuantState", "QuantLayer", "copy_frozen"]
