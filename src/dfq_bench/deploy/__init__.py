"""Deploy: the quantized model as an integer ONNX graph (``export.py``: one emitter per op in
``_GraphBuilder.EMITTERS``), run by ONNX Runtime and checked against the fake-quant simulation with
the runner's evaluation loop, plus the latency timing (``check.py``). ``deploy=onnxruntime`` in a run.
"""

from dfq_bench.deploy.check import deployed_check, median_ms, op_counts, run_session, session, with_int32_biases
from dfq_bench.deploy.export import (
    FLOAT_COMPUTE_OPS,
    INTEGER_OPS,
    Exported,
    ExportError,
    export,
    read_weight_levels,
)

__all__ = ["FLOAT_COMPUTE_OPS", "INTEGER_OPS", "ExportError", "Exported", "deployed_check", "export", "median_ms",
           "op_counts", "read_weight_levels", "run_session", "session", "with_int32_biases"]
