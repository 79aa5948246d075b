"""The GDFQ generator and the BN-statistics loss: the data side of the generator-based zero-shot QAT
family (GDFQ, Qimera, AdaDFQ, GranQ; ../shared/docs/methods.md). A method of that family trains the
generator against the teacher's BatchNorm statistics and fine-tunes the quantized student on its
samples (methods/gdfq.py, train/zeroshot.py).

Generator (Xu et al., "Generative Low-bitwidth Data Free Quantization", ECCV 2020; reference
github.com/xushoukai/GDFQ: reimplemented from the description in methods.md, no code taken from it):
a label embedding Embedding(C, latent) multiplied into z ~ N(0, I), then Linear(latent, 128 h0 w0) ->
BN(128) -> upsample x2 -> conv3x3 128->128 -> BN(128, eps 0.8) -> LeakyReLU(0.2) -> upsample to
H x W -> conv3x3 128->64 -> BN(64, eps 0.8) -> LeakyReLU(0.2) -> conv3x3 64->channels -> tanh ->
BN(channels, affine=False), with h0 = ceil(H/4), w0 = ceil(W/4) (7 at 28 px, 8 at 32 px, 56 at 224 px)
and channels the model's. The ImageNet version (``conditional=True``; the default at >= 224 px) feeds z
as it is and conditions the two eps-0.8 BNs on the label instead (``ConditionalBatchNorm2d``: per-class
gamma and beta embeddings over a BN without affine). Deviation: the second upsample goes to exactly
H x W (the reference's x2, the same when H and W are divisible by 4).

Labels are class indices (N,) or soft labels (N, C), rows of non-negative weights summing to 1: a soft
label conditions on the same mixture of the class embeddings, Y @ E (Qimera's superposed samples,
methods/qimera.py; ``label_embedding``). A one-hot row gives exactly E[y].

BN-statistics loss (``bn_stats_loss``): the mean over the teacher's BN layers of MSE(batch mean, running
mean) + MSE(biased batch variance, running variance) of each BN's input, the means and variances per
channel over every other dimension. The inputs come from ``calib.bnstats.InputStats`` hooks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfq_bench.graph import BATCHNORM

BN_EPS = 0.8  # the reference's eps of the two inner BNs (passed positionally there)


def label_embedding(embed: nn.Embedding, y: Tensor) -> Tensor:
    """``embed(y)`` for class indices; for soft labels (N, C) the mixture y @ embed.weight."""
    return embed(y) if not y.is_floating_point() else y.to(embed.weight.dtype) @ embed.weight


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine, then a per-class scale and shift (embeddings initialised to 1 and 0)."""

    def __init__(self, num_features: int, num_classes: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        gamma, beta = label_embedding(self.gamma, y), label_embedding(self.beta, y)
        return gamma[:, :, None, None] * self.bn(x) + beta[:, :, None, None]


class Generator(nn.Module):
    """GDFQ's class-conditional image generator (see the module docstring).

    Args:
        input_size: (channels, H, W) of the model's input.
        num_classes: the classes C of the labels it is conditioned on.
        latent_dim: size of z (the reference: 100).
        conditional: class-conditional BN (the ImageNet version) instead of the label multiply;
            None: at H, W >= 224.
    """

    def __init__(self, input_size, num_classes: int, latent_dim: int = 100, conditional: bool | None = None,
                 width: int = 128):
        super().__init__()
        c, h, w = input_size
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.conditional = min(h, w) >= 224 if conditional is None else conditional
        self.size, self.width, self.h0, self.w0 = (h, w), width, math.ceil(h / 4), math.ceil(w / 4)
        if not self.conditional:
            self.embed = nn.Embedding(num_classes, latent_dim)
        self.linear = nn.Linear(latent_dim, width * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1)
        if self.conditional:
            self.bn1 = ConditionalBatchNorm2d(width, num_classes, eps=BN_EPS)
            self.bn2 = ConditionalBatchNorm2d(width // 2, num_classes, eps=BN_EPS)
        else:
            self.bn1 = nn.BatchNorm2d(width, eps=BN_EPS)
            self.bn2 = nn.BatchNorm2d(width // 2, eps=BN_EPS)
        self.conv3 = nn.Conv2d(width // 2, c, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(c, affine=False)

    def _norm(self, bn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return bn(x, y) if self.conditional else bn(x)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        if not self.conditional:
            z = label_embedding(self.embed, y) * z
        x = self.bn0(self.linear(z).view(z.shape[0], self.width, self.h0, self.w0))
        x = F.interpolate(x, scale_factor=2)
        x = F.leaky_relu(self._norm(self.bn1, self.conv1(x), y), 0.2)
        x = F.interpolate(x, size=self.size)
        x = F.leaky_relu(self._norm(self.bn2, self.conv2(x), y), 0.2)
        return self.out_bn(torch.tanh(self.conv3(x)))

    def draw(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(z, labels) for ``n`` samples from ``g``, on CPU: z ~ N(0, I), labels uniform over the classes."""
        return torch.randn((n, self.latent_dim), generator=g), torch.randint(0, self.num_classes, (n,), generator=g)


def bn_stats_loss(bns: list[nn.Module], bn_inputs: list[Tensor]) -> Tensor:
    """GDFQ's BNS: mean over the BNs of MSE(batch mean, running mean) + MSE(biased batch var, running var)."""
    if not bns:
        raise ValueError("the BN-statistics loss needs at least one BatchNorm layer")
    terms = []
    for bn, x in zip(bns, bn_inputs, strict=True):
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        terms.append(F.mse_loss(mean, bn.running_mean) + F.mse_loss(var, bn.running_var))
    return torch.stack(terms).mean()


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm of ``model`` (whose inputs the loss matches), in module order."""
    return [m for m in model.modules() if isinstance(m, BATCHNORM)]


__all__ = ["BN_EPS", "ConditionalBatchNorm2d", "Generator", "bn_layers", "bn_stats_loss", "label_embedding"]
