"""Calibration / synthetic-data generators, registered in ``SYNTH`` (config group ``data``).

Every generator has the same call: ``generate(cfg, model, input_size, seed, device, dataset)``
returning a list of batches, and its own ``Config`` dataclass. The runner times it as t_synth_s.
``noise`` is the control for data-free claims (pixel-space noise normalized like the dataset's images,
or the raw batch of SQuant's rule); ``real`` (a seeded subset of the dataset's train
split) is the upper bound. ``zeroq`` and ``genie`` (calib/zeroq.py, calib/genie.py) distill images
from the model's BN statistics and cache them on disk (calib/cache.py); their batches carry an
``info`` dict that the runner records as ``data_info``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from dfq_bench.registry import SYNTH


def batched(x: Tensor, batch_size: int) -> list[Tensor]:
    return list(torch.split(x, batch_size))


class Noise:
    """Noise images, the control for data-free claims.

    ``space: pixel``: drawn in pixel space (uniform: U[0, 1); gaussian: N(0.5, 0.25^2) clipped to
    [0, 1]) and normalized with the dataset's mean/std, like the model's real images.
    ``space: raw``: the draws as they are, not normalized (uniform U[0, 1), SQuant's released code;
    gaussian N(0, 1)). ``space: auto`` (default): raw for the ``squant`` activation range rule (the
    reference's batch), pixel otherwise; the row's ``data.space`` records what was used.
    """

    @dataclass
    class Config:
        name: str = MISSING
        num_samples: int = 256
        batch_size: int = 256
        dist: str = "uniform"  # uniform | gaussian
        space: str = "auto"  # auto | pixel | raw

    @staticmethod
    def check_config(cfg) -> None:
        from dfq_bench.config import ConfigError

        if cfg.dist not in ("uniform", "gaussian"):
            raise ConfigError(f"data.dist={cfg.dist!r} is invalid; valid: uniform, gaussian")
        if cfg.space not in ("auto", "pixel", "raw"):
            raise ConfigError(f"data.space={cfg.space!r} is invalid; valid: auto, pixel, raw")

    @staticmethod
    def resolve(cfg, act_range: str | None):
        """``cfg`` with ``space: auto`` made concrete for this run's activation range rule."""
        if cfg.space == "auto":
            cfg = cfg.copy()
            cfg.space = "raw" if act_range == "squant" else "pixel"
        return cfg

    @staticmethod
    def generate(cfg, model: nn.Module, input_size, seed: int, device: str, dataset=None) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed)
        shape = (cfg.num_samples, *input_size)
        space = "pixel" if cfg.space == "auto" else cfg.space
        if cfg.dist == "uniform":
            x = torch.rand(shape, generator=g)
        elif cfg.dist == "gaussian":
            x = torch.randn(shape, generator=g)
            if space == "pixel":
                x = (x * 0.25 + 0.5).clamp_(0.0, 1.0)
        else:
            raise ValueError(f"data.dist={cfg.dist!r} is invalid; valid: uniform, gaussian")
        if space == "pixel":
            norm = dataset.normalization() if dataset is not None else None
            if norm is None:
                raise ValueError("data.space=pixel needs the dataset's normalization (mean/std), and this "
                                 "dataset gives none; use data.space=raw")
            mean, std = (torch.tensor(v, dtype=x.dtype).reshape(1, -1, *([1] * (x.dim() - 2))) for v in norm)
            x = (x - mean) / std
        return batched(x.to(device), cfg.batch_size)


class Real:
    """A seeded subset of the dataset's train split, preprocessed like the evaluation data."""

    @dataclass
    class Config:
        name: str = MISSING
        num_samples: int = 256
        batch_size: int = 256

    @staticmethod
    def generate(cfg, model: nn.Module, input_size, seed: int, device: str, dataset=None) -> list[Tensor]:
        if dataset is None or dataset.calib is None:
            raise ValueError("data=real needs a dataset with a train split; this one has none")
        return batched(dataset.calib(cfg.num_samples, seed).to(device), cfg.batch_size)


SYNTH.register("noise", Noise)
SYNTH.register("real", Real)
SYNTH.register_lazy("zeroq", "dfq_bench.calib.zeroq:ZeroQData")
SYNTH.register_lazy("genie", "dfq_bench.calib.genie:GenieData")
