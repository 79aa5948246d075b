"""GDFQ: zero-shot quantization-aware training on the samples of a generator fitted to the teacher.

Paper: Xu et al., "Generative Low-bitwidth Data Free Quantization", ECCV 2020. Reference code:
github.com/xushoukai/GDFQ (no licence of its own; its quantizer files carry ZeroQ's GPL-3.0 header):
reimplemented from ../shared/docs/methods.md ("The generator-based zero-shot QAT family"), no code taken
from it or from its descendants (Qimera, AdaDFQ, GranQ).

What it does (``epochs`` x ``iters_per_epoch`` iterations, train/zeroshot.py): every iteration draws
labels y and z ~ N(0, I) and takes one generator step (``calib.generator.Generator``, Adam lr 1e-3, betas
(0.5, 0.999)) on CE(teacher(G(z, y)), y) + 0.1 * BNS (``calib.generator.bn_stats_loss``: mean over the
teacher's BNs of MSE(batch mean, running mean) + MSE(biased batch var, running var) of their inputs),
then one step of the quantized student on the detached batch: KL(softmax(t/T) || softmax(q/T)) with
'mean' reduction (divided by batch x classes) times T^2, T = 20, plus CE(q, y); SGD, Nesterov momentum
0.9, weight decay 1e-4, lr 1e-4. The first ``warmup_epochs`` epochs train the generator only; both
learning rates are x0.1 at epochs 100/200/300 of 400; batch 200. Every weight, temperature, optimizer
setting, schedule value and batch size is a key (conf/method/gdfq.yaml: the reference's CIFAR defaults,
``preset: paper``; ``method=gdfq_cpu``: ``preset: cpu``, 4 epochs x 20 iterations of batch 16, one of them
warm-up, the curve on 500 images: one W4A4 run on resnet20_fmnist in under 5 minutes on 2 CPU cores).
The teacher is the float model (unfolded, eval mode, frozen); the generator's size comes from the
model's input (28, 32 or 224 px, 1 or 3 channels; class-conditional BN from 224 px on).

The student is the quantized model of the run's protocol (planner, weight grid, BN folding, activation
quantizers at the inputs of the planned layers): its weights train as float parameters fake-quantized on
their fixed grid in every forward with straight-through rounding (``Method.weight_quantizer = "ste"``),
its activations are fake-quantized with straight-through gradients; BN, where the protocol keeps it,
stays in eval mode with its affine parameters trained. At the end the weights are written on their grid
(at most 2^b levels per channel) and the model after the LAST step is returned: the row's ``top1`` is
that model on the full evaluation set.

Model selection made visible: after the warm-up and after every later epoch the student is evaluated on
the first ``eval_images`` images of the run's evaluation set (``null``: all of it; the runner hands them
over as ``ctx.eval_data``): the row carries that curve (``top1_curve``, ``top1_curve_epochs``,
``curve_n_eval``), its best value ``top1_best_epoch`` (what the released scripts report: the test set
selects the model) and the epoch it came from (``best_epoch``); the curve's last value is the returned
model on the same images. The per-epoch losses are ``loss_generator``, ``loss_bns`` and ``loss_student``.
The evaluation time is inside ``t_quant_s``.

Quantizer (``method.quantizer``, shared by qimera, adadfq, granq):
- ``protocol`` (default): the run's protocol. The weight grid is fixed from the float weights before
  training; the trained float weights start at the prepared float weights. The warm-up epochs train the
  generator alone, then the protocol's range rule (min/max by default) runs on ``calib_images`` generated
  images and the ranges stay fixed while the student trains.
- ``reference``: the released code's quantizer: weights asymmetric per output channel on the grid of the
  channel's [min, max] recomputed from the float weights at every forward (``core.learn.MinMaxSteWeight``,
  straight-through; the final weights are written on the grid of the final float weights, kept in the
  layer's ``w_scale``/``w_zero_point``); activations per-tensor asymmetric with range = EMA (``ema_momentum``
  0.9) of the batch min/max (``core.modules.EmaActQuant``), updated on every warm-up batch (the student is
  run, without gradient, on each generated batch of the warm-up epochs), frozen after them (no warm-up: one
  pass over ``calib_images`` samples); the row's ``act_range`` is ``ema``. ``range_inflation=true`` adds the
  recursive bias correction that inflates early ranges (``ema_inflated``; our reading of methods.md's
  one-line description, see ``EmaActQuant``). The bits per layer are still the protocol's planner's: use
  ``protocol=zsqat_paper`` for the references' every-layer-at-wbits, BN-unfolded choices and their placement,
  an activation quantizer after every ReLU/ReLU6 (``protocol.a_placement=after_relu``, either quantizer);
  under other protocols the quantizers sit at the input of each quantized Conv/Linear (the core's placement).

Controls (``method.samples``, ``method.finetune``):
- ``samples=noise|real``: the same student fine-tuning on the run's calibration source (``data=noise`` or
  ``data=real``, the dataset's train split: the data-driven upper bound; the data name must match, checked
  up front): a fixed pool of ``data.num_samples`` images, each iteration a seeded batch of ``batch_size``
  drawn from it with replacement, labelled by the teacher's argmax; no generator, no generator step (the
  generator losses are recorded as None); the warm-up epochs only feed the EMA ranges
  (``quantizer=reference``) and are skipped otherwise. The reference has no such control.
- ``finetune=false``: the samples (the warm-up-trained generator's, or the pool's) calibrate the
  activation ranges only; no student step (the weights are the grid's rounding of the float weights).

Deviations and choices:
- The student forwards only after the warm-up (the reference also forwards it during warm-up, for its
  EMA ranges and accuracy); accuracy is monitored on a subset, not the whole test set, per epoch.
- The generator is seeded from the run seed (its initialisation, every z and label); the reference sets
  seeds only globally. No data augmentation, as the reference.
- A model without BatchNorm is refused up front (the generator's loss needs BN statistics); mixed
  precision (``mp.*``) is refused (its sensitivity pass needs batches before quantization).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dfq_bench.calib.generator import Generator, bn_layers
from dfq_bench.config import ConfigError, UnsupportedError
from dfq_bench.core.grid import Grid, weight_grid
from dfq_bench.core.learn import MinMaxSteWeight
from dfq_bench.core.method import Method, QuantContext, QuantState, copy_frozen
from dfq_bench.core.modules import EmaActQuant, a_placement, bake_weights, install_act_quants, quant_layers
from dfq_bench.core.planner import LayerPlan
from dfq_bench.graph import canonical
from dfq_bench.train.zeroshot import ZeroShotTrainer, top1_subset

log = logging.getLogger(__name__)
CONDITIONING = ("auto", "multiply", "cbn")
QUANTIZERS = ("protocol", "reference")  # method.quantizer
SAMPLES = ("generator", "noise", "real")  # method.samples: noise/real come from the run's data= source


def check_family_keys(c) -> None:
    """The keys every method of the family shares beyond its losses: the quantizer and the controls."""
    for key, ok, valid in (
            ("quantizer", c.quantizer in QUANTIZERS, ", ".join(QUANTIZERS)),
            ("ema_momentum", 0 <= c.ema_momentum < 1, "a number in [0, 1)"),
            ("samples", c.samples in SAMPLES, ", ".join(SAMPLES))):
        if not ok:
            raise ConfigError(f"method.{key}={getattr(c, key)!r} is invalid; valid: {valid}")
    if c.range_inflation and c.quantizer != "reference":
        raise ConfigError("method.range_inflation=true is invalid with method.quantizer='protocol'; valid: "
                          "method.quantizer=reference (the quirk belongs to the reference's EMA ranges)")



def check_loop_config(c, losses: tuple) -> None:
    """The keys every method of the family shares (loop, generator, student optimizer, evaluation) and a
    method's own ``losses`` checks, each ``(key, ok, what is valid)``; one-line ``ConfigError``."""
    milestones, betas = list(c.milestones), list(c.generator_betas)
    for key, ok, valid in (
            ("epochs", c.epochs >= 0, "an integer >= 0"),
            ("iters_per_epoch", c.iters_per_epoch >= 1, "an integer >= 1"),
            ("batch_size", c.batch_size >= 2, "an integer >= 2 (BN statistics of a batch)"),
            ("warmup_epochs", c.warmup_epochs >= 0, "an integer >= 0"),
            ("milestones", all(m >= 0 for m in milestones) and milestones == sorted(milestones),
             "ascending integers >= 0"),
            ("lr_gamma", c.lr_gamma > 0, "a number > 0"),
            ("latent_dim", c.latent_dim >= 1, "an integer >= 1"),
            ("conditioning", c.conditioning in CONDITIONING, ", ".join(CONDITIONING)),
            ("lr_generator", c.lr_generator >= 0, "a number >= 0"),
            ("generator_betas", len(betas) == 2 and all(0 <= b < 1 for b in betas), "two numbers in [0, 1)"),
            *losses,
            ("lr_student", c.lr_student >= 0, "a number >= 0"),
            ("momentum", 0 <= c.momentum < 1, "a number in [0, 1)"),
            ("weight_decay", c.weight_decay >= 0, "a number >= 0"),
            ("temperature", c.temperature > 0, "a number > 0"),
            ("calib_images", c.calib_images >= 1, "an integer >= 1"),
            ("eval_images", c.eval_images is None or c.eval_images >= 1, "an integer >= 1, or null (all)")):
        if not ok:
            raise ConfigError(f"method.{key}={getattr(c, key)!r} is invalid; valid: {valid}")
    if c.nesterov and not c.momentum > 0:
        raise ConfigError(f"method.momentum={c.momentum!r} is invalid with method.nesterov=true; valid: a number "
                          "in (0, 1)")
    check_family_keys(c)

