"""GranQ: AdaDFQ's zero-shot QAT with dynamic per-sample, per-channel activation ranges.

Paper: Hong et al., "GranQ: Granular Zero-Shot Quantization with Channel-Wise Activation Scaling in QAT",
arXiv 2025 (2503.18339). Reference code: github.com/Inpyo-Hong/GranQ (no licence file; built on AdaDFQ's
and GDFQ's code, whose quantizer files carry ZeroQ's GPL-3.0 header): reimplemented from
../shared/docs/methods.md ("The generator-based zero-shot QAT family"), no code taken from it.

The trainer, the generator and every loss are AdaDFQ's, unchanged (methods/adadfq.py: margin loss on the
normalised entropy of softmax(t - q), the disagreement / agreement CE terms with the student not detached,
the entropy student loss; GDFQ's generator, BNS, loop, optimizers and schedule; the same keys and
defaults, batch 16). What differs is the activation quantizer: GranQ's released quantizer ignores its EMA
ranges and, for every 4-D activation, takes the min/max over H x W of each (sample, channel) slice at every
call, at test time too. That is ``a_granularity: dynamic`` (the default; ``core.modules.ActQuant``,
protocol.a_granularity's ``dynamic``): the row's ``a_granularity`` says which was used. Such ranges are not
comparable with static ones (the evaluated model computes a range per test image and channel), so
``method.a_granularity=protocol`` runs the same trainer with the protocol's static ranges (per_tensor by
default, or protocol.a_granularity=per_channel): the difference between the two rows is what the dynamic
ranges give. ``deploy=`` is refused with dynamic ranges (no fixed integer scale exists).

Deviations and choices, besides AdaDFQ's and GDFQ's (methods/adadfq.py, methods/gdfq.py):
- Inputs that are not 4-D (a Linear's, after pooling) keep the static per-tensor range calibrated after
  the warm-up; methods.md describes the dynamic rule for 4-D activations only.
- The dynamic range is not differentiated: the gradient through the quantizer is straight-through
  (identity), as the static quantizers' inside their range.
- Weights: the protocol's grid (per output channel by default, fixed before training). The reference's
  same min/max function gives conv weights one range per (out, in) kernel, recomputed at every forward.
- ``method.a_granularity=dynamic`` with protocol.a_granularity=per_channel is refused (two different
  activation quantizers asked for); with protocol.a_granularity=dynamic it is the same run as the default.
- ``method.quantizer=reference`` (methods/gdfq.py): the reference's per-output-channel min/max weights (not
  GranQ's per-(out, in) kernel ranges) and, with ``a_granularity=dynamic``, dynamic ranges for 4-D inputs and
  the frozen EMA range for the others; controls ``samples``/``finetune`` as gdfq's.
"""

from __future__ import annotations

from dataclasses import dataclass

from dfq_bench.methods.adadfq import AdaDFQ

from dfq_bench.config import ConfigError

GRANQ_GRANULARITY = ("dynamic", "protocol")


class GranQ(AdaDFQ):
    name = "granq"
    version = "1"

    @dataclass
    class Config(AdaDFQ.Config):
        a_granularity: str = "dynamic"  # dynamic: GranQ's per-(sample, channel) ranges | protocol: the protocol's

    @staticmethod
    def check_config(c) -> None:
        AdaDFQ.check_config(c)
        if c.a_granularity not in GRANQ_GRANULARITY:
            raise ConfigError(f"method.a_granularity={c.a_granularity!r} is invalid; valid: "
                              f"{', '.join(GRANQ_GRANULARITY)}")

    def activation_granularity(self, protocol) -> str:
        """``dynamic`` (GranQ's quantizer) unless ``method.a_granularity=protocol``: the protocol's."""
        own = super().activation_granularity(protocol)
        if self.cfg.a_granularity == "protocol":
            return own
        if own == "per_channel":
            raise ConfigError("method.a_granularity='dynamic' conflicts with protocol.a_granularity='per_channel'; "
                              "valid: method.a_granularity=protocol (the protocol's static ranges), or "
                              "protocol.a_granularity=per_tensor")
        return "dynamic"
