"""``genie``: GENIE-D synthetic data (Jeon et al., "Genie: Show Me the Data for Quantization",
CVPR 2023; reference github.com/SamsungLabs/Genie, Apache-2.0: reimplemented from the paper and
shared/docs/methods.md).

Per batch, a fresh generator (Linear latent -> 128 x H/4 x W/4, BN, upsample x2, conv 3x3 128->64,
BN, LeakyReLU 0.2, upsample to H x W, conv 3x3 64->C, tanh, BN without affine) and a learnable
latent z ~ N(0, I) are optimized jointly: Adam on z (lr 0.1, ReduceLROnPlateau: patience 100,
min lr 1e-4) and on the generator (lr 0.01, x0.95 every 100 steps). The teacher (eval mode, weights
untouched) sees every strided conv's input shifted by a random -1/0/+1 pixel in each direction
("swing convolution": reflect pad 1, random crop). Loss, as the reference: for every BN, the batch
mean and std (over N, H, W) of its input against running_mean and sqrt(running_var + 1e-6),
squared L2 divided by the channel count; plus the per-sample per-channel mean/std of the image
against 0/1, squared L2 divided by the batch size. The images of the last step are kept.

Deviations and choices: every random draw (latent, generator init, swing offsets) comes from a
seeded ``torch.Generator``, so a seed gives identical data (the reference uses numpy's global RNG
for swing offsets and sets no seed); the generator's first feature map is ceil(H/4) x ceil(W/4) and
its second upsample goes to exactly H x W (the reference assumes H divisible by 4; identical then);
image channels follow the model's input (the reference has 3). The batching, seeding, cache and
hooks are the BN-statistics base's (calib/bnstats.py): the teacher is a split copy of the model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor, nn

from dfq_bench.calib.bnstats import BNStatsData, optimize

BN_STD_EPS = 1e-6  # the reference's eps for sqrt(running_var + eps)


class Generator(nn.Module):
    """GENIE's per-batch image generator."""

    def __init__(self, input_size, latent_dim: int = 256, c1: int = 128, c2: int = 64):
        super().__init__()
        c, h, w = input_size
        self.c1, self.h0, self.w0 = c1, math.ceil(h / 4), math.ceil(w / 4)
        self.linear = nn.Linear(latent_dim, c1 * self.h0 * self.w0)
        self.body = nn.Sequential(
            nn.BatchNorm2d(c1),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.LeakyReLU(0.2),
            nn.Upsample(size=(h, w)),
            nn.Conv2d(c2, c, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(c, affine=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.linear(z).view(z.shape[0], self.c1, self.h0, self.w0))


def swing(x: Tensor, generator: torch.Generator) -> Tensor:
    """``x`` shifted by a random (dy, dx) in {-1, 0, 1}^2: reflect pad 1, crop back to H x W."""
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    h, w = x.shape[-2:]
    return F.pad(x, (1, 1, 1, 1), mode="reflect")[..., dy:dy + h, dx:dx + w]


@contextmanager
def swing_convs(model: nn.Module, generator: torch.Generator):
    """Makes every strided Conv2d of ``model`` see a swung input while the context is open."""
    def hook(module, args):
        return (swing(args[0], generator), *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d) and any(s != 1 for s in m.stride)]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def genie_loss(x: Tensor, bns: list[nn.Module], bn_inputs: list[Tensor]) -> Tensor:
    std, mean = torch.std_mean(x.reshape(x.shape[0], x.shape[1], -1), dim=2)
    loss = ((mean**2).sum() + ((std - 1.0) ** 2).sum()) / x.shape[0]
    for bn, inp in zip(bns, bn_inputs, strict=True):
        dims = [0] + list(range(2, inp.dim()))
        std, mean = torch.std_mean(inp, dim=dims)
        target_std = torch.sqrt(bn.running_var + BN_STD_EPS)
        loss = loss + (((mean - bn.running_mean) ** 2).sum() + ((std - target_std) ** 2).sum()) / mean.numel()
    return loss


class GenieData(BNStatsData):
    """GENIE-D synthetic images (see the module docstring)."""

    source = "genie"
    min_batch = 2  # batch statistics need two images

    @dataclass
    class Config:
        name: str = MISSING
        preset: str = "paper"  # paper | cpu: recorded in the row
        num_samples: int = 1024
        batch_size: int = 128
        steps: int = 4000  # per batch
        latent_dim: int = 256
        gen_channels: int = 128  # first feature map; the second has half
        lr_latent: float = 0.1
        lr_generator: float = 0.01
        generator_decay: float = 0.95
        decay_every: int = 100
        patience: int = 100
        min_lr: float = 1e-4
        swing: bool = True
        cache: bool = True
        cache_dir: str | None = None  # null: $DFQ_BENCH_CACHE or ~/.cache/dfq_bench

    @staticmethod
    def distill_batch(cfg, model, hooks, n, input_size, g, device) -> tuple[Tensor, float, float]:
        """One batch of GENIE-D: a fresh generator and latent; returns the images of the last step."""
        with torch.random.fork_rng(devices=[]):  # generator init from our seed, global RNG untouched
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
            gen = Generator(input_size, cfg.latent_dim, cfg.gen_channels, cfg.gen_channels // 2).to(device)
        z = torch.randn((n, cfg.latent_dim), generator=g).to(device).requires_grad_(True)
        opt_z = torch.optim.Adam([z], lr=cfg.lr_latent)
        sched_z = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, patience=cfg.patience, min_lr=cfg.min_lr)
        opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_generator)
        sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=cfg.generator_decay)

        def update(step: int, loss: float) -> None:
            opt_z.step()
            opt_g.step()
            sched_z.step(loss)
            if (step + 1) % cfg.decay_every == 0:
                sched_g.step()

        with swing_convs(model, g) if cfg.swing else nullcontext():
            return optimize(model, hooks, cfg.steps, "genie", lambda: gen(z), genie_loss, [z, *gen.parameters()],
                            update)
