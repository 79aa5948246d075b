"""Layer graph of a model, found by torch.fx tracing (never by module order).

Conv, Linear and BatchNorm modules are kept as leaves, also subclasses with their own forward
(efficientnet-lite's same-padding convs), so graph nodes name the real modules.

Fused norm-activation modules (timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``: a BN subclass
whose forward also applies a dropout and an activation) are split before anything is traced
(``split_norm_act``): each becomes a ``NormAct`` holding a plain BN (``<name>.bn``) followed by its
own ``drop`` and ``act`` modules, so that folding removes only the BN and every walk sees the
activation that is really there. Any other BN subclass whose forward is not plain BN is kept as an
opaque leaf: never folded, never read as a BN by the range rule or by DFQ (``is_plain_bn``).

Tracing never touches the model it is given: ``trace`` traces a split deep copy (``canonical``),
so modules that cache tensors while traced (timm LeViT's attention-bias cache) are left clean.
The names every function here returns are those of that split model: for a model without fused
modules they are the model's own names; a conv's and an activation's names never change.
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from dataclasses import dataclass

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


def norm_act_types() -> tuple[type, ...]:
    """BN subclasses whose forward is BN -> self.drop -> self.act (timm's). Empty unless timm is
    already imported: a model built from timm modules has imported it (and a run without timm
    does not pay its 2.5 s import)."""
    if "timm" not in sys.modules:
        return ()
    from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct

    return BatchNormAct2d, SyncBatchNormAct


_PLAIN_BN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}


def is_plain_bn(m: nn.Module) -> bool:
    """A BatchNorm whose forward is torch's (nn.SyncBatchNorm's included): foldable, readable."""
    return isinstance(m, BATCHNORM + (nn.SyncBatchNorm,)) and type(m).forward in _PLAIN_BN_FORWARDS


class NormAct(nn.Sequential):
    """A fused norm-activation module split into its parts: ``bn`` (plain BN) -> ``drop`` -> ``act``."""


def _plain_bn_of(m: nn.Module) -> nn.Module:
    """A plain BN of ``m``'s dimensionality sharing ``m``'s parameters and buffers."""
    cls = nn.BatchNorm2d if isinstance(m, nn.BatchNorm2d) else nn.BatchNorm1d if isinstance(
        m, nn.BatchNorm1d) else nn.BatchNorm3d if isinstance(m, nn.BatchNorm3d) else nn.SyncBatchNorm
    bn = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    for name in ("weight", "bias"):
        setattr(bn, name, getattr(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, name, getattr(m, name))
    return bn.train(m.training)


def split_norm_act(model: nn.Module) -> int:
    """Replaces every fused norm-activation module (``norm_act_types()``) by a float-identical ``NormAct``,
    in place (the new BN shares the old one's tensors). Returns how many were split."""
    fused = norm_act_types()
    found = [(n, m) for n, m in model.named_modules() if n and fused and isinstance(m, fused)]
    split = {}
    for name, m in found:
        if id(m) not in split:
            split[id(m)] = NormAct(OrderedDict(bn=_plain_bn_of(m), drop=m.drop, act=m.act))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, split[id(m)])
    return len(split)


def canonical(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its fused norm-activation modules split (see above)."""
    copy_ = copy.deepcopy(model)
    split_norm_act(copy_)
    return copy_


class LeafTracer(fx.Tracer):
    """Keeps Conv/Linear/BN (and their subclasses) as leaf modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, CONV_LINEAR + BATCHNORM) or super().is_leaf_module(m, qualname)


class TraceError(RuntimeError):
    pass


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically traces a split deep copy of ``model`` (``canonical``); ``model`` is untouched.

    Raises:
        TraceError: the model cannot be traced (data-dependent control flow, ...); the message
            names the model and torch.fx's reason in one line.
    """
    root = canonical(model)
    try:
        graph = LeafTracer().trace(root)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: "
                         f"{first[:200]})") from e
    return fx.GraphModule(root, graph)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BN's only input is a conv whose only user is that BN.
    Only plain BNs (``is_plain_bn``); names as in ``canonical(model)``."""
    gm = trace(model)
    pairs = []
    for node in gm.graph.nodes:
        bn = _module(gm, node)
        if not is_plain_bn(bn):
            continue
        src = node.args[0]
        conv = _module(gm, src) if isinstance(src, fx.Node) else None
        if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and len(src.users) == 1:
            pairs.append((src.target, node.target))
    return pairs


