"""Model zoo: every entry is a factory ``(ModelConfig) -> BuiltModel``, registered in ``MODELS``."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from dfq_bench.registry import MODELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing a model expects from image datasets (ImageNet style by default)."""

    resize: int = 256
    crop: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"


@dataclass
class BuiltModel:
    model: nn.Module
    input_size: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    weights: str  # identity of the weights, recorded in the row (hash, tag or "random-init")
    preprocess: Preprocess = field(default_factory=Preprocess)


MODELS.register_lazy("test_cnn", "dfq_bench.models.test_cnn:build")
