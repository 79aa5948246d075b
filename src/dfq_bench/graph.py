"""Layer graph of a model, found by torch.fx tracing (never by module order).

Conv, Linear and BatchNorm modules are kept as leaves, also subclasses with their own forward
(efficientnet-lite's same-padding convs), so graph nodes name the real modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules and functions that map an interval [lo, hi] of inputs into itself (or into [0, hi] / [0, 6]).
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
_PASS_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.dropout}
_PASS_METHODS = {"flatten", "view", "reshape", "mean", "contiguous"}
_RELU_FUNCTIONS = {F.relu, torch.relu}
_RELU6_FUNCTIONS = {F.relu6}


class LeafTracer(fx.Tracer):
    """Keeps Conv/Linear/BN (and their subclasses) as leaf modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, CONV_LINEAR + BATCHNORM) or super().is_leaf_module(m, qualname)


class TraceError(RuntimeError):
    pass


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically traces ``model``; the GraphModule shares the model's submodules."""
    try:
        graph = LeafTracer().trace(model)
    except Exception as e:
        raise TraceError(f"cannot trace {type(model).__name__} with torch.fx: {e}") from e
    return fx.GraphModule(model, graph)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BN's only input is a conv whose only user is that BN."""
    gm = trace(model)
    pairs = []
    for node in gm.graph.nodes:
        bn = _module(gm, node)
        if not isinstance(bn, BATCHNORM):
            continue
        src = node.args[0]
        conv = _module(gm, src) if isinstance(src, fx.Node) else None
        if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and len(src.users) == 1:
            pairs.append((src.target, node.target))
    return pairs


def activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """"relu", "relu6" or None for a node that is not a (clipped) ReLU."""
    m = _module(gm, node)
    if isinstance(m, nn.ReLU) or (node.op == "call_function" and node.target in _RELU_FUNCTIONS):
        return "relu"
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    if isinstance(m, nn.ReLU6) or (node.op == "call_function" and node.target in _RELU6_FUNCTIONS):
        return "relu6"
    if isinstance(m, nn.Hardtanh) and m.min_val == 0.0:
        return "relu6" if m.max_val == 6.0 else None
    return None


def _passes_range(gm: fx.GraphModule, node: fx.Node) -> bool:
    if isinstance(_module(gm, node), _PASS_MODULES):
        return True
    if node.op == "call_function" and node.target in _PASS_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in _PASS_METHODS


def bn_producers(model: nn.Module) -> dict[str, tuple[nn.Module, str | None]]:
    """For each Conv/Linear whose input comes from a BN (through an optional ReLU/ReLU6 and
    range-preserving ops such as pooling), maps its name to (that BN, activation kind)."""
    gm = trace(model)
    found = {}
    for node in gm.graph.nodes:
        if not isinstance(_module(gm, node), CONV_LINEAR):
            continue
        src, act = node.args[0], None
        while isinstance(src, fx.Node):
            kind = activation_kind(gm, src)
            if kind is not None and act is None:
                act = kind
            elif not _passes_range(gm, src):
                break
            src = src.args[0]
        bn = _module(gm, src) if isinstance(src, fx.Node) else None
        if isinstance(bn, BATCHNORM):
            found[node.target] = (bn, act)
    return found


__all__ = ["LeafTracer", "TraceError", "trace", "conv_bn_pairs", "bn_producers", "activation_kind"]
