"""Benchmark of the default command, ``python -m dfq_bench`` (SQuant W4A4 on resnet20_fmnist, the full
10k Fashion-MNIST test set), run in a subprocess as a user would.

Prints, over ``--repeats`` runs (default 3), each run's wall time and its result row's timings, then
the median wall time (target <= 60 s on the 2-core reference machine) and the median of
``t_eval_s / t_eval_fp32_s``: the quantized model's evaluation time over the FP32 model's, both
measured batch by batch in the same run (target <= 1.3). Each run uses a fresh scratch directory, so
no row is skipped as already done and no FP32 evaluation cache is used.

Usage::

    python scripts/bench_default.py [--repeats N] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WALL_TARGET_S, RATIO_TARGET = 60.0, 1.3


def run_once(overrides: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory(prefix="dfq_bench_default_") as tmp:
        env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dfq_bench", *overrides], cwd=tmp, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            sys.exit(f"error: `python -m dfq_bench {' '.join(overrides)}` exited {proc.returncode}: {tail}")
        rows = [json.loads(line) for line in (Path(tmp) / "results" / "runs.jsonl").read_text().splitlines()]
    return wall, rows[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="Hydra overrides appended to the default command")
    args = p.parse_args()
    if args.repeats <= 0:
        p.error(f"--repeats {args.repeats} is invalid; valid: a positive integer")
    walls, ratios = [], []
    print(f"command: python -m dfq_bench {' '.join(args.overrides)}".rstrip())
    print(f"{'run':>4s} {'wall_s':>8s} {'total_s':>8s} {'quant_s':>8s} {'eval_s':>8s} {'eval_fp32_s':>12s} "
          f"{'ratio':>6s} {'top1':>7s} {'top1_fp32':>9s} {'n_eval':>7s}")
    for i in range(args.repeats):
        wall, row = run_once(args.overrides)
        ratio = row["t_eval_s"] / row["t_eval_fp32_s"]
        walls.append(wall)
        ratios.append(ratio)
        print(f"{i + 1:>4d} {wall:8.2f} {row['t_total_s']:8.2f} {row['t_quant_s']:8.2f} {row['t_eval_s']:8.2f} "
              f"{row['t_eval_fp32_s']:12.2f} {ratio:6.3f} {row['top1']:7.2f} {row['top1_fp32']:9.2f} "
              f"{row['n_eval']:>7d}", flush=True)
    print(f"{row['method']} W{row['wbits']}A{row['abits']} on {row['model']} / {row['dataset']}, "
          f"torch threads: default, cpu: {row.get('device_name')}")
    wall_med, ratio_med = statistics.median(walls), statistics.median(ratios)
    print(f"median wall time   {wall_med:.2f} s   (target <= {WALL_TARGET_S:.0f} s: "
          f"{'met' if wall_med <= WALL_TARGET_S else 'MISSED'})")
    print(f"median eval ratio  {ratio_med:.3f}    (t_eval_s / t_eval_fp32_s, target <= {RATIO_TARGET}: "
          f"{'met' if ratio_med <= RATIO_TARGET else 'MISSED'})")


if __name__ == "__main__":
    main()
