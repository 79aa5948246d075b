"""Planners: which bits each Conv/Linear gets. The protocol's first/last-layer rules are the default
planner; per-layer bits (mixed precision, core/mixed.py) are another planner registered in ``PLANNERS``.

A planner is a callable ``(model, example_input, protocol, wbits, abits) -> list[LayerPlan]``, or an
object with ``plan_state(method, state) -> list[LayerPlan]`` when it needs more than the model: the
method's own grid and rounding and the calibration batches (``MixedPrecision``); such an object sets
``needs_data`` when the runner must make batches for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfq_bench.graph import CONV_LINEAR
from dfq_bench.registry import Registry


@dataclass
class LayerPlan:
    """What the protocol asks of one Conv/Linear layer (``None`` bits = kept in float)."""

    name: str
    module: nn.Module
    w_bits: int | None
    a_bits: int | None
    is_first: bool
    is_last: bool



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
PLANNERS.register_lazy("mixed", "dfq_bench.core.mixed:MIXED")
"""A planner maps (model, example_input, protocol, wbits, abits) to the ``LayerPlan`` of every
Conv/Linear; ``protocol`` (``plan_layers``) applies the run's bits with the protocol's first/last-layer
rules; ``mixed`` is ``core.mixed.MixedPrecision()``: per-layer bits by the exact DP on the layers'
sensitivities, at the size of the uniform ``wbits`` model."""


def get_planner(planner=None):
    """A planner from a ``PLANNERS`` name, a planner itself, or None (the protocol's rules)."""
    return PLANNERS.get(planner or "protocol") if isinstance(planner or "protocol", str) else planner
