"""Activation range rules, available to every method by name (``protocol.act_range``).

A data rule is a small observer: ``update(x)`` per calibration batch, then ``range() -> (lo, hi)``.
A *sequential* rule sets its quantizer's range during the pass itself, so that downstream layers
are calibrated on quantized upstream activations (SQuant's released code does this).
The ``bn`` rule needs no data where a layer's input comes from a BatchNorm (DFQ's rule) and falls
back to min/max on calibration data elsewhere (residual adds, concatenations).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfq_bench.core.modules import ActQuant, a_placement, install_act_quants
from dfq_bench.core.planner import LayerPlan
from dfq_bench.graph import bn_producers
from dfq_bench.registry import Registry

RANGE_RULES = Registry("act_range rule")
_MAX_QUANTILE_ELEMS = 1 << 24  # torch.quantile's input limit


class MinMax:
    """Running min/max over all calibration batches; ``per_channel``: one per channel (dim 1), as tensors."""

    sequential = False
    channel_ranges = True  # can give one range per channel (protocol.a_granularity=per_channel)

    def __init__(self, bits: int, protocol=None, per_channel: bool = False):
        self.lo, self.hi = float("inf"), float("-inf")
        self.per_channel = per_channel

    def update(self, x: Tensor) -> None:
        if self.per_channel:
            dims = [d for d in range(x.dim()) if d != 1]
            lo, hi = x.detach().amin(dim=dims), x.detach().amax(dim=dims)
            self.lo = lo if not torch.is_tensor(self.lo) else torch.minimum(self.lo, lo)
            self.hi = hi if not torch.is_tensor(self.hi) else torch.maximum(self.hi, hi)
            return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float] | tuple[Tensor, Tensor]:
        return self.lo, self.hi


class Percentile:
    """Per batch, the (100-p)th and p-th percentiles of the values; averaged over batches."""

    sequential = False

    def __init__(self, bits: int, protocol=None):
        self.q = (protocol.percentile if protocol is not None else 99.99) / 100.0
        self.los, self.his = [], []

    def update(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() > _MAX_QUANTILE_ELEMS:  # deterministic subsample keeps the distribution
            flat = flat[:: flat.numel() // _MAX_QUANTILE_ELEMS + 1]
        qs = torch.quantile(flat, torch.tensor([1.0 - self.q, self.q], device=flat.device))
        self.los.append(float(qs[0]))
        self.his.append(float(qs[1]))

    def range(self) -> tuple[float, float]:
        return sum(self.los) / len(self.los), sum(self.his) / len(self.his)


RANGE_RULES.register("minmax", MinMax)
RANGE_RULES.register("percentile", Percentile)
RANGE_RULES.register("bn", MinMax)  # data fallback of the BN rule; see calibrate_activations
RANGE_RULES.register_lazy("squant", "dfq_bench.methods.squant:SquantRange")


def check_granularity(rule: str, granularity: str) -> None:
    """Raises a one-line ``ConfigError`` if ``rule`` cannot give ``granularity``'s static ranges: per-channel
    ranges need a rule with ``channel_ranges`` (minmax); the ``bn`` rule's BN ranges are per tensor."""
    if granularity != "per_channel":
        return
    if rule == "bn" or not getattr(RANGE_RULES.get(rule), "channel_ranges", False):
        from dfq_bench.config import ConfigError

        raise ConfigError(f"protocol.a_granularity='per_channel' is not supported by act_range rule {rule!r} (it "
                          "gives one range per tensor); valid: protocol.a_granularity=per_tensor|dynamic, or "
                          "protocol.act_range=minmax")


def bn_range(bn: nn.Module, act: str | None, n_std: float = 6.0) -> tuple[float, float]:
    """DFQ's data-free range of BN(x) (after its ReLU/ReLU6, if any): beta +- n_std * |gamma|."""
    gamma, beta = bn.weight.detach().abs(), bn.bias.detach()
    lo, hi = float((beta - n_std * gamma).min()), float((beta + n_std * gamma).max())
    if act is not None:
        lo, hi = max(lo, 0.0), max(hi, 0.0)
    if act == "relu6":
        lo, hi = min(lo, 6.0), min(hi, 6.0)
    return lo, hi


def calibrate_activations(
    qmodel: nn.Module,
    plans: list[LayerPlan],
    rule: str,
    protocol,
    batches: list[Tensor] | None,
    float_model: nn.Module | None = None,
    bn_sources: dict | None = None,
    rule_options: dict | None = None,
    granularity: str | None = None,
) -> dict:
    """Puts an ``ActQuant`` at every site of ``protocol.a_placement`` (``core.modules.install_act_quants``: in front
    of every layer the plan gives input bits, or after every ReLU/ReLU6), and sets its range.

    Args:
        rule: a ``RANGE_RULES`` name.
        batches: calibration inputs (needed unless every quantized input has a BN rule range).
        float_model: the unfolded float model, for the ``bn`` rule's BN statistics.
        bn_sources: ``{layer name: (BN-like object with .weight/.bias, activation kind)}`` for the
            ``bn`` rule, used instead of tracing ``float_model`` (DFQ passes the BN statistics as
            its equalization and bias absorption rescaled them).
        rule_options: keyword options for the rule's constructor (e.g. SQuant's k table).
        granularity: ``per_tensor``, ``per_channel`` or ``dynamic`` (``core.modules.ActQuant``); None: the
            protocol's ``a_granularity``. ``dynamic`` quantizers are calibrated as ``per_tensor`` ones (the
            static range serves their inputs that are not 4-D).

    Returns:
        Counts for the result row: quantizers set by BN statistics and by data.
    """
    rule_cls = RANGE_RULES.get(rule)
    if granularity is None:
        granularity = getattr(protocol, "a_granularity", "per_tensor")
        granularity = str(getattr(granularity, "value", granularity))
    check_granularity(rule, granularity)
    options = {**(rule_options or {}), **({"per_channel": True} if granularity == "per_channel" else {})}
    placement = a_placement(protocol)
    if placement != "layer_input" and rule == "bn":
        raise ValueError(f"act_range rule 'bn' sets the range of a layer's input from the BN before it; it has "
                         f"no range for activation placement {placement!r}")
    bn_src = {}
    if rule == "bn" and bn_sources is not None:
        bn_src = bn_sources
    elif rule == "bn" and float_model is not None:
        bn_src = bn_producers(float_model)
    observing, n_bn = [], 0
    for aq in install_act_quants(qmodel, plans, placement,
                                 lambda bits: ActQuant(bits, protocol.a_symmetric, granularity)):
        if aq.name in bn_src:
            aq.set_range(*bn_range(*bn_src[aq.name]))
            n_bn += 1
        else:
            aq.rule, aq.state = rule_cls(aq.bits, protocol, **options), "observe"
            observing.append(aq)
    if observing:
        if not batches:
            raise ValueError(f"act_range rule {rule!r} needs calibration data, but none was given")
        with torch.no_grad():
            for x in batches:
                qmodel(x)
                if rule_cls.sequential:
                    break  # one pass sets every range (the reference uses a single batch)
        for aq in observing:
            if aq.state == "observe":
                lo = aq.rule.range()[0]
                if not torch.is_tensor(lo) and lo == float("inf"):
                    raise RuntimeError(f"the activation quantizer of layer {aq.name} saw no data during "
                                       "calibration (the layer was not called)")
                aq.set_range(*aq.rule.range())
                aq.rule = None
    return {"n_act_quant": n_bn + len(observing), "n_act_bn_rule": n_bn}
