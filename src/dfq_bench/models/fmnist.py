"""The embedded zoo: three small Fashion-MNIST classifiers trained by ``scripts/train_zoo.py``, whose
weights are committed in ``models/weights/`` and listed in ``models/weights/zoo.json``.

- ``resnet20_fmnist``: CIFAR-style ResNet-20 (He et al. 2016, section 4.2): a 3x3 stem, three stages
  of three basic blocks at 16/32/64 channels, global average pooling, a linear head. The shortcuts
  that change shape are 1x1 conv + BN ("option B") rather than the paper's zero-padding ("option
  A"), so every operation is a module the quantizers see.
- ``mobilenetv2_fmnist``: a narrow MobileNetV2 (Sandler et al. 2018): inverted residual blocks
  (1x1 expand, 3x3 depthwise, 1x1 linear projection) with BN and ReLU6, identity shortcuts where
  shapes match.
- ``vgg_fmnist``: a plain VGG-style stack of conv-BN-ReLU pairs with max pooling, global average
  pooling and a linear head (no residuals, no depthwise convs).

Input is the native 1x28x28 image (no padding to 32), normalised with the Fashion-MNIST train mean
and std carried in ``BuiltModel.preprocess``; 10 classes. Downsampling: 28 -> 14 -> 7.

``model.weights``: ``zoo`` (the committed file; its size and sha256 are checked against zoo.json
before it is read, so a truncated or corrupted file fails with a one-line error instead of giving a
random model), a path to a local state-dict file (checked against ``model.sha256`` when set), or
null for a seeded random initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dfq_bench.models import BuiltModel, Preprocess
from dfq_bench.models.torchvision_timm import (
    WeightsError,
    load_strict,
    local_weights_path,
    read_state_dict,
    sha256_file,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "zoo.json"
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)  # of the 60k train images, pixel values in [0, 1]
INPUT_SIZE = (1, 28, 28)
NUM_CLASSES = 10
PREPROCESS = Preprocess(resize=28, crop=28, mean=FMNIST_MEAN, std=FMNIST_STD, interpolation="bilinear")


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# ---------------------------------------------------------------------------------------------
# ResNet-20


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, stride=stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(cout, cout)
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, k=1, stride=stride)) \
            if stride != 1 or cin != cout else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, blocks: int = 3, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if i > 0 and b == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------------------------------------
# MobileNetV2


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        steps = [] if expand == 1 else [*conv_bn(cin, hidden, k=1), nn.ReLU6()]
        steps += [*conv_bn(hidden, hidden, stride=stride, groups=hidden), nn.ReLU6(),
                  *conv_bn(hidden, cout, k=1)]
        self.block = nn.Sequential(*steps)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    # (expansion t, channels c, repeats n, first stride s): the first five rows of the paper's Table 2
    # with expansion 4 instead of 6 (the 28x28 input makes the wide expanded maps the main CPU cost)
    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 1), (4, 96, 1, 1))

    def __init__(self, num_classes: int = NUM_CLASSES, stem: int = 16, last: int = 256):
        super().__init__()
        layers, cin = [*conv_bn(1, stem), nn.ReLU6()], stem
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [*conv_bn(cin, last, k=1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ---------------------------------------------------------------------------------------------
# VGG


class VGG(nn.Module):
    CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256)  # 28 -> 14 -> 7 -> 3

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers, cin = [], 1
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*conv_bn(cin, v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


ARCHS = {"resnet20_fmnist": ResNet20, "mobilenetv2_fmnist": MobileNetV2, "vgg_fmnist": VGG}


def make(name: str) -> nn.Module:
    """A freshly initialised model (torch's default init, from the global RNG)."""
    return ARCHS[name]()


# ---------------------------------------------------------------------------------------------
# committed weights


def read_manifest(weights_dir: Path | None = None) -> dict:
    path = Path(weights_dir or WEIGHTS_DIR) / MANIFEST
    if not path.is_file():
        return {"models": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read the zoo manifest {path}: {type(e).__name__}: {e}") from None


def zoo_weights(name: str, weights_dir: Path | None = None) -> tuple[dict, str]:
    """Reads ``<weights_dir>/<name>.pt`` after checking its size and sha256 against zoo.json."""
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    entry = read_manifest(weights_dir).get("models", {}).get(name)
    path = weights_dir / f"{name}.pt"
    if entry is None:
        raise WeightsError(
            f"no committed weights for {name} in {weights_dir / MANIFEST}; train them with "
            f"`python scripts/train_zoo.py --model {name}`, or set model.weights=null for random init"
        )
    if not path.is_file():
        raise WeightsError(f"weights file {path} is missing; restore it from git or retrain with "
                           f"`python scripts/train_zoo.py --model {name}`")
    size, expected = path.stat().st_size, entry["sha256"]
    if size != entry["bytes"]:
        raise WeightsError(
            f"weights file {path} is truncated or altered: {size} bytes, zoo.json expects "
            f"{entry['bytes']}; restore it from git (git checkout -- {path.name}) or retrain"
        )
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(
            f"checksum mismatch for {path}: sha256 is {actual}, zoo.json expects {expected}; "
            "the file is corrupted or was replaced: restore it from git or retrain"
        )
    sd, _ = read_state_dict(path, expected)
    return sd, f"zoo:{name} sha256:{actual}"


def build_named(name: str, cfg) -> BuiltModel:
    model = make(name)
    weights = cfg.weights
    if weights is None:
        if cfg.sha256 is not None:
            raise WeightsError("model.sha256 is set but model.weights is null; it checks a local file only")
        return BuiltModel(model.eval(), INPUT_SIZE, NUM_CLASSES, "random-init", PREPROCESS)
    if str(weights) == "zoo":
        if cfg.sha256 is not None:
            raise WeightsError("model.sha256 is set but model.weights=zoo; zoo weights are checked "
                               "against zoo.json (model.sha256 checks a local file only)")
        sd, identity = zoo_weights(name)
    else:
        path = local_weights_path(str(weights))
        if path is None:
            raise WeightsError(f"model.weights={weights!r} is invalid for {name}; valid: zoo (the committed "
                               "weights), a local state-dict file, or null for random init")
        sd, identity = read_state_dict(path, cfg.sha256)
    load_strict(model, sd, name)
    return BuiltModel(model.eval(), INPUT_SIZE, NUM_CLASSES, identity, PREPROCESS)


def resnet20_fmnist(cfg) -> BuiltModel:
    return build_named("resnet20_fmnist", cfg)


def mobilenetv2_fmnist(cfg) -> BuiltModel:
    return build_named("mobilenetv2_fmnist", cfg)


def vgg_fmnist(cfg) -> BuiltModel:
    return build_named("vgg_fmnist", cfg)
