"""Qimera: GDFQ with superposed-label ("boundary supporting") synthetic samples.

Paper: Choi et al., "Qimera: Data-free Quantization with Synthetic Boundary Supporting Samples", NeurIPS
2021. Reference code: github.com/iamkanghyunchoi/qimera (GPL-3.0; built on GDFQ's code, whose quantizer
files carry ZeroQ's GPL-3.0 header): reimplemented from ../shared/docs/methods.md ("The generator-based
zero-shot QAT family"), no code taken from it.

Everything is GDFQ (methods/gdfq.py: generator, BN-statistics loss, alternating loop, STE fine-tuning,
the accuracy curve and ``top1_best_epoch``) except the labels the generator is conditioned on: each
sample of a batch is, with probability ``mix_p`` (0.4), a superposed sample: the first of its
``mix_classes`` (K) classes is the drawn label, the other K - 1 are drawn uniformly, and the weights are
softmax of K standard normal draws. The sample's label is then the soft label Y (an (n, C) row summing to
1: the weights put on their classes, repeats added), the generator is conditioned on the same convex
mixture of the class embeddings (Y @ E, ``calib.generator.label_embedding``), and both CE terms use Y as a
soft target: CE(teacher(G(z, Y)), Y) for the generator, CE(q, Y) in the student loss (PyTorch's
cross-entropy with class probabilities: -sum_c Y_c log softmax(.)_c, averaged over the batch). The other
samples keep one-hot labels, so with ``mix_p: 0`` the run is GDFQ's (the same random stream aside: the
mixing draws are still taken). ``embed_init: teacher_fc`` initialises the label embedding from the
teacher's last Linear layer (its (C, F) weight; the latent size becomes F, recorded in the row's
``generator``); ``random`` (default) is GDFQ's initialisation.

Deviations and choices, besides GDFQ's (listed in methods/gdfq.py):
- Superposition is drawn per sample (probability ``mix_p`` each), from the run's random stream.
- K (``mix_classes``, default 2) is our default: methods.md does not give the reference's.
- Qimera's optional disentanglement mapping layer (an extra learned map after the mixed embedding) is not
  implemented; the mixing is done on the embedding the generator multiplies into z (for the ImageNet
  generator: on the class-conditional BN's gamma and beta embeddings).
- With ``embed_init: teacher_fc`` the embedding is initialised, not frozen: it trains with the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dfq_bench.methods.gdfq import GDFQ
from torch import Tensor, nn

from dfq_bench.calib.generator import Generator
from dfq_bench.config import ConfigError, UnsupportedError
from dfq_bench.core.method import QuantState

EMBED_INIT = ("random", "teacher_fc")


def superposed_labels(y: Tensor, num_classes: int, p: float, k: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Soft labels (n, C) for hard labels ``y``: each row, with probability ``p``, puts softmax(randn(k))
    on y and k - 1 uniformly drawn classes (weights of a repeated class added), else one-hot. Returns
    (the soft labels, the mask of superposed rows). Every draw is taken from ``g`` whatever ``p``."""
    n = len(y)
    mixed = torch.rand(n, generator=g) < p
    classes = torch.cat([y[:, None], torch.randint(0, num_classes, (n, k - 1), generator=g)], dim=1)
    weights = torch.softmax(torch.randn(n, k, generator=g), dim=1)
    weights = torch.where(mixed[:, None], weights, F.one_hot(torch.zeros(n, dtype=torch.long), k).float())
    soft = torch.zeros(n, num_classes).scatter_add_(1, classes, weights)
    return soft, mixed


def last_linear(model: nn.Module, num_classes: int) -> nn.Linear | None:
    """The last Linear layer of ``model`` with ``num_classes`` outputs (the classifier), or None."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return found[-1] if found else None


class Qimera(GDFQ):
    name = "qimera"
    version = "1"

    @dataclass
    class Config(GDFQ.Config):
        mix_p: float = 0.4  # probability that a sample is superposed
        mix_classes: int = 2  # K classes mixed in a superposed sample
        embed_init: str = "random"  # random | teacher_fc: the label embedding from the teacher's last Linear

    @staticmethod
    def check_config(c) -> None:
        GDFQ.check_config(c)
        for key, ok, valid in (
                ("mix_p", 0 <= c.mix_p <= 1, "a probability in [0, 1]"),
                ("mix_classes", c.mix_classes >= 2, "an integer >= 2"),
                ("embed_init", c.embed_init in EMBED_INIT, ", ".join(EMBED_INIT))):
            if not ok:
                raise ConfigError(f"method.{key}={getattr(c, key)!r} is invalid; valid: {valid}")

    def check_model(self, model: nn.Module, ctx, label: str | None = None) -> None:
        super().check_model(model, ctx, label)
        if self.cfg.embed_init == "teacher_fc" and not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise UnsupportedError(f"method {self.name} cannot run on {label or type(model).__name__} with "
                                   "method.embed_init=teacher_fc: the model has no Linear classifier")

    def draw(self, gen: Generator, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """z ~ N(0, I) and soft labels (``superposed_labels``) for ``n`` samples (the trainer's hook)."""
        z, y = gen.draw(n, g)
        return z, superposed_labels(y, gen.num_classes, self.cfg.mix_p, self.cfg.mix_classes, g)[0]

    def make_generator(self, state: QuantState, num_classes: int) -> Generator:
        cfg = self.cfg
        if cfg.embed_init == "random":
            gen = super().make_generator(state, num_classes)
        else:
            fc = last_linear(state.teacher, num_classes)
            if fc is None:
                raise UnsupportedError(f"method {self.name}: method.embed_init=teacher_fc needs a Linear layer with "
                                       f"{num_classes} outputs (the classifier)")
            gen = Generator(tuple(state.ctx.example_input.shape[1:]), num_classes, fc.in_features,
                            None if cfg.conditioning == "auto" else cfg.conditioning == "cbn")
            if gen.conditional:
                raise UnsupportedError(f"method {self.name}: method.embed_init=teacher_fc needs the label-multiply "
                                       "generator (method.conditioning=multiply); the class-conditional BN one "
                                       "has no label embedding of the latent")
            with torch.no_grad():
                gen.embed.weight.copy_(fc.weight.detach())
        state.info["qimera"] = {"latent_dim": gen.latent_dim, "embed_init": cfg.embed_init,
                                "mix_p": cfg.mix_p, "mix_classes": cfg.mix_classes}
        return gen
