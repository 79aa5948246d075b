"""The alternating generator / student loop of the generator-based zero-shot QAT family (GDFQ, Qimera,
AdaDFQ, GranQ; ../shared/docs/methods.md), for the ``calibrate`` and ``train`` stages of such a method
(methods/gdfq.py).

Each iteration of an epoch: one generator step on a fresh batch (z, labels) with the method's generator
loss, computed from the teacher's logits and BN-statistics term on G(z, labels) (Adam); then, unless the
epoch is a warm-up epoch, one student step on the same batch, detached, with the method's student loss
(SGD). Learning rates are multiplied by ``lr_gamma`` at each epoch of ``milestones`` (both optimizers,
epochs counted from 0 over the whole run, warm-up included). Every random draw comes from one
``torch.Generator`` seeded by the run seed. ``cfg`` is the method's config (``iters_per_epoch``,
``batch_size``, ``lr_generator``, ``generator_betas``, ``lr_student``, ``momentum``, ``nesterov``,
``weight_decay``, ``milestones``, ``lr_gamma``); the losses are the method's ``generator_loss`` and
``student_loss`` (``losses``). A method with a ``draw(generator, n, g)`` draws the (z, labels) itself
(Qimera's soft labels: rows of an (n, C) matrix summing to 1); otherwise ``generator.draw``. A method
with ``student_in_generator_step = True`` (AdaDFQ, GranQ) gets the student's logits on the generated batch,
NOT detached, as a fourth argument of ``generator_loss``: the generator's gradient then flows through the
student (its straight-through quantizers) into the generator, and only the generator's parameters are
updated by that step (the student's gradients are not accumulated). Without it (GDFQ, Qimera) the student
is not run in the generator step.

Controls (``method.samples``): with ``images`` (a tensor of fixed images: noise or real training images from
the run's calibration source) and no generator, each iteration draws a batch of ``batch_size`` of them
(seeded, with replacement), labels them with the teacher's argmax and takes the student step only (no
generator step; the generator losses are recorded as None). ``observe_student`` (the references' EMA
activation ranges): in a warm-up epoch the student is also run (no gradient) on each batch, so that its
EMA quantizers see the warm-up's samples, unless it already runs in the generator step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dfq_bench.calib.bnstats import InputStats
from dfq_bench.calib.generator import bn_layers, bn_stats_loss
from dfq_bench.core.modules import NonFiniteError


def lr_factor(epoch: int, milestones, gamma: float) -> float:
    """gamma ** (number of milestones <= epoch): MultiStepLR's factor at ``epoch`` (0-based)."""
    return gamma ** sum(epoch >= m for m in milestones)


