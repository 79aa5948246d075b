"""``test_cnn``: a tiny seeded CNN with every structure the quantizers must handle (conv-BN-ReLU,
a residual add, a depthwise conv with ReLU6, a 1x1 conv, a linear head) and non-trivial BN
statistics, so the whole pipeline runs in tests in well under a second."""

from __future__ import annotations

import torch
from torch import nn

from dfq_bench.models import BuiltModel


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class TestCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16), nn.ReLU())
        self.conv1, self.bn1 = conv_bn(16, 16)
        self.conv2, self.bn2 = conv_bn(16, 16)
        self.relu = nn.ReLU()
        self.dw = nn.Sequential(*conv_bn(16, 16, stride=2, groups=16), nn.ReLU6())
        self.pw = nn.Sequential(*conv_bn(16, 32, k=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(y)))
        x = self.pw(self.dw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_test_cnn(seed: int = 0, num_classes: int = 10) -> TestCNN:
    """Deterministic weights and BN statistics from ``seed`` (independent of the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    model = TestCNN(num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def build(cfg) -> BuiltModel:
    return BuiltModel(make_test_cnn(0), (3, 32, 32), 10, "random-init seed 0")


build.takes_weights = False  # model.weights would be ignored: validate_config refuses it
