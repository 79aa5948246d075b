"""Model zoo: every entry is a factory ``(ModelConfig) -> BuiltModel``, registered in ``MODELS``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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


@torch.no_grad()
def reestimate_bn(built: BuiltModel, images: torch.Tensor, source: str, batch_size: int = 32) -> None:
    """Re-estimates every BN's running statistics in place: the cumulative average of the batch
    statistics over ``images`` (model inputs, already normalized), everything else in eval mode.
    For randomly initialised models, whose unit BN statistics do not fit their activations.
    Appends ``+bn_reestimate:<n>:<source>`` to ``built.weights`` (the row's identity)."""
    model = built.model
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    dev = next(model.parameters()).device
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    try:
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            if len(chunk) < 2:  # training-mode BN needs two values per channel
                chunk = images[-2:]
            model(chunk.to(dev))
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.eval()
    built.weights = f"{built.weights}+bn_reestimate:{len(images)}:{source}"


MODELS.register_lazy("test_cnn", "dfq_bench.models.test_cnn:build")
MODELS.register_lazy("resnet18", "dfq_bench.models.torchvision_timm:resnet18")
MODELS.register_lazy("resnet50", "dfq_bench.models.torchvision_timm:resnet50")
MODELS.register_lazy("mobilenet_v2", "dfq_bench.models.torchvision_timm:mobilenet_v2")
MODELS.register_lazy("inception_v3", "dfq_bench.models.torchvision_timm:inception_v3")
MODELS.register_lazy("timm", "dfq_bench.models.torchvision_timm:timm_model")
MODELS.register_lazy("torchvision", "dfq_bench.models.torchvision_timm:torchvision_model")
MODELS.register_lazy("efficientnet_lite0", "dfq_bench.models.efficientnet:build")
MODELS.register_lazy("efficientnet_lite1", "dfq_bench.models.efficientnet:build")
MODELS.register_lazy("efficientnet_lite2", "dfq_bench.models.efficientnet:build")
MODELS.register_lazy("resnet20_cifar10", "dfq_bench.models.cifar_resnet:resnet20_cifar10")
MODELS.register_lazy("resnet20_cifar100", "dfq_bench.models.cifar_resnet:resnet20_cifar100")
MODELS.register_lazy("resnet20_fmnist", "dfq_bench.models.fmnist:resnet20_fmnist")
MODELS.register_lazy("mobilenetv2_fmnist", "dfq_bench.models.fmnist:mobilenetv2_fmnist")
MODELS.register_lazy("vgg_fmnist", "dfq_bench.models.fmnist:vgg_fmnist")
