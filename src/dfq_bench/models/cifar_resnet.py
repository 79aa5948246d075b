"""The CIFAR ResNet-20 of the zero-shot QAT papers (GDFQ, Qimera, AdaDFQ, GranQ): pytorchcv's
``resnet20_cifar10`` / ``resnet20_cifar100`` layout, written here from its description (3 stages of 3 basic
blocks, 16/32/64 channels, 1x1-conv + BN shortcut where the shape changes, 8x8 average pool, Linear), so that
such a checkpoint loads by name from a local file (``model.weights=PATH``, sha256 checked when
``model.sha256`` is set, as the other local-file models; ``null``: random init).

State-dict keys (pytorchcv's module names, as we know them; not checked against a downloaded checkpoint
here, a mismatch is a one-line error naming the keys): ``features.init_block.conv.weight`` and
``features.init_block.bn.*``; ``features.stage{s}.unit{u}.body.conv{1,2}.conv.weight`` /
``.body.conv{1,2}.bn.*``; ``features.stage{s}.unit1.identity_conv.conv.weight`` / ``.identity_conv.bn.*``
(stages 2 and 3); ``output.weight``, ``output.bias``. Convolutions have no bias. Input 3x32x32.
"""

from __future__ import annotations

from torch import Tensor, nn

from dfq_bench.models import BuiltModel, Preprocess
from dfq_bench.models.torchvision_timm import (
    classes_in,
    load_strict,
    local_weights_path,
    read_state_dict,
    require_file_for_checksum,
)

CIFAR_STATS = {10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activ = nn.ReLU(inplace=False) if relu else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return self.activ(x) if self.activ is not None else x


class Body(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = ConvBlock(cin, cout, 3, stride, True)
        self.conv2 = ConvBlock(cout, cout, 3, 1, False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class ResUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = Body(cin, cout, stride)
        self.identity_conv = ConvBlock(cin, cout, 1, stride, False) if (cin != cout or stride != 1) else None
        self.activ = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        identity = self.identity_conv(x) if self.identity_conv is not None else x
        return self.activ(self.body(x) + identity)


class CIFARResNet20(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("init_block", ConvBlock(3, 16, 3, 1, True))
        cin = 16
        for s, cout in enumerate((16, 32, 64), 1):
            stage = nn.Sequential()
            for u in range(1, 4):
                stage.add_module(f"unit{u}", ResUnit(cin, cout, 2 if (u == 1 and s > 1) else 1))
                cin = cout
            self.features.add_module(f"stage{s}", stage)
        self.features.add_module("final_pool", nn.AvgPool2d(8))
        self.output = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.features(x).flatten(1))


def build(cfg, num_classes: int) -> BuiltModel:
    label = f"resnet20_cifar{num_classes}"
    mean, std = CIFAR_STATS[num_classes]
    pre = Preprocess(resize=32, crop=32, mean=mean, std=std)
    model = CIFARResNet20(num_classes)
    if cfg.weights is None:
        require_file_for_checksum(cfg)
        weights = "random-init"
    else:
        path = local_weights_path(str(cfg.weights))
        if path is None:
            from dfq_bench.models.torchvision_timm import WeightsError

            raise WeightsError(f"model.weights={cfg.weights!r}: {label} takes a local state-dict file (pytorchcv's "
                               "layout) or null for random init")
        state, weights = read_state_dict(path, cfg.sha256)
        if classes_in(state, "output", label) != num_classes:
            from dfq_bench.models.torchvision_timm import WeightsError

            raise WeightsError(f"weights for {label} have {classes_in(state, 'output', label)} classes, not "
                               f"{num_classes}")
        load_strict(model, state, label)
    return BuiltModel(model.eval(), (3, 32, 32), num_classes, weights, pre)


def resnet20_cifar10(cfg) -> BuiltModel:
    return build(cfg, 10)


def resnet20_cifar100(cfg) -> BuiltModel:
    return build(cfg, 100)
