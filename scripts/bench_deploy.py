"""Latency of the integer model under ONNX Runtime against FP32 (torch and ORT), on the embedded zoo.

    python scripts/bench_deploy.py [--models resnet20_fmnist mobilenetv2_fmnist] [--batches 1 256]
                                   [--bits 8 4] [--rounds 30]

Each model is quantized with RTN (protocol `common`, calibrated on 256 Fashion-MNIST test images)
and exported with dfq_bench.deploy; the FP32 model is exported by the same code. Per batch size, every
variant runs once per round, the variants interleaved so that a load change on the machine hits
them alike, after 3 warm-up runs; the table gives the median over the rounds and the ratio to
FP32 ORT. Variants:
  fp32-torch   the float model in torch (eval, inference_mode)
  fp32-ort     the float model in ORT (all graph optimizations)
  int-ort      the deployed integer graph as the row measures it (QLinearConv where the simulation
               requantizes, ConvInteger + rescale elsewhere, QGemm)
  int-qdq      the same quantizers, but convs the simulation does not requantize left to ORT as
               QDQ Conv (ORT runs them in float): conv_integer=False
  int-sym      int-ort with symmetric weights (protocol w_symmetric=true: weight zero-point 0)
Threads: torch and ORT each use their default (all cores: 2 here). Uses the committed zoo weights
when present, else a random initialisation (latency does not depend on the values).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import dfq_bench.catalog  # noqa: F401  (fills the registries)
from dfq_bench import deploy
from dfq_bench.config import CONF_DIR, register_configs
from dfq_bench.core.method import QuantContext
from dfq_bench.models.fmnist import read_manifest
from dfq_bench.registry import DATASETS, METHODS
from dfq_bench.run.runner import build_model


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def variants(name: str, bits: int, workdir: Path):
    have = name in read_manifest().get("models", {})
    cfg = _compose([f"model={name}", "dataset=fashion_mnist", "dataset.limit=256", "dataset.batch_size=256",
                    f"wbits={bits}", f"abits={bits}", *([] if have else ["model.weights=null"])])
    built = build_model(cfg)
    model = built.model.eval()
    calib = next(iter(DATASETS.get("fashion_mnist")(cfg.dataset, built).loader))[0]
    example = calib[:2]
    runs = {"fp32-torch": model}
    deploy.export(model, example, workdir / f"{name}_fp32.onnx")
    runs["fp32-ort"] = deploy.session(workdir / f"{name}_fp32.onnx")
    for label, sym, conv_integer in (("int-ort", False, True), ("int-qdq", False, False), ("int-sym", True, True)):
        cfg.protocol.w_symmetric = sym
        ctx = QuantContext(bits, bits, cfg.protocol, 0, "cpu", example, calib=[calib])
        qmodel = METHODS.get("rtn")(None).quantize(model, ctx)
        path = workdir / f"{name}_w{bits}_{label}.onnx"
        deploy.export(qmodel, example, path, conv_integer=conv_integer)
        runs[label] = deploy.session(path, workdir / f"{path.stem}.opt.onnx")
    ops = deploy.op_counts(workdir / f"{name}_w{bits}_int-ort.opt.onnx")
    int_ops = {k: v for k, v in sorted(ops.items()) if k in deploy.INTEGER_OPS}
    return runs, calib, int_ops, "zoo" if have else "random-init"


def call(runner, x):
    if isinstance(runner, torch.nn.Module):
        with torch.inference_mode():
            return runner(x)
    return deploy.run_session(runner, x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20_fmnist", "mobilenetv2_fmnist"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        for name in args.models:
            for bits in args.bits:
                runs, data, int_ops, weights = variants(name, bits, Path(tmp))
                print(f"\n{name} W{bits}A{bits} ({weights}); integer ops in int-ort: {int_ops}")
                print(f"{'batch':>6s}  " + "  ".join(f"{k:>12s}" for k in runs) + "   int-ort/fp32-ort")
                for batch in args.batches:
                    x = data[:batch]
                    for r in runs.values():
                        for _ in range(3):
                            call(r, x)
                    times = {k: [] for k in runs}
                    for _ in range(args.rounds):
                        for k, r in runs.items():
                            t0 = time.perf_counter()
                            call(r, x)
                            times[k].append(1000.0 * (time.perf_counter() - t0))
                    med = {k: statistics.median(v) for k, v in times.items()}
                    cells = "  ".join(f"{med[k]:10.2f}ms" for k in runs)
                    print(f"{batch:6d}  {cells}   {med['int-ort'] / med['fp32-ort']:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
