"""Round-to-nearest (RTN): the baseline every data-free method must beat.

Paper: none; this is the standard uniform affine quantizer (see e.g. Krishnamoorthi, "Quantizing deep
convolutional networks for efficient inference", 2018). Reference code: none to follow; it equals
SQuant with both flip stages off ("SQuant-E"). Licence: ours.

Weights: the protocol's grid (per-channel asymmetric min/max by default), plain rounding (ties to
even). Activations: the protocol's range rule, min/max over the calibration batches by default.
Deviations: none.
"""

from dfq_bench.core.method import Method


class RTN(Method):
    name = "rtn"
    version = "1"
    default_act_range = "minmax"