def _conv_norm_act_type() -> type | None:
    if "timm" not in sys.modules:
        return None
    from timm.layers import ConvNormAct

    return ConvNormAct


def module_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) pairs found without tracing, where the module structure alone makes folding exact:
    a conv directly followed by a plain BN (or a ``NormAct``'s BN) in an ``nn.Sequential`` whose
    forward is Sequential's, or the ``conv`` and ``bn`` of a timm ``ConvNormAct``; each conv and BN
    used at one place only. The fallback of BN folding for models torch.fx cannot trace."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    cna = _conv_norm_act_type()

    def bn_part(name: str, m: nn.Module) -> str | None:
        if isinstance(m, NormAct):
            m, name = m.bn, f"{name}.bn"
        return name if is_plain_bn(m) and uses[id(m)] == 1 else None

    pairs = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            kids = list(m.named_children())
            candidates = [(a, b) for (a, _), (b, _) in zip(kids, kids[1:], strict=False)]
        elif cna is not None and isinstance(m, cna) and type(m).forward is cna.forward:
            candidates = [("conv", "bn")]
        else:
            continue
        for a, b in candidates:
            conv, nxt = m.get_submodule(a), m.get_submodule(b)
            if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or uses[id(conv)] != 1:
                continue
            bn = bn_part(prefix + b, nxt)
            if bn is not None and model.get_submodule(bn).num_features == conv.out_channels:
                pairs.append((prefix + a, bn))
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


def _own(model: nn.Module, name: str, fallback: nn.Module) -> nn.Module:
    """``model``'s module ``name`` if it has one (the traced copy's otherwise: a split BN part)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return fallback


def bn_producers(model: nn.Module) -> dict[str, tuple[nn.Module, str | None]]:
    """For each Conv/Linear whose input comes from a BN (through an optional ReLU/ReLU6 and
    range-preserving ops such as pooling), maps its name to (that BN, activation kind): the
    ``input_sources(model, "range")`` walk, kept where it ends at a plain BN."""
    gm = trace(model)
    return {layer: (_own(model, s.name, gm.get_submodule(s.name)), s.act)
            for layer, s in _walk(gm, "range") if is_plain_bn(gm.get_submodule(s.name))}


# ---------------------------------------------------------------------------------------------
# Equalization links and input sources (DFQ). Everything below walks the traced graph, so a module
# reused at two call sites, a tensor with two users, a residual add or a concatenation is seen.

# Ops through which positive per-channel scaling of the tensor commutes (f(s*x) = s*f(x) for s > 0).
_POS_HOMOGENEOUS = {"relu", "leaky_relu"}
_SCALE_MODULES = {
    nn.Identity: "identity", nn.Dropout: "identity", nn.MaxPool1d: "maxpool", nn.MaxPool2d: "maxpool",
    nn.MaxPool3d: "maxpool", nn.AvgPool1d: "avgpool", nn.AvgPool2d: "avgpool", nn.AvgPool3d: "avgpool",
    nn.AdaptiveAvgPool1d: "avgpool", nn.AdaptiveAvgPool2d: "avgpool", nn.AdaptiveAvgPool3d: "avgpool",
    nn.AdaptiveMaxPool2d: "maxpool", nn.Flatten: "flatten", nn.LeakyReLU: "leaky_relu",
}
_SCALE_FUNCTIONS = {
    F.dropout: "identity", F.max_pool2d: "maxpool", F.avg_pool2d: "avgpool",
    F.adaptive_avg_pool2d: "avgpool", F.adaptive_max_pool2d: "maxpool", torch.flatten: "flatten",
    F.leaky_relu: "leaky_relu",
}
# Ops that keep each channel's mean (bias correction walks back through these only).
_MEAN_KEEPING = {"identity", "avgpool", "flatten"}


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Class of a node for equalization: "relu", "relu6", "leaky_relu", "identity", "maxpool",
    "avgpool", "flatten" (a reshape to (N, -1)), or None (anything else: stops a walk)."""
    act = activation_kind(gm, node)
    if act is not None:
        return act
    m = _module(gm, node)
    if m is not None:
        if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
            return None
        return _SCALE_MODULES.get(type(m))
    if node.op == "call_function" and node.target in _SCALE_FUNCTIONS:
        kind = _SCALE_FUNCTIONS[node.target]
        if kind == "flatten" and _arg(node, 1, "start_dim", 0) != 1:
            return None
        return kind
    if node.op == "call_method":
        if node.target == "flatten" and _arg(node, 1, "start_dim", 0) == 1:
            return "flatten"
        if node.target in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
            return "flatten"  # x.view(batch, -1): channel-major, so channel i owns a contiguous block
        if node.target == "contiguous":
            return "identity"
    return None


def _arg(node: fx.Node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _channels_out(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


@dataclass(frozen=True)
class Link:
    """``producer`` feeds ``consumer`` through ``ops`` only, so that scaling the producer's output
    channel i by s > 0 and the consumer's input channel i by 1/s leaves the network unchanged.

    ``act`` is "relu", "leaky_relu" or None (linear); ``ops`` lists the op kinds on the path."""

    producer: str
    consumer: str
    act: str | None
    ops: tuple[str, ...]


def equalization_links(model: nn.Module) -> list[Link]:
    """Producer -> consumer pairs (Conv/Linear, any groups) where cross-layer equalization is exact.

    Run it after BN folding: an unfolded BN stops a link. The walk from a producer follows single
    users only (a tensor with two users, e.g. a residual branch point, stops it) through ReLU,
    LeakyReLU, identity/dropout, max/avg pooling and flatten; a ReLU6 or any other op (add, cat,
    mul, sigmoid, swish, ...) stops it. A module called at two sites is never part of a link.
    A Linear consumer must take the flattened channels (in_features a multiple of the producer's
    channels); a conv consumer takes no reshape and exactly the producer's channels.
    Links are returned in graph (topological) order.
    """
    gm = trace(model)
    calls = _call_counts(gm)
    links = []
    for node in gm.graph.nodes:
        prod = _module(gm, node)
        if not isinstance(prod, CONV_LINEAR) or calls[node.target] != 1:
            continue
        cur, ops, acts = node, [], []
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            cons = _module(gm, nxt)
            if isinstance(cons, CONV_LINEAR):
                if nxt.args[0] is cur and calls[nxt.target] == 1 and _fits(prod, cons, ops):
                    act = None if not acts else ("relu" if set(acts) == {"relu"} else "leaky_relu")
                    links.append(Link(node.target, nxt.target, act, tuple(ops)))
                break
            kind = op_kind(gm, nxt)
            if kind is None or kind == "relu6" or nxt.args[0] is not cur:
                break
            if kind in _POS_HOMOGENEOUS:
                acts.append(kind)
            ops.append(kind)
            cur = nxt
    return links


def _fits(prod: nn.Module, cons: nn.Module, ops: list[str]) -> bool:
    c = _channels_out(prod)
    if isinstance(cons, nn.Linear):
        spatial = not isinstance(prod, nn.Linear)
        return cons.in_features % c == 0 and (cons.in_features == c or (spatial and "flatten" in ops))
    return "flatten" not in ops and cons.in_channels == c and cons.weight.dim() == prod.weight.dim()


@dataclass(frozen=True)
class Source:
    """The module whose output reaches a layer's input, and the activation on the way."""

    name: str
    act: str | None  # "relu", "relu6" or None
    ops: tuple[str, ...]
    act_site: str | None = None  # the activation's key in ``relu6_sites`` terms (module or node name)


def input_sources(model: nn.Module, keep: str = "range") -> dict[str, Source]:
    """For each Conv/Linear, the module that produces its input, walking back through at most one
    ReLU/ReLU6 and ops that keep the per-tensor value range (``keep="range"``: the walk of
    ``bn_producers``: pooling, flatten, dropout, ...) or each channel's mean (``keep="mean"``: no
    max pooling, no reshape other than flatten). Layers whose walk ends at a non-module node
    (the network input, an add, a concatenation) are absent."""
    return dict(_walk(trace(model), keep))


def _walk(gm: fx.GraphModule, keep: str):
    """(layer name, ``Source``) per Conv/Linear call whose walk ends at a module, in graph order
    (a layer called at several sites comes once per site: in a dict, the last one wins)."""
    for node in gm.graph.nodes:
        if not isinstance(_module(gm, node), CONV_LINEAR):
            continue
        src, act, ops, site = node.args[0], None, [], None
        while isinstance(src, fx.Node):
            kind = activation_kind(gm, src)
            if kind is not None and act is None:
                act, site = kind, _site_key(src)
            elif keep == "range" and kind is None and _passes_range(gm, src):
                pass
            elif keep == "mean" and kind is None and op_kind(gm, src) in _MEAN_KEEPING:
                pass
            else:
                break
            ops.append(kind or op_kind(gm, src) or "pass")
            src = src.args[0]
        if isinstance(src, fx.Node) and src.op == "call_module":
            yield node.target, Source(src.target, act, tuple(reversed(ops)), site)


def _site_key(node: fx.Node) -> str:
    """What replacing an activation acts on: its module (every call site) or its graph node."""
    return node.target if node.op == "call_module" else node.name


def relu6_sites(model: nn.Module) -> dict[str, list[str | None]]:
    """ReLU6 call sites (what ``activation_kind`` calls "relu6") keyed by module name, or by graph
    node name for ``F.relu6``; each value lists, per call site, the module whose output it clips
    (None when the input is not a module's output)."""
    gm = trace(model)
    sites: dict[str, list[str | None]] = {}
    for node in gm.graph.nodes:
        if activation_kind(gm, node) == "relu6":
            src = node.args[0]
            while isinstance(src, fx.Node) and op_kind(gm, src) == "identity":  # e.g. a NormAct's drop
                src = src.args[0]
            feeding = src.target if isinstance(src, fx.Node) and src.op == "call_module" else None
            sites.setdefault(_site_key(node), []).append(feeding)
    return sites


def _is_relu6_module(m: nn.Module) -> bool:
    return isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)


def relu6_to_relu(model: nn.Module, only=None) -> tuple[nn.Module, int]:
    """Replaces ReLU6 (``nn.ReLU6``, ``nn.Hardtanh(0, 6)``, ``F.relu6``) by ReLU.

    Args:
        only: keys of ``relu6_sites`` to replace (a module is replaced at all its call sites);
            None replaces every ReLU6.

    Modules are swapped in place. Functional calls can only be changed in the traced graph, so a
    model with a replaced ``F.relu6`` comes back as a ``torch.fx.GraphModule`` (same module names).
    Returns (model, number of call sites changed). An untraceable model has its modules swapped
    and the count is the number of modules.
    """
    try:
        gm = trace(model)
    except TraceError:
        gm = None
    n_sites, functional, modules = 0, [], set()
    if gm is not None:
        for node in gm.graph.nodes:
            if activation_kind(gm, node) == "relu6" and (only is None or _site_key(node) in only):
                n_sites += 1
                if node.op == "call_function":
                    functional.append(node)
                else:
                    modules.add(node.target)
    else:
        modules = {n for n, m in model.named_modules() if n and _is_relu6_module(m)
                   and (only is None or n in only)}
        n_sites = len(modules)
    out = gm if functional else model
    chosen = {id(out.get_submodule(n)) for n in modules}
    for name, m in list(out.named_modules(remove_duplicate=False)):
        if name and id(m) in chosen:  # every alias of a chosen module
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, nn.ReLU(inplace=m.inplace))
    if functional:
        for node in functional:
            inplace = _arg(node, 1, "inplace", False)
            node.target, node.args, node.kwargs = F.relu, node.args[:1], {"inplace": inplace}
        gm.graph.lint()
        gm.recompile()
    return out, n_sites


__all__ = [
    "norm_act_types", "NormAct", "is_plain_bn", "split_norm_act", "canonical", "module_conv_bn_pairs",
    "LeafTracer", "TraceError", "trace", "conv_bn_pairs", "bn_producers", "activation_kind",
    "Link", "equalization_links", "Source", "input_sources", "op_kind", "relu6_sites", "relu6_to_relu",
]
