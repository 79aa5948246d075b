"""Running the exported model: ONNX Runtime sessions, the deployed-integer check next to the fake-quant
simulation (through the runner's evaluation loop), and the latency timing. The export is ``export.py``.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfq_bench.core.modules import QuantLayer
from dfq_bench.deploy.export import (
    FLOAT_COMPUTE_OPS,
    INTEGER_OPS,
    _GraphBuilder,
    _int32_bias,
    _product_scale,
    _require_onnx,
    _require_ort,
    act_params,
    export,
    weight_params,
)


def session(path: str | Path, optimized_path: str | Path | None = None, threads: int = 0):
    """An ORT CPU session with every graph optimization on (QDQ fusion); ``optimized_path`` keeps
    the optimized graph that actually runs. ORT's worker threads do not spin between runs: spinning
    threads would steal the cores from torch when the two are timed one after the other."""
    ort = _require_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def op_counts(path: str | Path) -> dict[str, int]:
    onnx = _require_onnx()
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def run_session(sess, x: torch.Tensor) -> torch.Tensor:
    name = sess.get_inputs()[0].name
    return torch.from_numpy(sess.run(None, {name: x.detach().cpu().float().numpy()})[0])


def median_ms(fn, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def with_int32_biases(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` whose biases are rounded as the export rounds them (int32 at s_x * s_w[c],
    for every layer with integer weights and a quantized input): the simulation of what the device
    adds. Comparing the integer model with it isolates the bias rounding from everything else."""
    sim = copy.deepcopy(qmodel)
    for m in sim.modules():
        if isinstance(m, QuantLayer) and _GraphBuilder._integer_layer(m) and m.layer.bias is not None:
            b = m.layer.bias.detach().cpu().numpy().astype(np.float64)
            scale = _product_scale(act_params("", m.act_quant), weight_params("", m)[1])
            q = _int32_bias("", b, scale, len(b)) * np.broadcast_to(scale.astype(np.float64), b.shape)
            m.layer.bias.data.copy_(torch.from_numpy(q.astype(np.float32)))
    return sim


@torch.inference_mode()
def deployed_check(fp_model: nn.Module, qmodel: nn.Module, loader, example_input: torch.Tensor,
                   out_dir: str | Path | None = None, repeats: int = 7, lat_batch: int = 64) -> dict:
    """Exports ``qmodel`` (and ``fp_model``), runs the integer model with ORT over ``loader`` next
    to the fake-quant model, and times FP32 torch / FP32 ORT / integer ORT on the first
    ``lat_batch`` images of the first batch (median of ``repeats`` runs after 2 warm-up runs), ORT and
    torch with the same number of threads (``lat_threads``). The latencies are only as good as the
    machine is quiet: torch's OpenMP threads wait on each other, so with more busy threads than cores a
    2-thread torch forward can take 10-50x longer (the FP32-torch column of results/deploy.md's first
    version, made under load average ~7); quote scripts/bench_deploy.py for latency.

    Returns the row fields: top1_int, agree_int (percent of images where the integer model's top-1
    equals the fake-quant model's), max_logit_diff (integer vs fake-quant, over all images),
    top1_sim_int32_bias and agree_int_sim_int32_bias (the fake-quant model with its biases rounded to
    int32 as exported, ``with_int32_biases``: its top-1 and its agreement with the integer model),
    n_int_ops (integer operators in ORT's optimized graph), the export counts, and latencies.
    """
    from dfq_bench.run.runner import evaluate  # the runner's evaluation loop (imported here: it loads the registries)

    t_start, keep = time.perf_counter(), out_dir is not None
    with contextlib.nullcontext(out_dir) if keep else tempfile.TemporaryDirectory(prefix="dfq_deploy_") as d:
        out_dir = Path(d)
        qmodel, fp_model = qmodel.cpu().eval(), fp_model.cpu().eval()
        exp = export(qmodel, example_input, out_dir / "model_int.onnx")
        export(fp_model, example_input, out_dir / "model_fp32.onnx")
        opt = out_dir / "model_int.optimized.onnx"
        threads = torch.get_num_threads()  # ORT gets torch's thread count: the latencies compare like with like
        s_int = session(exp.path, opt, threads)
        s_fp = session(out_dir / "model_fp32.onnx", threads=threads)
        ops = op_counts(opt)
        sim32, seen = with_int32_biases(qmodel), {"agree": 0, "max_diff": 0.0, "first": None}

        def int_model(x: torch.Tensor) -> torch.Tensor:  # ORT, compared with the fake-quant model on the way
            logits_i, logits_q = run_session(s_int, x), qmodel(x).float()
            seen["first"] = x[:lat_batch] if seen["first"] is None else seen["first"]
            seen["agree"] += int((logits_i.argmax(1) == logits_q.argmax(1)).sum())
            seen["max_diff"] = max(seen["max_diff"], float((logits_i - logits_q).abs().max()))
            return logits_i

        # the runner's loop, the int32-bias simulation on its reference ("FP32") side: top1_fp32, agree_fp32
        ev = evaluate(sim32, int_model, loader, "cpu", lambda batches, **_: batches)
        first = seen["first"]
        lat = {
            "lat_fp32_torch_ms": median_ms(lambda: fp_model(first), repeats),
            "lat_fp32_ort_ms": median_ms(lambda: run_session(s_fp, first), repeats),
            "lat_int_ort_ms": median_ms(lambda: run_session(s_int, first), repeats),
        }
        return {
            "deploy": "onnxruntime",
            "top1_int": ev["top1"], "agree_int": 100.0 * seen["agree"] / ev["n_eval"],
            "max_logit_diff": seen["max_diff"],
            # the simulation with int32-rounded biases: where integer and fake-quant part because of them
            "top1_sim_int32_bias": ev["top1_fp32"], "agree_int_sim_int32_bias": ev["agree_fp32"],
            "n_int_ops": sum(ops.get(k, 0) for k in INTEGER_OPS),
            "n_float_compute_ops": sum(ops.get(k, 0) for k in FLOAT_COMPUTE_OPS),
            "int_ops": {k: v for k, v in sorted(ops.items()) if k in INTEGER_OPS},
            "deploy_layers": {"quantized": exp.n_quant_layers, "requantized": exp.n_requantized,
                              "conv_integer": exp.n_conv_integer, "float": exp.n_float_layers},
            **lat, "lat_batch": len(first), "lat_threads": threads,
            "speedup_int_vs_fp32_ort": lat["lat_fp32_ort_ms"] / lat["lat_int_ort_ms"],
            "t_deploy_s": time.perf_counter() - t_start,
            "deploy_dir": str(out_dir) if keep else None,
        }
