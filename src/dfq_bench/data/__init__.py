"""Evaluation datasets: every entry is a factory ``(DatasetConfig, BuiltModel) -> DataBundle``,
registered in ``DATASETS``. A bundle also offers a seeded subset of its *train* split for the
real-data calibration control (never the evaluation split)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from dfq_bench.registry import DATASETS

UNLABELLED = -1  # the label of an evaluation image without a class (natural_images): top-k skips it


@dataclass
class DataBundle:
    loader: Iterable[tuple[Tensor, Tensor]]  # evaluation batches (images, labels)
    n_eval: int
    num_classes: int
    calib: Callable[[int, int], Tensor] | None = None  # (n, seed) -> n train-split images
    info: dict = field(default_factory=dict)  # recorded in the row (root, limit, ...)

    def normalization(self) -> tuple[tuple, tuple] | None:
        """(mean, std) per channel that maps the dataset's [0, 1] pixels to the model's input, from
        ``info["preprocess"]``; None if the dataset does not say."""
        pre = self.info.get("preprocess") or {}
        if pre.get("mean") is None or pre.get("std") is None:
            return None
        return tuple(pre["mean"]), tuple(pre["std"])


class DatasetError(RuntimeError):
    """A dataset that cannot be found or does not fit the model; the message says what to do."""


def check_classes(name: str, dataset_classes: int, model_classes: int) -> None:
    if dataset_classes != model_classes:
        raise DatasetError(
            f"dataset {name!r} has {dataset_classes} classes but the model outputs {model_classes}; "
            "pick a model trained on this dataset"
        )


def limited(n: int, limit: int | None) -> int:
    if limit is not None and limit <= 0:
        raise DatasetError(f"dataset.limit={limit} is invalid; valid: a positive integer or null")
    return n if limit is None else min(n, limit)


def fake(cfg, built) -> DataBundle:
    """Seeded images with random labels, shaped for the model: tests the pipeline only.
    ``dataset.images``: ``gaussian`` (N(0, 1) in the model's input space) or ``pixel`` (uniform
    [0, 1) pixels normalized with the model's mean/std, like ``data=noise``'s pixel space)."""
    if cfg.images not in ("gaussian", "pixel"):
        raise DatasetError(f"dataset.images={cfg.images!r} is invalid; valid: gaussian, pixel")
    mean = torch.tensor(built.preprocess.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(built.preprocess.std, dtype=torch.float32).reshape(1, -1, 1, 1)

    def draw(k: int, g: torch.Generator) -> Tensor:
        if cfg.images == "pixel":
            return (torch.rand((k, *built.input_size), generator=g) - mean) / std
        return torch.randn((k, *built.input_size), generator=g)

    g = torch.Generator().manual_seed(1234)
    n = limited(cfg.num_samples, cfg.limit)
    x = draw(n, g)
    y = torch.randint(0, built.num_classes, (n,), generator=g)

    def calib(k: int, seed: int) -> Tensor:
        return draw(k, torch.Generator().manual_seed(seed))

    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size)
    pre = {"mean": list(built.preprocess.mean), "std": list(built.preprocess.std)}  # the model's, for data=noise
    return DataBundle(loader, n, built.num_classes, calib, {"limit": cfg.limit, "images": cfg.images,
                                                            "preprocess": pre})


DATASETS.register("fake", fake)
DATASETS.register_lazy("imagenet", "dfq_bench.data.imagenet:imagenet")
DATASETS.register_lazy("cifar10", "dfq_bench.data.imagenet:cifar10")
DATASETS.register_lazy("cifar100", "dfq_bench.data.imagenet:cifar100")
DATASETS.register_lazy("imagenet_samples", "dfq_bench.data.samples:imagenet_samples")
DATASETS.register_lazy("cifar10_samples", "dfq_bench.data.samples:cifar10_samples")
DATASETS.register_lazy("natural_images", "dfq_bench.data.natural:natural_images")
DATASETS.register_lazy("fashion_mnist", "dfq_bench.data.fashion_mnist:fashion_mnist")
