"""Wall time of each zero-shot QAT method's cpu preset (gdfq_cpu, qimera_cpu, adadfq_cpu, granq_cpu) on
resnet20_fmnist W4A4, each as its own CLI run in a subprocess (``python -m dfq_bench``), printed as a table.

    python scripts/bench_zeroshot.py                      # the presets as they are: ~20 minutes on 2 cores
    python scripts/bench_zeroshot.py --limit 200 --iters 2   # a shortened check that it works

``--limit`` sets ``dataset.limit`` (evaluation images; default: the full 10k test split) and ``--iters``
overrides ``method.iters_per_epoch`` (default: the preset's). Rows go to a temporary results directory
(``--results-dir`` to keep them); ``skip_done=false``, so every run is timed afresh. Extra Hydra overrides
after ``--`` are passed to every run (e.g. ``-- method.quantizer=reference``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = ("gdfq_cpu", "qimera_cpu", "adadfq_cpu", "granq_cpu")
ROOT = Path(__file__).resolve().parents[1]


def num(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="dataset.limit (default: the full test split)")
    ap.add_argument("--iters", type=int, default=None, help="method.iters_per_epoch (default: the preset's)")
    ap.add_argument("--methods", default=",".join(PRESETS), help="comma-separated presets")
    ap.add_argument("--results-dir", default=None, help="where the rows go (default: a temporary directory)")
    ap.add_argument("extra", nargs="*", help="overrides passed to every run (after --)")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory() if args.results_dir is None else None
    out = Path(args.results_dir or tmp.name)
    rows = []
    for preset in args.methods.split(","):
        cmd = [sys.executable, "-m", "dfq_bench", f"method={preset}", "model=resnet20_fmnist",
               "dataset=fashion_mnist", "wbits=4", "abits=4", f"results_dir={out}", "skip_done=false",
               "progress=false", f"hydra.run.dir={out}/hydra/{preset}"]
        if args.limit is not None:
            cmd.append(f"dataset.limit={args.limit}")
        if args.iters is not None:
            cmd.append(f"method.iters_per_epoch={args.iters}")
        cmd += args.extra
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        row = {}
        runs = out / "runs.jsonl"
        if runs.exists():
            mine = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
            mine = [r for r in mine if r.get("method_cfg", {}).get("preset") == "cpu"
                    and r.get("run_dir") == f"{out}/hydra/{preset}"]
            row = mine[-1] if mine else {}
        rows.append((preset, proc.returncode, wall, row))
        if proc.returncode != 0:
            print(f"{preset}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    print(f"zero-shot QAT cpu presets on resnet20_fmnist W4A4 (dataset.limit={args.limit}, "
          f"iters_per_epoch={args.iters or 'preset'})")
    print(f"{'preset':<12} {'exit':>4} {'wall_s':>8} {'t_quant_s':>9} {'t_eval_s':>8} {'top1':>6} {'n_eval':>6}")
    for preset, rc, wall, row in rows:
        print(f"{preset:<12} {rc:>4} {wall:>8.1f} {num(row, 't_quant_s', '9.1f'):>9} "
              f"{num(row, 't_eval_s', '8.1f'):>8} {num(row, 'top1', '6.2f'):>6} {num(row, 'n_eval', 'd'):>6}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(rc == 0 for _, rc, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
