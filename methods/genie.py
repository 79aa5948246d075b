"""GENIE-M: block-wise reconstruction with learned rounding, weight and activation step sizes.

Paper: Jeon et al., "Genie: Show Me the Data for Quantization", CVPR 2023 (GENIE-M; builds on
BRECQ, AdaRound, LSQ and QDrop). Reference code: github.com/SamsungLabs/Genie (Apache-2.0);
reimplemented from the paper and shared/docs/methods.md. The data come from ``data=`` (``method=genie``
selects ``data=genie``, GENIE-D, through conf/method/genie.yaml; ``data=noise|real|zeroq`` are the
controls).

Per block, in execution order (BRECQ blocks: modules whose class is in ``blocks``, e.g. ResNet
BasicBlock/Bottleneck, MobileNetV2 InvertedResidual; every quantized layer outside such a block is a
block of its own):
1. Weights: per output channel, grid chosen by the |w - Q(w)|^2.4 search over shrunk min/max ranges;
   AdaRound soft bits (rectified sigmoid, zeta 1.1, gamma -0.1) on the fixed base floor(w / s0),
   and a learned per-channel step size s (GENIE-M). Activations: per-tensor quantizer at every
   quantized layer's input, grid from the same |x - Q(x)|^2.4 search on the first ``init_samples``
   block inputs, learned step size (LSQ, no gradient scaling, as the reference).
2. ``steps`` Adam steps on random batches of ``batch_size``: loss = sum over channels of the squared
   error to the FP32 block output (averaged over the rest) + ``round_weight`` * AdaRound's
   regulariser (beta annealed 20 -> 2 after a ``warmup`` fraction). QDrop: the block input is the
   quantized model's input or the FP32 one, per element with probability 0.5, and each activation
   quantizer keeps each element in float with probability ``drop_p``. Learning rates as the
   reference: soft bits 1e-3, weight steps 1e-4, activation steps 4e-5 (both cosine-annealed).
3. Hard rounding (soft bit >= 0.5 -> round up); the layer's weight becomes
   ``Grid(s, zero_point).dequant(levels)`` exactly, its ``QuantLayer`` holds s and the zero-point,
   and the activation quantizers are frozen into ``core.modules.ActQuant``.
The FP32 targets come from the float model (BN folded like the quantized one when the protocol folds).

Deviations and choices: bits per layer follow the run's protocol (common: first and last weights
8-bit and last input 8-bit, as the reference; the reference also keeps the *second* layer's input at
8 bits: ``second_abits: 8`` does that, off by default so tables share one protocol); activation
grids follow the protocol's ``a_symmetric`` (the reference is symmetric; both give zero-point 0 for
post-ReLU inputs); activation step sizes are initialised once on ``init_samples`` images in eval
mode (the reference initialises on its first 32-image batch in training mode); the reference's
shared quantizer between a residual input and its conv is not reproduced; all randomness (batches,
QDrop masks) comes from generators seeded by the run seed. Cost: the ``paper`` preset (20,000 steps
per block) takes hours on a GPU for ResNet-18; ``genie_cpu`` is a small CPU preset, named in the row.
With ``checkpoint_dir`` set, the finished blocks are saved after each one and a rerun of a stopped run
continues after the last of them (dfq_bench/checkpoint.py), with the same result: each block's batches and
masks come from generators seeded by (seed, block index).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from omegaconf import MISSING, OmegaConf
from torch import Tensor
from torch.nn.utils import parametrize

from dfq_bench.checkpoint import Checkpoint, tensor_digest
from dfq_bench.config import ConfigError
from dfq_bench.core.grid import Grid
from dfq_bench.core.learn import LsqActQuant, SoftRoundWeight, weight_grid_lp
from dfq_bench.core.method import Method, QuantState, copy_frozen
from dfq_bench.core.modules import QuantLayer, _set_submodule, quant_layers
from dfq_bench.core.planner import LayerPlan
from dfq_bench.run.evalcache import weights_sha256
from dfq_bench.train.blocks import capture, finalize_block, find_blocks, reconstruct_block

log = logging.getLogger(__name__)
BLOCK_TYPES = ["BasicBlock", "Bottleneck", "ResBottleneckBlock", "InvertedResidual", "DwsConvBlock", "ConvBlock"]


class Genie(Method):
    name = "genie"
    version = "1"
    needs_data = True  # reconstruction needs batches even for weight-only runs
    w_ranges = ("include_zero",)  # its weight range is the Lp search's (protocol.w_range=minmax is refused)
    a_granularities = ("per_tensor",)  # its LSQ activation quantizers learn one step size per tensor
    a_placements = ("layer_input",)  # its LSQ activation quantizers sit at the input of each reconstructed layer

    @dataclass
    class Config:
        name: str = MISSING
        preset: str = "paper"  # paper | cpu: recorded in the row
        steps: int = 20000  # per block
        batch_size: int = 32
        lr_round: float = 1e-3
        lr_w_scale: float = 1e-4
        lr_a_scale: float = 4e-5
        round_weight: float = 1.0
        beta_start: float = 20.0
        beta_end: float = 2.0
        warmup: float = 0.2
        drop_p: float = 0.5  # QDrop probability of keeping an activation element in float
        p_norm: float = 2.4  # exponent of the |x - Q(x)|^p scale search
        init_samples: int = 256  # block inputs used to initialise activation step sizes
        second_abits: int | None = None  # 8: the reference's 8-bit input of the second layer
        blocks: list[str] = field(default_factory=lambda: list(BLOCK_TYPES))

    @staticmethod
    def check_config(c) -> None:
        """Values the types cannot express; one-line ``ConfigError`` (checked before any model is built)."""
        for key, ok, valid in (("steps", c.steps >= 0, "an integer >= 0"),
                               ("batch_size", c.batch_size >= 1, "an integer >= 1"),
                               ("drop_p", 0.0 <= c.drop_p <= 1.0, "a probability in [0, 1]"),
                               ("init_samples", c.init_samples >= 1, "an integer >= 1"),
                               ("warmup", 0.0 <= c.warmup <= 1.0, "a fraction in [0, 1]"),
                               ("p_norm", c.p_norm > 0, "a number > 0")):
            if not ok:
                raise ConfigError(f"method.{key}={getattr(c, key)!r} is invalid; valid: {valid}")

    def prepare(self, state: QuantState) -> None:
        """Checks the keys and the data, then keeps the prepared float model as the teacher whose
        block outputs are the targets; the student is a frozen copy of it."""
        if not state.ctx.calib:
            raise ValueError("genie needs calibration batches (data=genie|zeroq|noise|real)")
        super().prepare(state)
        state.teacher, state.model = state.model, copy_frozen(state.model)

    def plan(self, state: QuantState) -> None:
        super().plan(state)
        plans = state.plans
        if self.cfg.second_abits is not None and len(plans) > 1 and plans[1].a_bits is not None:
            plans[1].a_bits = self.cfg.second_abits

    def weight_grid(self, w: Tensor, plan: LayerPlan, state: QuantState) -> Grid:
        """The |w - Q(w)|^p search over shrunk min/max ranges (BRECQ/GENIE's initialisation)."""
        proto = state.protocol
        return weight_grid_lp(w, plan.w_bits, proto.w_granularity == "per_channel", proto.w_symmetric,
                              self.cfg.p_norm)

    def round(self, state: QuantState) -> None:
        """No fixed rounding: the levels are learned (AdaRound soft bits, see ``weights``)."""

    def weights(self, state: QuantState) -> None:
        """AdaRound soft bits with a learned step size on each planned layer's weight."""
        for p in state.plans:
            grid = state.grids.get(p.name)
            if grid is not None:
                parametrize.register_parametrization(p.module, "weight", SoftRoundWeight(p.module.weight, grid))
            _set_submodule(state.model, p.name, QuantLayer(p.module, None, grid, p.w_bits))

    def calibrate(self, state: QuantState) -> None:
        """LSQ activation quantizers; their step sizes are set on each block's inputs in ``train``."""
        cfg, proto, layers = self.cfg, state.protocol, quant_layers(state.model)
        for p in state.plans:
            if p.a_bits is not None:
                layers[p.name].act_quant = LsqActQuant(p.a_bits, proto.a_symmetric, cfg.drop_p,
                                                       cfg.p_norm).to(p.module.weight.device)
        state.info["act_range"] = "lsq" if state.ctx.abits is not None else None

    def train(self, state: QuantState) -> None:
        """Block reconstruction, block by block in execution order, then hard rounding; with ``ctx.checkpoint``,
        the finished blocks are saved after each one and a saved run continues after its last."""
        cfg, ctx, teacher, qmodel = self.cfg, state.ctx, state.teacher, state.model
        x = torch.cat(list(state.batches())).to(ctx.example_input.device)
        blocks = find_blocks(qmodel, list(cfg.blocks), [p.name for p in state.plans])
        names = [name for name, _ in blocks]
        ckpt = Checkpoint(ctx.checkpoint, {  # everything the blocks' results depend on (hashed only when used)
            "method": self.name, "config": _plain(self.cfg), "protocol": _plain(ctx.protocol), "seed": ctx.seed,
            "bits": [(p.name, p.w_bits, p.a_bits) for p in state.plans], "weights": weights_sha256(state.float_model),
            "blocks": names, "data": tensor_digest(x)} if ctx.checkpoint else {})
        saved, done, report, t_before = ckpt.load(x.device), 0, [], 0.0
        if saved is not None:  # a stopped run of this run_id: its finished blocks, as they were
            for name, module in saved["modules"].items():
                _set_submodule(qmodel, name, module)
            done, report, t_before = saved["done"], saved["report"], saved["t_s"]
            blocks = [(name, qmodel.get_submodule(name)) for name in names]
            state.info["resumed"] = {"units_done": done, "n_units": len(names), "t_before_s": t_before}
            log.info("genie: resuming after block %d of %d (%s)", done, len(names), ckpt.path)
        t0 = time.perf_counter()
        for i, (name, block) in enumerate(ctx.progress(blocks, desc="genie blocks")):
            if i < done:
                continue
            x_fp, y = capture(teacher, teacher.get_submodule(name), x, 256, output=True)
            x_q, _ = capture(qmodel, block, x, 256, output=False)
            losses = reconstruct_block(block, x_fp, x_q, y, cfg, ctx.seed + i)
            finalize_block(block)
            report.append({"block": name, "n_layers": sum(isinstance(m, QuantLayer) for m in block.modules()),
                           **losses})
            log.info("genie block %s: loss %.4g -> %.4g", name, losses["loss_init"], losses["loss_final"])
            ckpt.save(modules={n: qmodel.get_submodule(n) for n in names[: i + 1]}, done=i + 1, report=report,
                      t_s=t_before + time.perf_counter() - t0)
        state.info["n_blocks"] = len(blocks)
        state.info["recon_blocks"] = report
        state.info["n_act_quant"] = sum(ql.act_quant is not None for ql in quant_layers(qmodel).values())
        state.model = qmodel.eval()


def _plain(node):
    """A config node as plain JSON-able values, for the checkpoint's fingerprint."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
