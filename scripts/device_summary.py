"""The rows of a scripts/device_check.sh run as one table: a line per run in file order (method and preset,
model, device, status, top-1, agreement and KL with FP32, phase times, and where a run was shortened to
time steps, the seconds per step), then CUDA - CPU top-1 where both devices ran the same setting.

    python scripts/device_summary.py /tmp/device_check/runs.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

from dfq_bench.results import read_rows


def num(v, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def device(row: dict) -> str:
    """The run's ``device=``: the row's ``device``, else (a row made before that field) its ``command``'s."""
    if row.get("device"):
        return str(row["device"])
    return next((t.partition("=")[2] for t in (row.get("command") or "").split() if t.startswith("device=")), "cpu")


def per_step(row: dict) -> str:
    """Seconds per step of a shortened paper-preset run (GENIE-D / GENIE-M, zero-shot QAT), or ''."""
    cfg, data = row.get("method_cfg") or {}, row.get("data") or {}
    if cfg.get("preset") != "paper":
        return ""
    if row.get("method") == "genie":
        blocks = row.get("n_blocks")
        info = row.get("data_info") or {}  # a cache hit carries the generation time of the run that made the data
        made = info.get("t_generate_s", row.get("t_synth_s") or 0)
        d = (f"GENIE-D {num(made / max(1, data.get('steps', 1)), '.3f')} s/step"
             + (" (cached data: as made then)" if info.get("cache") == "hit" else ""))
        m = (f", GENIE-M {num(row['t_quant_s'] / (cfg['steps'] * blocks), '.4f')} s/step over {blocks} blocks"
             if blocks and row.get("t_quant_s") else "")
        return d + m
    iters = cfg.get("iters_per_epoch")
    if iters and row.get("t_warmup_s") is not None:
        student = row.get("t_student_s")
        n_student = iters * (cfg.get("epochs", 0) - cfg.get("warmup_epochs", 0))
        return (f"warm-up {num(row['t_warmup_s'] / (iters * cfg.get('warmup_epochs', 1)), '.3f')} s/iter"
                + (f", student {num(student / n_student, '.3f')} s/iter" if student and n_student else "")
                + f" (batch {cfg.get('batch_size')})")
    return ""


def main(path: str) -> int:
    errors: list[str] = []
    if not Path(path).is_file():
        print(f"{path}: no rows (no run got as far as writing one)")
        return 1
    rows = list(read_rows(path, errors))
    print(f"{'method':12s}{'preset':>7s} {'model':20s}{'device':>7s}{'status':>7s}{'top1':>7s}{'agree':>7s}"
          f"{'KL':>8s}{'t_synth':>9s}{'t_quant':>9s}{'t_eval':>8s}  per step / error")
    for r in rows:
        cfg = r.get("method_cfg") or {}
        err = (r.get("error") or "").splitlines()[0][:100] if r.get("status") != "ok" else ""
        print(f"{r.get('method', '?'):12s}{cfg.get('preset', ''):>7s} {r.get('model', '?'):20s}"
              f"{device(r):>7s}{r.get('status', '?'):>7s}{num(r.get('top1')):>7s}"
              f"{num(r.get('agree_fp32'), '.1f'):>7s}{num(r.get('kl_fp32'), '.4f'):>8s}{num(r.get('t_synth_s')):>9s}"
              f"{num(r.get('t_quant_s')):>9s}{num(r.get('t_eval_s')):>8s}  {err or per_step(r)}")
    by = {}
    for r in rows:
        if r.get("status") == "ok" and not r.get("deploy"):
            by.setdefault((r["method"], r["model"], r["wbits"], r["abits"]), {})[device(r)] = r.get("top1")
    pairs = [(k, d) for k, d in by.items() if "cpu" in d and any(x != "cpu" for x in d)]
    if pairs:
        print("\nCUDA - CPU top-1 (same machine, same setting):")
        for (method, model, w, a), d in pairs:
            gpu = next(v for x, v in d.items() if x != "cpu")
            print(f"  {method:10s} {model:20s} W{w}A{a if a is not None else 32}: {num(gpu)} - {num(d['cpu'])} = "
                  f"{num(gpu - d['cpu'], '+.2f') if gpu is not None and d['cpu'] is not None else '-'}")
    for e in errors:
        print("warning:", e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
