"""``zeroq``: ZeroQ's distilled data (Cai et al., "ZeroQ: A Novel Zero Shot Quantization
Framework", CVPR 2020; reference github.com/amirgholami/ZeroQ, GPL-3.0: reimplemented from the
paper and shared/docs/methods.md, no code taken from it).

Pixels are optimized directly, with Adam (lr 0.5) and ReduceLROnPlateau on the loss (patience 100,
min lr 1e-4), against the teacher's BN statistics (teacher in eval mode, its weights untouched):
for every conv followed by a BN, the per-sample per-channel spatial mean and std of the conv output
(the BN input) against the BN's running mean and sqrt(running_var + eps), squared L2 divided by
the batch size; plus the same term for the input image against mean 0 and std 1 per channel (the
model's normalized input space). No label term. Each batch is distilled on its own.

Keys as the reference: ``eps`` (1e-6) is the one eps inside every std, the input's, each sample's and
each BN target's (``eps: null``: each BN's own eps, 1e-5 in torch, and 0 for the input term, this
harness's rule before); ``init: reference`` draws the released code's initial noise,
(randint(0, 255) - 127.5) / 5418.75 (discrete uniform, std 0.0136: it divides by a variance where a
std was meant).

Deviations and choices: the default ``init`` is Gaussian with ``init_std: 1.0`` (the model's
normalized input space), not the reference's tiny noise; the sample std uses the unbiased variance,
and the biased one where a sample has one value per channel (the 1x1 maps of squeeze-excite blocks,
where the unbiased variance is NaN: the std term is then constant and only the mean term acts);
noise is drawn from a seeded ``torch.Generator`` (the reference sets no seed). Models without a
conv->BN pair fall back to every BN's input; a model without BN is refused up front (`require_bn`:
one line, no row). The batching, seeding, cache and hooks are the BN-statistics base's
(calib/bnstats.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from dfq_bench.calib.bnstats import BNStatsData, InputStats, optimize, require_bn
from dfq_bench.calib.cache import Batches
from dfq_bench.config import ConfigError
from dfq_bench.graph import BATCHNORM, TraceError, conv_bn_pairs


def bn_after_conv(model: nn.Module) -> list[nn.Module]:
    """The BNs whose input is a conv output (ZeroQ's layers); every BN if the model cannot be traced
    or has no conv->BN pair. ``model`` must be split (``graph.canonical``), so that the pairs' names
    resolve in it."""
    try:
        bns = [model.get_submodule(bn) for _, bn in conv_bn_pairs(model)]
    except TraceError:
        bns = []
    return bns or [m for m in model.modules() if isinstance(m, BATCHNORM)]


def per_sample_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(N, C) spatial means and sqrt(var + eps) of an (N, C, ...) tensor; the variance is unbiased,
    or biased (0) where each sample has a single value per channel (a 1x1 map)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(dim=2), torch.sqrt(flat.var(dim=2, correction=1 if flat.shape[2] > 1 else 0) + eps)


def zeroq_loss(x: Tensor, bns: list[nn.Module], bn_inputs: list[Tensor], eps: float | None = None) -> Tensor:
    """ZeroQ's loss. ``eps``: one fixed eps inside every std (the input's, each sample's, each BN
    target's: the reference's 1e-6); None: each BN's own eps, and 0 for the input term."""
    n = x.shape[0]
    mean, std = per_sample_stats(x, 0.0 if eps is None else eps)
    loss = ((mean**2).sum() + ((std - 1.0) ** 2).sum()) / n
    for bn, inp in zip(bns, bn_inputs, strict=True):
        e = bn.eps if eps is None else eps
        mean, std = per_sample_stats(inp, e)
        target_std = torch.sqrt(bn.running_var + e)
        loss = loss + (((mean - bn.running_mean) ** 2).sum() + ((std - target_std) ** 2).sum()) / n
    return loss


class ZeroQData(BNStatsData):
    """ZeroQ distilled images (see the module docstring)."""

    source = "zeroq"
    bn_layers = staticmethod(bn_after_conv)

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
        init: str = "gaussian"  # gaussian: N(0, init_std^2) | reference: (randint(0, 255) - 127.5) / 5418.75
        init_std: float = 1.0  # gaussian init's std (0.014 is about the reference's spread)
        eps: float | None = 1e-6  # the reference's fixed eps in every std; null: each BN's eps, 0 for the input
        cache: bool = True
        cache_dir: str | None = None  # null: $DFQ_BENCH_CACHE or ~/.cache/dfq_bench

    @staticmethod
    def check_config(cfg) -> None:
        """Values the types cannot express; one-line ``ConfigError`` before any model is built."""
        if cfg.init not in ("gaussian", "reference"):
            raise ConfigError(f"data.init={cfg.init!r} is invalid; valid: gaussian, reference")
        if cfg.eps is not None and not cfg.eps > 0:
            raise ConfigError(f"data.eps={cfg.eps!r} is invalid; valid: a number > 0, or null (each BN's eps)")

    @staticmethod
    def distill_batch(cfg, model, hooks, n, input_size, g, device) -> tuple[Tensor, float, float]:
        """Optimizes the pixels of a seeded noise batch; returns them after the last step."""
        if cfg.init == "reference":  # discrete uniform, std 0.0136: the released code's noise
            x = (torch.randint(0, 256, (n, *input_size), generator=g).float() - 127.5) / 5418.75
        else:
            x = torch.randn((n, *input_size), generator=g) * cfg.init_std
        x = x.to(device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=cfg.patience, min_lr=cfg.min_lr)

        def update(step: int, loss: float) -> None:
            opt.step()
            sched.step(loss)

        loss = functools.partial(zeroq_loss, eps=cfg.eps)
        return optimize(model, hooks, cfg.steps, "zeroq", lambda: x, loss, [x], update)


__all__ = ["ZeroQData", "Batches", "bn_after_conv", "require_bn", "zeroq_loss", "InputStats"]
