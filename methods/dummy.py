"""Dummy method: returns an unchanged copy of the float model.

Not a quantizer: a control that checks the harness itself (the quantized-model accuracy must equal
the FP32 accuracy, agreement 100%, KL 0). No paper, no reference code. Deviations: none.
"""

import copy

from torch import nn

from dfq_bench.core.method import Method, QuantContext


class Dummy(Method):
    name = "dummy"
    version = "1"
    mp_refusal = "it quantizes nothing (no plan)"

    def wants_data(self, ctx: QuantContext) -> bool:
        return False

    def quantize(self, model: nn.Module, ctx: QuantContext) -> nn.Module:
        return copy.deepcopy(model).eval()
