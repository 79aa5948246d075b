"""models/cifar_resnet.py against pytorchcv itself (an independent implementation, installed by the `dev`
extra): a pytorchcv ResNet-20 state dict loads strictly into ours and both give the same logits."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_cfg

from dfq_bench import catalog  # noqa: F401  (fills the registries)
from dfq_bench.registry import MODELS


@pytest.mark.parametrize("name, classes", [("resnet20_cifar10", 10), ("resnet20_cifar100", 100)])
def test_a_pytorchcv_checkpoint_loads_and_gives_the_same_logits(name, classes, tmp_path):
    resnet_cifar = pytest.importorskip("pytorchcv.models.resnet_cifar")
    torch.manual_seed(0)
    ref = getattr(resnet_cifar, name)(pretrained=False).eval()
    with torch.no_grad():  # BN statistics that are not the identity, so a misplaced BN shows
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    built = MODELS.get(name)(compose_cfg([f"model={name}", f"model.weights={path}"]).model)
    assert built.num_classes == classes and built.input_size == (3, 32, 32)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(built.model(x), ref(x), rtol=0, atol=1e-5)
