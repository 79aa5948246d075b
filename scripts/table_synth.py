"""Markdown table of the synthetic-data comparison (results/synthetic_data.md) from result rows.

Reads rows only (``runs.jsonl``; the last ok row per run_id wins). One table per (model, dataset):
a line per (method, calibration data) pair, columns top-1 at each bit width, the data generation
time and the quantization time. ``gen s`` is the time the calibration set took to make: the row's
``t_synth_s`` when it was generated in that run, the cached set's recorded generation time when the
run read it from the cache (marked ``*``).

Usage::

    python scripts/table_synth.py results/synthetic_data/runs.jsonl > table.md
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from dfq_bench.results import LastOk

LABELS = {  # (method, data name, data preset or num_samples) -> label, in table order
    ("rtn", "noise"): "RTN (min/max ranges, 256 noise images)",
    ("zeroq", "noise"): "ZeroQ ranges on noise",
    ("zeroq", "zeroq"): "ZeroQ (ranges on ZeroQ data)",
    ("zeroq", "genie"): "ZeroQ ranges on GENIE-D data",
    ("zeroq", "real"): "ZeroQ ranges on real data",
    ("genie", "genie"): "GENIE (GENIE-M on GENIE-D data)",
    ("genie", "zeroq"): "GENIE-M on ZeroQ data",
    ("genie", "noise"): "GENIE-M on noise",
    ("genie", "real"): "GENIE-M on real data",
}


def data_label(row) -> str:
    d = row.get("data") or {}
    preset = f" {d['preset']}" if d.get("preset") else ""
    return f"{d.get('name')}{preset}, {d.get('num_samples')} img"


def gen_time(row) -> str:
    info = row.get("data_info") or {}
    if info.get("cache") == "hit":
        return f"{info['t_generate_s']:.0f}*"
    return f"{row['t_synth_s']:.0f}" if row.get("data") else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    args = p.parse_args()
    rows = LastOk().read(*args.runs).ok
    tables = defaultdict(lambda: defaultdict(dict))
    fp32 = {}
    bits_seen = set()
    for r in rows.values():
        key = (r["method"], (r.get("data") or {}).get("name"))
        bits = f"W{r['wbits']}A{r['abits']}"
        bits_seen.add((r["wbits"], r["abits"], bits))
        tables[(r["model"], r["dataset"])][(key, data_label(r), r["method_cfg"].get("preset"))][bits] = r
        fp32[(r["model"], r["dataset"])] = r["top1_fp32"]
    bit_cols = [b for _, _, b in sorted(bits_seen)]
    order = list(LABELS)
    for (model, dataset), lines in sorted(tables.items()):
        print(f"\n### {model} / {dataset}  (FP32 top-1 {fp32[(model, dataset)]:.2f})\n")
        head = ["method", "calibration data", "method preset", *[f"{b} top-1" for b in bit_cols],
                "gen s", *[f"{b} quant s" for b in bit_cols]]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        print("| FP32 | - | - | " + " | ".join(f"{fp32[(model, dataset)]:.2f}" for _ in bit_cols)
              + " | - | " + " | ".join("-" for _ in bit_cols) + " |")
        for (key, dlabel, preset), by_bits in sorted(
                lines.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0][1])):
            any_row = next(iter(by_bits.values()))
            cells = [LABELS.get(key, f"{key[0]} on {key[1]}"), dlabel, preset or "-"]
            cells += [f"{by_bits[b]['top1']:.2f}" if b in by_bits else "" for b in bit_cols]
            cells.append(gen_time(any_row))
            cells += [f"{by_bits[b]['t_quant_s']:.1f}" if b in by_bits else "" for b in bit_cols]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
