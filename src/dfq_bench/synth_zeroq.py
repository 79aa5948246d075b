"""``zeroq``: ZeroQ's distilled data (Cai et al., "ZeroQ: A Novel Zero Shot Quantization
Framework", CVPR 2020; reference github.com/amirgholami/ZeroQ, GPL-3.0: reimplemented from the
paper and shared/docs/methods.md, no code taken from it).

Pixels are optimized directly, with Adam (lr 0.5) and ReduceLROnPlateau on the loss (patience 100,
min lr 1e-4), against the teacher's BN statistics (teacher in eval mode, its weights untouched):
for every conv followed by a BN, the per-sample per-channel spatial mean and std of the conv output
(the BN input) against the BN's running mean and sqrt(running_var + eps), squared L2 divided by
the batch size; plus the same term for the input image against mean 0 and std 1 per channel (the
model's normalized input space). No label term. Each batch is distilled on its own.

Deviations and choices: the sample std uses the unbiased variance plus the BN's eps, and the biased
one where a sample has one value per channel (the 1x1 maps of squeeze-excite blocks, where the
unbiased variance is NaN: the std term is then constant and only the mean term acts); noise is drawn
from a seeded ``torch.Generator`` (the reference sets no seed). The reference initialises its noise
with std ~0.014 (it divides by the variance instead of the std): that quirk is ``init_std: 0.014``
here, off by default (``init_std: 1.0``). Models without a conv->BN pair fall back to every BN's
input; a model without BN is refused up front (`require_bn`: one line, no row).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from dfq_bench.config import UnsupportedError
from dfq_bench.graph import BATCHNORM, TraceError, canonical, conv_bn_pairs
from dfq_bench.quant import NonFiniteError
from dfq_bench.synth_cache import Batches, cached_generate

log = logging.getLogger(__name__)


def require_bn(model: nn.Module, source: str, label: str | None = None) -> None:
    """A BN-statistics generator refuses a model without BatchNorm up front (``UnsupportedError``)."""
    if not any(isinstance(m, BATCHNORM) for m in model.modules()):
        raise UnsupportedError(f"data={source} cannot run on {label or type(model).__name__}: it matches "
                               "BatchNorm statistics and the model has no BatchNorm layer (use data=noise or real)")


def bn_after_conv(model: nn.Module) -> list[nn.Module]:
    """The BNs whose input is a conv output (ZeroQ's layers); every BN if the model cannot be traced.
    ``model`` must be split (``graph.canonical``), so that the pairs' names resolve in it."""
    try:
        bns = [model.get_submodule(bn) for _, bn in conv_bn_pairs(model)]
    except TraceError:
        bns = []
    bns = bns or [m for m in model.modules() if isinstance(m, BATCHNORM)]
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer: BN-statistics data cannot be made")
    return bns


class InputStats:
    """Forward pre-hooks recording the input of each given module during a pass."""

    def __init__(self, modules: list[nn.Module], names: list[str] | None = None):
        self.inputs: list[Tensor | None] = [None] * len(modules)
        self.names = names or [type(m).__name__ for m in modules]
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(modules)]

    def check_finite(self, loss: Tensor, what: str) -> None:
        """Raises ``NonFiniteError`` naming the first module whose input is not finite (or the
        loss, if every input is finite) when ``loss`` is NaN or Inf."""
        if bool(torch.isfinite(loss)):
            return
        for name, x in zip(self.names, self.inputs, strict=True):
            if x is not None and not bool(torch.isfinite(x).all()):
                raise NonFiniteError(f"{what}: non-finite activation (NaN or Inf) at the input of {name}")
        raise NonFiniteError(f"{what}: the loss is {float(loss)} with finite inputs at every BN")

    def _hook(self, i: int):
        def hook(module, args):
            self.inputs[i] = args[0]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def per_sample_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(N, C) spatial means and sqrt(var + eps) of an (N, C, ...) tensor; the variance is unbiased,
    or biased (0) where each sample has a single value per channel (a 1x1 map)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(dim=2), torch.sqrt(flat.var(dim=2, correction=1 if flat.shape[2] > 1 else 0) + eps)


