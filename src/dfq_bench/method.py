"""The quantizer plugin interface.

A method is a class with a ``name``, a ``version`` (bump it when its numerics change; it is written
into every row), a ``Config`` dataclass for its own keys, and ``quantize(model, ctx)`` which returns
a NEW fake-quantized model and leaves ``model`` untouched. The runner hands it everything it may
need in ``QuantContext``; a method never loads data or files itself.

Most methods only change one step of the standard pipeline, so ``Method.quantize`` is a template:
copy (+ fold BN) -> ``transform`` -> plan layers -> ``round_weights`` -> ``after_weights`` ->
activation ranges (``calibrate``). Override the step you change; GENIE-style reconstruction
overrides ``quantize``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING
from torch import Tensor, nn

from dfq_bench.config import UnsupportedError
from dfq_bench.graph import TraceError, trace
from dfq_bench.observers import calibrate_activations
from dfq_bench.quant import Grid, LayerPlan, plan_layers, prepare_model, quantize_weights


@dataclass
class QuantContext:
    """What the runner supplies to a method."""

    wbits: int
    abits: int | None
    protocol: Any  # the protocol config node (attribute access)
    seed: int
    device: str
    example_input: Tensor  # one input batch of the right shape, on ``device``
    calib: list[Tensor] | None = None  # calibration batches (synthetic, noise or real), if any
    progress: Callable = lambda it, **kw: it  # wraps long loops in a progress bar
    info: dict = field(default_factory=dict)  # method-specific fields for the result row


class Method:
    """Base class: round-to-nearest weights and the protocol's (or the method's) activation rule."""

    name = "base"
    version = "1"
    default_act_range = "minmax"
    needs_data = False  # True if the method itself (not only its activation rule) uses batches

    @dataclass
    class Config:
        name: str = MISSING

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def act_range(self, ctx: QuantContext) -> str:
        return ctx.protocol.act_range or self.default_act_range

    def needs_graph(self, ctx: QuantContext) -> bool:
        """Whether this run needs the traced layer graph (the runner refuses an untraceable model
        up front). The base class needs it only for the ``bn`` range rule."""
        return ctx.abits is not None and self.act_range(ctx) == "bn"

    def check_model(self, model: nn.Module, ctx: QuantContext, label: str | None = None) -> None:
        """Raises ``UnsupportedError`` (one line, before any work) if this run cannot be done on
        ``model``: here, if it needs the layer graph and torch.fx cannot trace the model."""
        if not self.needs_graph(ctx) or getattr(ctx, "_checked_model", None) is model:
            return  # nothing to check, or checked already for this context (DFQ.quantize, then the template)
        try:
            trace(model)
            ctx._checked_model = model
        except TraceError as e:
            why = "the bn range rule" if type(self).needs_graph is Method.needs_graph else "its steps"
            raise UnsupportedError(f"method {self.name} cannot run on {label or type(model).__name__}: {why} "
                                   f"need the layer graph, and {e}") from None

    def wants_data(self, ctx: QuantContext) -> bool:
        """Whether the runner must produce calibration batches (timed as t_synth_s)."""
        return self.needs_data or ctx.abits is not None

    def quantize(self, model: nn.Module, ctx: QuantContext) -> nn.Module:
        self.check_model(model, ctx)
        qmodel, n_folded = prepare_model(model, ctx.protocol.fold_bn, ctx.info)
        ctx.info["n_bn_folded"] = n_folded
        qmodel = self.transform(qmodel, ctx)
        plans = plan_layers(qmodel, ctx.example_input, ctx.protocol, ctx.wbits, ctx.abits)
        ctx.info["n_layers"] = len(plans)
        quantize_weights(qmodel, plans, ctx.protocol, self.round_weights)
        self.after_weights(qmodel, plans, ctx)
        rule = self.act_range(ctx)
        ctx.info["act_range"] = rule if ctx.abits is not None else None
        if ctx.abits is not None:
            ctx.info.update(self.calibrate(qmodel, plans, rule, model, ctx))
        return qmodel

    def transform(self, qmodel: nn.Module, ctx: QuantContext) -> nn.Module:
        """Float-equivalent rewrite before weight quantization (e.g. cross-layer equalization)."""
        return qmodel

    def round_weights(self, w: Tensor, grid: Grid, plan: LayerPlan) -> Tensor:
        """Integer levels of ``w`` on ``grid``; the base class rounds to nearest."""
        return grid.levels(w)

    def after_weights(self, qmodel: nn.Module, plans: list[LayerPlan], ctx: QuantContext) -> None:
        """Hook after weights are quantized (e.g. bias correction)."""

    def calibrate(self, qmodel: nn.Module, plans: list[LayerPlan], rule: str, model: nn.Module,
                  ctx: QuantContext) -> dict:
        """Activation ranges (the last step); returns counts for the row. ``model`` is the float
        model whose BN statistics the ``bn`` rule reads (DFQ passes its rescaled ones instead)."""
        return calibrate_activations(qmodel, plans, rule, ctx.protocol, ctx.calib, float_model=model)
