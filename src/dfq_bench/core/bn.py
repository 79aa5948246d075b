"""BN folding and the prepared working copy (the ``prepare`` stage): fused norm-activation modules split,
BN folded into the conv before it, the float model never touched.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dfq_bench.core.modules import _set_submodule
from dfq_bench.graph import BATCHNORM, TraceError, conv_bn_pairs, module_conv_bn_pairs, split_norm_act


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
