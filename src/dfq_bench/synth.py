"""Calibration / synthetic-data generators, registered in ``SYNTH`` (config group ``data``).

Every generator has the same call: ``generate(cfg, model, input_size, seed, device, dataset)``
returning a list of batches, and its own ``Config`` dataclass. The runner times it as t_synth_s.
``noise`` is the control for data-free claims; ``real`` (a seeded subset of the dataset's train
split) is the upper bound. ``zeroq`` and ``genie`` (synth_zeroq.py, synth_genie.py) distill images
from the model's BN statistics and cache them on disk (synth_cache.py); their batches carry an
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
    """Uniform [0, 1) (SQuant's released code: not normalized like images) or standard normal."""

    @dataclass
    class Config:
        name: str = MISSING
        num_samples: int = 256
        batch_size: int = 256
        dist: str = "uniform"  # uniform | gaussian

    @staticmethod
    def generate(cfg, model: nn.Module, input_size, seed: int, device: str, dataset=None) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed)
        shape = (cfg.num_samples, *input_size)
        if cfg.dist == "uniform":
            x = torch.rand(shape, generator=g)
        elif cfg.dist == "gaussian":
            x = torch.randn(shape, generator=g)
        else:
            raise ValueError(f"data.dist={cfg.dist!r} is invalid; valid: uniform, gaussian")
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
SYNTH.register_lazy("zeroq", "dfq_bench.synth_zeroq:ZeroQData")
SYNTH.register_lazy("genie", "dfq_bench.synth_genie:GenieData")
