"""ZeroQ: round-to-nearest weights, activation ranges from ZeroQ's distilled data.

Paper: Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020. Reference code:
github.com/amirgholami/ZeroQ (GPL-3.0); nothing is taken from it, see shared/docs/methods.md.

Weights: the protocol's grid (per-channel asymmetric min/max by default), plain rounding.
Activations: per-tensor min/max of every quantized layer input over the calibration batches, then
frozen. The batches are whatever ``data=`` says: ``method=zeroq`` selects ``data=zeroq`` (the
distilled images, conf/data/zeroq.yaml) through the defaults list of conf/method/zeroq.yaml, and
``data=zeroq_cpu``, ``data=noise`` or ``data=real`` replace them (the controls). ``method=rtn
data=zeroq`` computes the same model; this entry exists so rows carry the method's name.

Deviations from the reference: the released code quantizes at 8 bits with BN unfolded and its
activation quantizers after every ReLU (FC input float); here the run's protocol decides BN folding,
first/last-layer bits and where activation quantizers sit (Conv/Linear inputs by default;
``protocol.a_placement=after_relu protocol.last_abits=null`` for the reference's after every ReLU), as for
every other method in a comparison table. The paper's mixed-precision Pareto search was never released; it is
implemented for every method as a planner (core/mixed.py: ``mp.allocator=dp``, sensitivities on the
run's ``data=``, so ``method=zeroq mp.allocator=dp`` measures them on the distilled images).
"""

from dfq_bench.core.method import Method


class ZeroQ(Method):
    name = "zeroq"
    version = "1"
    default_act_range = "minmax"