class ZeroShotTrainer:
    """Teacher, student, generator, their optimizers and hooks for one run (see the module docstring).

    The teacher (eval mode, frozen) carries the BN-input hooks; the student stays in eval mode (BN running
    statistics frozen, as the reference), its trainable parameters are those with ``requires_grad``; the
    generator trains in train mode.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, generator: nn.Module | None, cfg, losses, seed: int,
                 device, progress=lambda it, **kw: it, images: Tensor | None = None, observe_student: bool = False):
        if (generator is None) == (images is None):
            raise ValueError("ZeroShotTrainer takes a generator or fixed images, not both or neither")
        self.teacher, self.student = teacher.eval(), student.eval()
        self.generator = generator.train() if generator is not None else None
        self.images, self.observe_student = images, observe_student
        self.cfg, self.losses, self.device, self.progress = cfg, losses, device, progress
        names = {id(m): n for n, m in teacher.named_modules()}
        bns = bn_layers(teacher)
        self.hooks = InputStats(bns, [names[id(m)] for m in bns])
        self.g = torch.Generator().manual_seed(seed)
        self.opt_g = None if generator is None else torch.optim.Adam(generator.parameters(), lr=cfg.lr_generator,
                                                                     betas=tuple(cfg.generator_betas))
        self.opt_s: torch.optim.Optimizer | None = None  # made at the first student step
        self.student_in_generator_step = bool(getattr(losses, "student_in_generator_step", False))
        self.generator_params = [] if generator is None else [p for p in generator.parameters() if p.requires_grad]
        self.history: dict[str, list[float]] = {"loss_generator": [], "loss_bns": [], "loss_student": []}

    def _set_lr(self, epoch: int) -> None:
        f = lr_factor(epoch, self.cfg.milestones, self.cfg.lr_gamma)
        for group in self.opt_g.param_groups if self.opt_g is not None else ():
            group["lr"] = self.cfg.lr_generator * f
        if self.opt_s is not None:
            for group in self.opt_s.param_groups:
                group["lr"] = self.cfg.lr_student * f

    def _student_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        params = [p for p in self.student.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=c.lr_student, momentum=c.momentum, nesterov=c.nesterov,
                               weight_decay=c.weight_decay)

    def draw(self, n: int) -> tuple[Tensor, Tensor]:
        """(z, labels) for ``n`` samples from the run's random stream, by the method's ``draw`` if it has one."""
        own = getattr(self.losses, "draw", None)
        return own(self.generator, n, self.g) if own is not None else self.generator.draw(n, self.g)

    @torch.no_grad()
    def samples(self, n: int) -> list[Tensor]:
        """``n`` generated images in batches of ``batch_size`` (the generator as it is now); with fixed images,
        the first ``n`` of them."""
        if self.images is None:
            return self._generated(n)
        return list(torch.split(self.images[:n].to(self.device), self.cfg.batch_size))

    @torch.no_grad()
    def _generated(self, n: int) -> list[Tensor]:
        out, done = [], 0
        while done < n:
            z, y = self.draw(min(self.cfg.batch_size, n - done))
            out.append(self.generator(z.to(self.device), y.to(self.device)))
            done += len(y)
        return out

    def epoch(self, epoch: int, train_student: bool, desc: str = "epoch") -> dict[str, float]:
        """One epoch of ``iters_per_epoch`` iterations; returns (and appends to ``history``) its mean losses."""
        c = self.cfg
        if train_student and self.opt_s is None:
            self.opt_s = self._student_optimizer()
        self._set_lr(epoch)
        sums = {"loss_generator": 0.0, "loss_bns": 0.0, "loss_student": 0.0}
        bar = self.progress(range(c.iters_per_epoch), desc=desc)
        for it in bar:
            if self.images is not None:
                self._fixed_step(it, train_student, sums, desc, bar)
                continue
            z, y = self.draw(c.batch_size)
            z, y = z.to(self.device), y.to(self.device)
            x = self.generator(z, y)
            t = self.teacher(x)
            bns = bn_stats_loss(self.hooks.modules, self.hooks.inputs)
            if self.student_in_generator_step:
                loss_g = self.losses.generator_loss(t, y, bns, self.student(x))
            else:
                loss_g = self.losses.generator_loss(t, y, bns)
            self.hooks.check_finite(loss_g, f"{desc} iteration {it}: generator loss")
            self.opt_g.zero_grad(set_to_none=True)
            if self.student_in_generator_step:
                loss_g.backward(inputs=self.generator_params)  # the student's own gradients: not needed here
            else:
                loss_g.backward()
            self.opt_g.step()
            lg, ls = float(loss_g.detach()), None
            sums["loss_generator"] += lg
            sums["loss_bns"] += float(bns.detach())
            if not train_student and self.observe_student and not self.student_in_generator_step:
                with torch.no_grad():
                    self.student(x.detach())  # EMA activation ranges see the warm-up's samples
            if train_student:
                q = self.student(x.detach())
                ls = self._student_step(self.losses.student_loss(q, t.detach(), y), it, desc, sums)
            if hasattr(bar, "set_postfix") and it % 10 == 0:
                bar.set_postfix(G=f"{lg:.3g}", S="-" if ls is None else f"{ls:.3g}")
        means = {k: v / c.iters_per_epoch for k, v in sums.items()}
        if not train_student:
            means["loss_student"] = None
        if self.images is not None:
            means["loss_generator"] = means["loss_bns"] = None
        for k, v in means.items():
            self.history[k].append(v)
        return means

    def _fixed_step(self, it: int, train_student: bool, sums: dict, desc: str, bar) -> None:
        """One iteration on the fixed images: a seeded batch, the teacher's argmax as labels, the student step."""
        idx = torch.randint(0, len(self.images), (self.cfg.batch_size,), generator=self.g)
        x = self.images[idx].to(self.device)
        with torch.no_grad():
            t = self.teacher(x)
        if not train_student:
            if self.observe_student:
                with torch.no_grad():
                    self.student(x)
            return
        q = self.student(x)
        ls = self._student_step(self.losses.student_loss(q, t, t.argmax(1)), it, desc, sums)
        if hasattr(bar, "set_postfix") and it % 10 == 0:
            bar.set_postfix(S=f"{ls:.3g}")

    def _student_step(self, loss_s: Tensor, it: int, desc: str, sums: dict) -> float:
        """One SGD step of the student on ``loss_s`` (a non-finite loss stops the run); returns its value."""
        ls = float(loss_s.detach())
        if not math.isfinite(ls):
            raise NonFiniteError(f"{desc} iteration {it}: the student loss is {ls}")
        self.opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        self.opt_s.step()
        sums["loss_student"] += ls
        return ls

    def close(self) -> None:
        self.hooks.remove()


@torch.inference_mode()
def top1_subset(model: nn.Module, loader, n: int | None, device) -> tuple[float | None, int]:
    """Top-1 (percent, labelled images only) of ``model`` on the first ``n`` images of ``loader`` (None: all),
    and the number of images seen."""
    seen = right = labelled = 0
    for x, y in loader:
        if n is not None:
            x, y = x[: n - seen], y[: n - seen]
        x, y = x.to(device), y.to(device)
        pred = model(x).argmax(1)
        right += int((pred == y).sum())
        labelled += int((y >= 0).sum())
        seen += len(y)
        if n is not None and seen >= n:
            break
    return (100.0 * right / labelled if labelled else None), seen


__all__ = ["ZeroShotTrainer", "lr_factor", "top1_subset"]
