"""Benchmark of the synthetic-data methods' ``cpu`` presets on resnet20_fmnist (Fashion-MNIST, the
full 10k test set), each run in a subprocess as a user would run it, with the data cache off so that
generation is timed:

- ZeroQ: ``method=zeroq data=zeroq_cpu``; target: data generation (t_synth_s) <= 60 s.
- GENIE: ``method=genie_cpu`` (GENIE-D data ``genie_cpu`` + GENIE-M reconstruction); target: the
  whole run (wall time of the command) <= 600 s.

Prints every run's wall time and its row's timings, then per method the medians and their ratio to
the target (< 1 meets it). Each run uses a fresh scratch directory (no row skipped as done, no FP32
evaluation cache). The machine's load is printed too: other processes share the cores.

Usage::

    python scripts/bench_synth.py [--repeats N] [--genie-repeats N] [--model NAME] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench_default import run_once  # scripts/ is on sys.path when this file runs as a script

ZEROQ_DATA_TARGET_S, GENIE_RUN_TARGET_S = 60.0, 600.0


def bench(label: str, overrides: list[str], repeats: int) -> list[tuple[float, dict]]:
    print(f"\n{label}: python -m dfq_bench {' '.join(overrides)}")
    print(f"{'run':>4s} {'wall_s':>8s} {'synth_s':>8s} {'quant_s':>8s} {'eval_s':>7s} {'top1':>7s} "
          f"{'top1_fp32':>9s} {'load1':>6s}")
    out = []
    for i in range(repeats):
        wall, row = run_once(overrides)
        load = os.getloadavg()[0]
        print(f"{i + 1:>4d} {wall:8.1f} {row['t_synth_s']:8.1f} {row['t_quant_s']:8.1f} {row['t_eval_s']:7.1f} "
              f"{row['top1']:7.2f} {row['top1_fp32']:9.2f} {load:6.2f}")
        out.append((wall, row))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of the ZeroQ command")
    p.add_argument("--genie-repeats", type=int, default=1, help="runs of the GENIE command (minutes each)")
    p.add_argument("--model", default="resnet20_fmnist")
    p.add_argument("overrides", nargs="*", help="Hydra overrides appended to both commands")
    args = p.parse_args()
    for flag, n in (("--repeats", args.repeats), ("--genie-repeats", args.genie_repeats)):
        if n <= 0:
            p.error(f"{flag} {n} is invalid; valid: a positive integer")
    common = [f"model={args.model}", "dataset=fashion_mnist", "wbits=4", "abits=4", "data.cache=false",
              "skip_done=false", *args.overrides]
    print(f"cores: {os.cpu_count()}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}  "
          f"load average at start: {os.getloadavg()[0]:.2f}")
    zq = bench("ZeroQ cpu preset", ["method=zeroq", "data=zeroq_cpu", *common], args.repeats)
    ge = bench("GENIE cpu preset", ["method=genie_cpu", *common], args.genie_repeats)

    zq_synth = statistics.median(r["t_synth_s"] for _, r in zq)
    zq_wall = statistics.median(w for w, _ in zq)
    ge_synth = statistics.median(r["t_synth_s"] for _, r in ge)
    ge_quant = statistics.median(r["t_quant_s"] for _, r in ge)
    ge_wall = statistics.median(w for w, _ in ge)
    print("\nmedians")
    print(f"  ZeroQ data (t_synth_s)      {zq_synth:8.1f} s   target {ZEROQ_DATA_TARGET_S:.0f} s   "
          f"ratio {zq_synth / ZEROQ_DATA_TARGET_S:.2f}   (whole run {zq_wall:.1f} s)")
    print(f"  GENIE whole run (wall)      {ge_wall:8.1f} s   target {GENIE_RUN_TARGET_S:.0f} s   "
          f"ratio {ge_wall / GENIE_RUN_TARGET_S:.2f}   (GENIE-D data {ge_synth:.1f} s, GENIE-M {ge_quant:.1f} s)")
    print(f"  GENIE-D data / ZeroQ data   {ge_synth / zq_synth:8.2f}")


if __name__ == "__main__":
    main()