class GDFQ(Method):
    name = "gdfq"
    version = "1"
    weight_quantizer = "ste"
    needs_eval = True  # the runner hands over its evaluation loader (ctx.eval_data) for the accuracy curve
    # keys added after the first rows: hashed into the run_id only away from these defaults (config.identity_config)
    identity_defaults = {"quantizer": "protocol", "range_inflation": False, "ema_momentum": 0.9,
                         "samples": "generator", "finetune": True}
    mp_refusal = ("its data come from its own generator during quantization, and the sensitivity pass needs "
                  "batches first")

    @dataclass
    class Config:
        name: str = MISSING
        preset: str = "paper"  # paper | cpu: recorded in the row
        epochs: int = 400  # warm-up included
        iters_per_epoch: int = 200
        batch_size: int = 200
        warmup_epochs: int = 4  # generator only
        milestones: list[int] = field(default_factory=lambda: [100, 200, 300])  # epochs where both lrs x lr_gamma
        lr_gamma: float = 0.1
        latent_dim: int = 100
        conditioning: str = "auto"  # auto: class-conditional BN from 224 px on, else | multiply (label x z) | cbn
        lr_generator: float = 1e-3
        generator_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # Adam
        gen_ce_weight: float = 1.0  # CE(teacher(G(z, y)), y)
        bns_weight: float = 0.1  # BN-statistics loss
        lr_student: float = 1e-4
        momentum: float = 0.9
        nesterov: bool = True
        weight_decay: float = 1e-4
        temperature: float = 20.0  # of the KL term (times T^2)
        kl_weight: float = 1.0
        ce_weight: float = 1.0  # CE(q, y) of the student
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
        check_loop_config(c, (("gen_ce_weight", c.gen_ce_weight >= 0, "a number >= 0"),
                              ("bns_weight", c.bns_weight >= 0, "a number >= 0"),
                              ("kl_weight", c.kl_weight >= 0, "a number >= 0"),
                              ("ce_weight", c.ce_weight >= 0, "a number >= 0")))

    # ---- what the runner asks before any work ---------------------------------------------------

    def wants_data(self, ctx: QuantContext) -> bool:
        """Only the controls take the runner's batches (noise or real images); the generator makes its own."""
        return self.cfg.samples != "generator"

    def check_data(self, data_name: str) -> None:
        """``method.samples=noise|real`` trains on the run's calibration source, which must be that one."""
        if self.cfg.samples != "generator" and data_name != self.cfg.samples:
            raise ConfigError(f"method.samples={self.cfg.samples!r} needs data={self.cfg.samples} (the images it "
                              f"fine-tunes on come from the run's calibration source), not data={data_name}")

    def activation_granularity(self, protocol) -> str:
        own = super().activation_granularity(protocol)
        if self.cfg.quantizer == "reference" and own == "per_channel":
            raise ConfigError("method.quantizer='reference' keeps one EMA range per tensor and conflicts with "
                              "protocol.a_granularity='per_channel'; valid: protocol.a_granularity=per_tensor|dynamic")
        return own

    def check_model(self, model: nn.Module, ctx: QuantContext, label: str | None = None) -> None:
        super().check_model(model, ctx, label)
        if self.cfg.samples == "generator" and not bn_layers(model):
            raise UnsupportedError(f"method {self.name} cannot run on {label or type(model).__name__}: its generator "
                                   "matches BatchNorm statistics and the model has no BatchNorm layer")

    # ---- the losses (Qimera, AdaDFQ override these) ---------------------------------------------

    def generator_loss(self, t: Tensor, y: Tensor, bns: Tensor) -> Tensor:
        """CE(teacher logits, labels) * gen_ce_weight + bns_weight * BNS."""
        return self.cfg.gen_ce_weight * F.cross_entropy(t, y) + self.cfg.bns_weight * bns

    def student_loss(self, q: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """kl_weight * KL(softmax(t/T) || softmax(q/T)) ('mean': / batch x classes) * T^2 + ce_weight * CE(q, y)."""
        T = self.cfg.temperature
        log_p, log_q = F.log_softmax(t / T, dim=1), F.log_softmax(q / T, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum() / log_p.numel() * T * T  # F.kl_div's 'mean', without its warning
        return self.cfg.kl_weight * kl + self.cfg.ce_weight * F.cross_entropy(q, y)

    # ---- the stages -----------------------------------------------------------------------------

    def prepare(self, state: QuantState) -> None:
        """The student as the protocol prepares it (trainable); the teacher: the float model, split,
        unfolded, frozen, in eval mode."""
        super().prepare(state)
        for p in state.model.parameters():
            p.requires_grad_(True)
        state.teacher = copy_frozen(canonical(state.float_model)).eval()

    def weight_grid(self, w: Tensor, plan: LayerPlan, state: QuantState) -> Grid:
        """The protocol's grid; ``quantizer=reference``: asymmetric per output channel over [min, max]."""
        if self.cfg.quantizer == "reference":
            return weight_grid(w, plan.w_bits, per_channel=True, symmetric=False, include_zero=False)
        return super().weight_grid(w, plan, state)

    def weights(self, state: QuantState) -> None:
        """STE weights on the grid (the base stage), their trainable float values the prepared float weights
        (the base stage starts them at their rounded values: the same forward, the QAT latent kept).
        ``quantizer=reference``: the grid recomputed from the float weights at every forward
        (``core.learn.MinMaxSteWeight``)."""
        floats = {name: state.model.get_submodule(name).weight.detach().clone() for name in state.grids}
        if self.cfg.quantizer == "reference":
            bake_weights(state.model, state.plans, state.grids, state.levels)
            for p in state.plans:
                if p.name in state.grids:
                    parametrize.register_parametrization(state.model.get_submodule(p.name).layer, "weight",
                                                         MinMaxSteWeight(p.w_bits))
        else:
            super().weights(state)
        with torch.no_grad():
            for name, w in floats.items():
                state.model.get_submodule(name).layer.parametrizations.weight.original.copy_(w)

    def make_generator(self, state: QuantState, num_classes: int) -> Generator:
        """The GDFQ generator for the model's input (called under the run seed)."""
        cfg = self.cfg
        return Generator(tuple(state.ctx.example_input.shape[1:]), num_classes, cfg.latent_dim,
                         None if cfg.conditioning == "auto" else cfg.conditioning == "cbn")

    def calibrate(self, state: QuantState) -> None:
        """The generator (or the control's fixed images) and the trainer; the warm-up epochs (generator only);
        then the protocol's range rule on ``calib_images`` samples. ``quantizer=reference``: EMA activation
        quantizers installed first, updated on every warm-up batch, then frozen."""
        cfg, ctx = self.cfg, state.ctx
        device = ctx.example_input.device
        with torch.no_grad():
            num_classes = state.teacher(ctx.example_input).shape[1]
        gen = images = None
        if cfg.samples == "generator":
            with torch.random.fork_rng(devices=[]):  # generator init from the run seed, global RNG untouched
                torch.manual_seed(ctx.seed)
                gen = self.make_generator(state, num_classes).to(device)
            state.info["generator"] = {"conditioning": "cbn" if gen.conditional else "multiply",
                                       "num_classes": num_classes, "first_map": [gen.h0, gen.w0]}
        else:
            calib = ctx.calib(state) if callable(ctx.calib) else ctx.calib
            if not calib:
                raise ValueError(f"method.samples={cfg.samples!r} needs calibration batches (data={cfg.samples})")
            images = torch.cat([b.to(device) for b in calib])
            state.info["n_fixed_images"] = len(images)
        ema = self._install_ema(state) if cfg.quantizer == "reference" and ctx.abits is not None else []
        trainer = ZeroShotTrainer(state.teacher, state.model, gen, cfg, self, ctx.seed, device, ctx.progress,
                                  images=images, observe_student=bool(ema))
        state.scratch["trainer"] = trainer
        t0 = time.perf_counter()
        try:
            if gen is not None or ema:  # fixed images and static ranges: nothing to warm up
                for e in range(min(cfg.warmup_epochs, cfg.epochs)):
                    means = trainer.epoch(e, train_student=False,
                                          desc=f"{self.name} warm-up {e + 1}/{cfg.warmup_epochs}")
                    log.info("%s warm-up epoch %d: generator %s (BNS %s)", self.name, e + 1,
                             means["loss_generator"], means["loss_bns"])
            state.info["t_warmup_s"] = time.perf_counter() - t0
            if ctx.abits is None:
                super().calibrate(state)
                return
            if ema:
                if any(q.n_updates == 0 for q in ema):  # no warm-up: one pass of calib_images samples
                    with torch.no_grad():
                        for x in trainer.samples(cfg.calib_images):
                            state.model(x)
                for q in ema:
                    q.freeze()
                state.info["act_range"] = "ema_inflated" if cfg.range_inflation else "ema"
                state.info["a_granularity"] = ema[0].granularity
                state.info["n_act_quant"], state.info["n_act_bn_rule"] = len(ema), 0
                return
            state.ctx.calib = trainer.samples(cfg.calib_images)  # the batches the range rule sees
            state._batches = None
            super().calibrate(state)
        except BaseException:
            trainer.close()
            raise

    def _install_ema(self, state: QuantState) -> list[EmaActQuant]:
        """The reference's activation quantizers at the protocol's sites (``protocol.a_placement``: every planned
        layer's input, or after every ReLU/ReLU6 as the reference)."""
        cfg, granularity = self.cfg, self.activation_granularity(state.protocol)
        return install_act_quants(state.model, state.plans, a_placement(state.protocol), lambda bits: EmaActQuant(
            bits, cfg.ema_momentum, cfg.range_inflation, granularity))

    def train(self, state: QuantState) -> None:
        """The alternating epochs after the warm-up, the accuracy curve, then the weights on their grid."""
        cfg, ctx, trainer = self.cfg, state.ctx, state.scratch["trainer"]
        device = ctx.example_input.device
        curve, epochs, n_eval = [], [], None

        def monitor(epoch: int) -> None:
            nonlocal n_eval
            if ctx.eval_data is None:
                return
            top1, n_eval = top1_subset(state.model, ctx.eval_data, cfg.eval_images, device)
            if top1 is not None:
                curve.append(top1)
                epochs.append(epoch)

        start = min(cfg.warmup_epochs, cfg.epochs)
        t0 = time.perf_counter()
        try:
            monitor(start)
            for e in range(start, cfg.epochs if cfg.finetune else start):
                means = trainer.epoch(e, train_student=True, desc=f"{self.name} epoch {e + 1}/{cfg.epochs}")
                monitor(e + 1)
                log.info("%s epoch %d: generator %s (BNS %s), student %.4g%s", self.name, e + 1,
                         means["loss_generator"], means["loss_bns"], means["loss_student"],
                         f", top-1 {curve[-1]:.2f} on {n_eval}" if curve else "")
        finally:
            trainer.close()
        state.info["t_student_s"] = time.perf_counter() - t0
        for name, ql in quant_layers(state.model).items():  # the trained weights written on their grid
            if parametrize.is_parametrized(ql.layer, "weight"):
                pz = ql.layer.parametrizations.weight[0]
                if isinstance(pz, MinMaxSteWeight):  # the grid of the final float weights, kept in the layer
                    grid = pz.grid(ql.layer.parametrizations.weight.original)
                    ql.w_scale.copy_(grid.scale)
                    ql.w_zero_point.copy_(grid.zero_point)
                    state.grids[name] = grid
                parametrize.remove_parametrizations(ql.layer, "weight", leave_parametrized=True)
        for p in state.model.parameters():
            p.requires_grad_(False)
        best = max(range(len(curve)), key=curve.__getitem__) if curve else None
        state.info.update({
            "n_epochs": cfg.epochs,
            "n_student_steps": max(cfg.epochs - start, 0) * cfg.iters_per_epoch if cfg.finetune else 0,
            **trainer.history,
            "top1_curve": curve, "top1_curve_epochs": epochs, "curve_n_eval": n_eval,
            "top1_best_epoch": curve[best] if curve else None, "best_epoch": epochs[best] if curve else None,
        })
        state.model = state.model.eval()
