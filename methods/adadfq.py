"""AdaDFQ: GDFQ's generator and zero-shot QAT loop with adaptive-difficulty generator losses.

Paper: Qian et al., "Adaptive Data-Free Quantization", CVPR 2023. Reference code:
github.com/hfutqian/AdaDFQ (no licence file; built on GDFQ's code, whose quantizer files carry ZeroQ's
GPL-3.0 header): reimplemented from ../shared/docs/methods.md ("The generator-based zero-shot QAT
family"), no code taken from it.

The generator, the BN-statistics loss (BNS), the alternating loop with warm-up, the STE fine-tuning of
the quantized student, the learning-rate schedule, the optimizers and the accuracy curve /
``top1_best_epoch`` are GDFQ's (methods/gdfq.py, train/zeroshot.py). The losses are AdaDFQ's, with t the
teacher's and q the student's logits on the generated batch, y its labels and C the classes:

- generator: margin + beta * (a_ds * CE(t - q, y) + a_as * CE(t + q, y)) + gamma * BNS, with q NOT
  detached (the trainer runs the student in the generator step, ``student_in_generator_step``): the
  disagreement term (t - q) and the agreement term (t + q), cross-entropies of softmax over those logits.
- margin (``margin_loss``): h = entropy of softmax(t - q) per sample; h' = (h - min_batch h) /
  (log C - min_batch h); margin = mean(relu(l_l - h')) + mean(relu(h' - l_u)): the samples' normalised
  disagreement entropy kept inside [l_l, l_u].
- student (``entropy_student_loss``): -mean(T^2 * entropy(softmax((t - q) / T))), no KL, no CE.

Keys (conf/method/adadfq.yaml, the shipped 3-bit defaults): a_ds 0.2, a_as 0.1, l_l 0.1, l_u 0.8, beta 1,
gamma 1, temperature 20 (the reference's ImageNet value: 5), batch 16 (hard-coded in the reference's
margin loss), 400 epochs x 200 iterations with 4 warm-up epochs; GDFQ's Adam (lr 1e-3, betas (0.5, 0.999))
and SGD (Nesterov momentum 0.9, weight decay 1e-4, lr 1e-4; the reference's ImageNet value 1e-6), both
x0.1 at epochs 100/200/300. The 4/5-bit values the reference gives only as comments (e.g. a_ds 0.3 for
4-bit MobileNetV2, l_l 0.3 for 4/5-bit ResNet-18) are overrides. ``method=adadfq_cpu``: gdfq_cpu's sizes
(4 epochs x 20 iterations of batch 16, one of them warm-up), ``preset: cpu``.

Deviations and choices, besides GDFQ's (listed in methods/gdfq.py: the quantizer is the run's protocol,
the activation ranges are set once after the warm-up by the protocol's range rule and stay fixed):
- During the warm-up the generator loss uses the student as it is then: weights on their grid, activations
  not yet quantized (their ranges are set after the warm-up).
- h' divides by max(log C - min_batch h, 1e-12) (a batch of uniform softmaxes would otherwise be 0/0).
- Quantizer, protocol preset and controls: methods/gdfq.py's ``method.quantizer`` (protocol | reference),
  ``range_inflation``, ``samples`` (generator | noise | real) and ``finetune``, with the same deviations (the
  activation quantizers sit after every ReLU/ReLU6 only under ``protocol=zsqat_paper``; elsewhere at the
  inputs of the quantized Conv/Linear layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from dfq_bench.methods.gdfq import GDFQ, check_loop_config
from omegaconf import MISSING
from torch import Tensor


def entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of softmax(logits) (natural log)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def margin_loss(t: Tensor, q: Tensor, lower: float, upper: float) -> Tensor:
    """mean(relu(lower - h')) + mean(relu(h' - upper)), h' the batch-min-max-normalised entropy of
    softmax(t - q) (see the module docstring)."""
    h = entropy(t - q)
    h_min = h.min()
    hn = (h - h_min) / torch.clamp(math.log(t.shape[1]) - h_min, min=1e-12)
    return F.relu(lower - hn).mean() + F.relu(hn - upper).mean()


def entropy_student_loss(q: Tensor, t: Tensor, temperature: float) -> Tensor:
    """-mean(T^2 * entropy(softmax((t - q) / T)))."""
    return -(temperature ** 2 * entropy((t - q) / temperature)).mean()


class AdaDFQ(GDFQ):
    name = "adadfq"
    version = "1"
    student_in_generator_step = True  # the trainer hands generator_loss the student's logits, not detached

    @dataclass
    class Config:
        name: str = MISSING
        preset: str = "paper"  # paper | cpu: recorded in the row
        epochs: int = 400  # warm-up included
        iters_per_epoch: int = 200
        batch_size: int = 16  # the reference's (hard-coded in its margin loss)
        warmup_epochs: int = 4  # generator only
        milestones: list[int] = field(default_factory=lambda: [100, 200, 300])  # epochs where both lrs x lr_gamma
        lr_gamma: float = 0.1
        latent_dim: int = 100
        conditioning: str = "auto"  # auto: class-conditional BN from 224 px on, else | multiply (label x z) | cbn
        lr_generator: float = 1e-3
        generator_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # Adam
        a_ds: float = 0.2  # weight of the disagreement CE(t - q, y)
        a_as: float = 0.1  # weight of the agreement CE(t + q, y)
        l_l: float = 0.1  # margin's lower bound on the normalised entropy
        l_u: float = 0.8  # margin's upper bound
        beta: float = 1.0  # weight of the two CE terms
        gamma: float = 1.0  # weight of the BN-statistics loss
        lr_student: float = 1e-4
        momentum: float = 0.9
        nesterov: bool = True
        weight_decay: float = 1e-4
        temperature: float = 20.0  # of the student's entropy loss (reference: 20 CIFAR, 5 ImageNet)
        calib_images: int = 1024  # generated images for the activation ranges, after the warm-up
        eval_images: int | None = 1000  # per-epoch curve on the first N evaluation images; null: all
        quantizer: str = "protocol"  # protocol: the run's protocol | reference: min/max weights each step, EMA acts
        range_inflation: bool = False  # reference only: the EMA's recursive bias correction (early ranges inflated)
        ema_momentum: float = 0.9  # reference only: the EMA of the activations' batch min/max
        samples: str = "generator"  # generator | noise | real (controls: the run's data= source, same name)
        finetune: bool = True  # false: the samples calibrate the ranges only, no student step

    @staticmethod
    def check_config(c) -> None:
        """Values the types cannot express; one-line ``ConfigError`` (checked before any model is built)."""
        check_loop_config(c, (("a_ds", c.a_ds >= 0, "a number >= 0"), ("a_as", c.a_as >= 0, "a number >= 0"),
                              ("l_l", 0 <= c.l_l <= 1, "a number in [0, 1]"),
                              ("l_u", c.l_l <= c.l_u <= 1, f"a number in [method.l_l={c.l_l}, 1]"),
                              ("beta", c.beta >= 0, "a number >= 0"), ("gamma", c.gamma >= 0, "a number >= 0")))

    def generator_loss(self, t: Tensor, y: Tensor, bns: Tensor, q: Tensor | None = None) -> Tensor:
        """margin + beta * (a_ds * CE(t - q, y) + a_as * CE(t + q, y)) + gamma * BNS; q not detached."""
        c = self.cfg
        ce = c.a_ds * F.cross_entropy(t - q, y) + c.a_as * F.cross_entropy(t + q, y)
        return margin_loss(t, q, c.l_l, c.l_u) + c.beta * ce + c.gamma * bns

    def student_loss(self, q: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """-mean(T^2 * entropy(softmax((t - q) / T))): no KL, no CE."""
        return entropy_student_loss(q, t, self.cfg.temperature)