def zeroq_loss(x: Tensor, bns: list[nn.Module], bn_inputs: list[Tensor]) -> Tensor:
    n = x.shape[0]
    mean, std = per_sample_stats(x, 0.0)
    loss = ((mean**2).sum() + ((std - 1.0) ** 2).sum()) / n
    for bn, inp in zip(bns, bn_inputs, strict=True):
        mean, std = per_sample_stats(inp, bn.eps)
        target_std = torch.sqrt(bn.running_var + bn.eps)
        loss = loss + (((mean - bn.running_mean) ** 2).sum() + ((std - target_std) ** 2).sum()) / n
    return loss


@torch.enable_grad()
def distill_batch(model: nn.Module, bns: list[nn.Module], x0: Tensor, cfg,
                  names: list[str] | None = None) -> tuple[Tensor, float, float]:
    """Optimizes the pixels of ``x0``; returns (images, first loss, last loss)."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=cfg.patience, min_lr=cfg.min_lr)
    hooks = InputStats(bns, names)
    first = last = float("nan")
    try:
        for step in range(cfg.steps):
            model(x)
            loss = zeroq_loss(x, bns, hooks.inputs)
            hooks.check_finite(loss, f"zeroq step {step}")
            (grad,) = torch.autograd.grad(loss, [x])  # no gradient is accumulated in the teacher
            opt.zero_grad(set_to_none=True)
            x.grad = grad
            opt.step()
            sched.step(float(loss.detach()))
            if step == 0:
                first = float(loss.detach())
            last = float(loss.detach())
    finally:
        hooks.remove()
    return x.detach(), first, last


class ZeroQData:
    """ZeroQ distilled images (see the module docstring)."""

    @dataclass
    class Config:
        name: str = MISSING
        preset: str = "paper"  # paper | cpu: recorded in the row
        num_samples: int = 64
        batch_size: int = 64
        steps: int = 500
        lr: float = 0.5
        patience: int = 100
        min_lr: float = 1e-4
        init_std: float = 1.0  # 0.014 reproduces the reference's initialisation quirk
        cache: bool = True
        cache_dir: str | None = None  # null: $DFQ_BENCH_CACHE or ~/.cache/dfq_bench

    @staticmethod
    def check_model(model: nn.Module, label: str | None = None) -> None:
        require_bn(model, "zeroq", label)

    @staticmethod
    def generate(cfg, model: nn.Module, input_size, seed: int, device: str, dataset=None) -> list[Tensor]:
        if cfg.num_samples < 1 or cfg.batch_size < 1 or cfg.steps < 1:
            raise ValueError("data.num_samples, data.batch_size and data.steps must be >= 1")
        return cached_generate(cfg, model, input_size, seed, device,
                               lambda: ZeroQData.make(cfg, model, input_size, seed))

    @staticmethod
    def make(cfg, model: nn.Module, input_size, seed: int) -> tuple[list[Tensor], dict]:
        model = canonical(model).eval()  # a split copy: pair names resolve, the caller's model is untouched
        device = next(model.parameters()).device
        bns = bn_after_conv(model)
        names = {id(m): n for n, m in model.named_modules()}
        names = [names[id(m)] for m in bns]
        g = torch.Generator().manual_seed(seed)
        batches, firsts, lasts = [], [], []
        done = 0
        while done < cfg.num_samples:
            n = min(cfg.batch_size, cfg.num_samples - done)
            x0 = torch.randn((n, *input_size), generator=g) * cfg.init_std
            x, first, last = distill_batch(model, bns, x0.to(device), cfg, names)
            batches.append(x)
            firsts.append(first)
            lasts.append(last)
            log.info("zeroq batch %d: loss %.4g -> %.4g", len(batches), first, last)
            done += n
        return batches, {"loss_start": sum(firsts) / len(firsts), "loss_end": sum(lasts) / len(lasts),
                         "n_bn_terms": len(bns)}


__all__ = ["ZeroQData", "Batches", "bn_after_conv", "require_bn", "zeroq_loss", "InputStats"]
