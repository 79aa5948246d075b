"""Sweep overhead per run beyond the run itself (target: <= 1 s), and the cost of skipping a done run.

    python scripts/bench_sweep.py [--jobs 10] [--repeats 3]

Runs a Hydra multirun of ``--jobs`` dummy runs (test_cnn on 32 fake images; basic launcher) in a temp
directory, then the same command again (every job skipped: its run_id has an ok row). Reports, as
medians over ``--repeats`` sweeps:

- per run, amortized: (wall time of the sweep process - sum of the rows' t_total_s) / jobs; this
  includes starting Python, importing torch and composing the sweep, spread over the jobs;
- per run, marginal: from the launcher's log timestamps, (start of job i+1 - start of job i) - t_total_s
  of job i, median over jobs: what one more job costs (Hydra's job setup, config files, run_id, the
  done check, provenance, writing the row);
- skip, marginal: start-to-start time of consecutive jobs in the rerun where every job is skipped;
- the wall time of the whole rerun.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[HYDRA\] \t#(\d+) : ")


def job_starts(log: str) -> list[float]:
    starts = {}
    for line in log.splitlines():
        m = STAMP.match(line)
        if m:
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            starts[int(m.group(2))] = t
    return [starts[i] for i in sorted(starts)]


def sweep(cwd: Path, jobs: int) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "dfq_bench", "-m", "method=dummy", "model=test_cnn", "dataset=fake",
           "dataset.num_samples=32", "dataset.batch_size=32", f"seed=range(0,{jobs})"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, res.stdout + res.stderr


def one_repeat(jobs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        wall, log = sweep(cwd, jobs)
        rows = [json.loads(line) for line in (cwd / "results" / "runs.jsonl").read_text().splitlines()]
        assert len(rows) == jobs and all(r["status"] == "ok" for r in rows)
        t_total = [r["t_total_s"] for r in sorted(rows, key=lambda r: r["seed"])]
        starts = job_starts(log)
        gaps = [b - a - t for a, b, t in zip(starts, starts[1:], t_total, strict=False)]
        wall_skip, log_skip = sweep(cwd, jobs)
        assert log_skip.count("skipped: run_id") == jobs
        skip_starts = job_starts(log_skip)
        return {
            "amortized": (wall - sum(t_total)) / jobs,
            "marginal": statistics.median(gaps),
            "run": statistics.median(t_total),
            "skip": statistics.median(b - a for a, b in zip(skip_starts, skip_starts[1:], strict=False)),
            "rerun_wall": wall_skip,
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    results = [one_repeat(args.jobs) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print(f"sweep of {args.jobs} dummy runs (basic launcher), median of {args.repeats}; {os.cpu_count()} CPUs, "
          f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    for label, key, target in (("one dummy run itself (t_total_s)", "run", False),
                               ("overhead per run, amortized (incl. start)", "amortized", True),
                               ("overhead per run, marginal", "marginal", True),
                               ("skipping a done run, marginal", "skip", False),
                               ("rerun of the whole sweep, all skipped (wall)", "rerun_wall", False)):
        ratio = f"  ({med[key]:.2f} x the 1 s target)" if target else ""
        print(f"  {label:46s}{med[key]:7.3f} s{ratio}")


if __name__ == "__main__":
    main()
