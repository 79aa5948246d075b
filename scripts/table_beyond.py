"""Beyond uniform rounding: the table of results/beyond_uniform.md.

    python scripts/table_beyond.py results/beyond_uniform/runs.jsonl [more.jsonl ...]

Reads result rows only (the last ok row per run_id wins) and prints, per (model, dataset), top-1 of
RTN, SQuant, PowerQuant and REx (by orders and kept fraction) at each bit setting, each cell with the
stored bits per weight of that run (``eff_wbits``: the first and last layers at 8 bits under the
common protocol, REx's second order counted), then agreement with FP32 and the quantization time.
"""

from __future__ import annotations

import statistics
import sys

from dfq_bench.results import LastOk

SETTINGS = [(2, None), (3, None), (4, None), (4, 4), (8, 8)]
METHOD_ORDER = ["rtn", "squant", "powerquant", "rex"]
NAMES = {"rtn": "RTN", "squant": "SQuant", "powerquant": "PowerQuant"}


def label(row: dict) -> tuple:
    c = row.get("method_cfg") or {}
    if row["method"] == "rex":
        return (3, -c["keep"] if c["orders"] > 1 else 0.0,
                f"REx K={c['orders']}, {c['keep'] * 100:g}% kept" + (f" ({c['base']})" if c["base"] != "rtn" else ""))
    return (METHOD_ORDER.index(row["method"]) if row["method"] in METHOD_ORDER else 9, 0.0,
            NAMES.get(row["method"], row["method"]))


def setting(row: dict) -> str:
    return f"W{row['wbits']}A{row['abits'] if row['abits'] is not None else 32}"


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def table(rows: list[dict], field: str, spec: str, with_bits: bool) -> str:
    heads = [f"W{w}A{a if a is not None else 32}" for w, a in SETTINGS]
    lines = ["| method | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    fp32 = {setting(r): r["top1_fp32"] for r in rows}
    if field == "top1":
        lines.append("| FP32 | " + " | ".join(format(fp32[h], spec) if h in fp32 else "-" for h in heads) + " |")
    by_label: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        by_label.setdefault(label(r), {}).setdefault(setting(r), []).append(r)
    for key in sorted(by_label):
        cells = []
        for h in heads:
            rs = by_label[key].get(h)
            if not rs:
                cells.append("-")
                continue
            cell = format(mean([r[field] for r in rs]), spec)
            if with_bits:
                cell += f" ({mean([r['eff_wbits'] for r in rs]):.2f} b)"
            cells.append(cell)
        lines.append(f"| {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for row in LastOk().read(*paths).ok.values():
        groups.setdefault((row["model"], row["dataset"]), []).append(row)
    for (model, dataset), rows in sorted(groups.items()):
        n_eval = sorted({r["n_eval"] for r in rows})
        print(f"### {model} / {dataset} (n_eval {', '.join(map(str, n_eval))})\n")
        print("Top-1 % (stored bits per weight):\n")
        print(table(rows, "top1", ".2f", with_bits=True) + "\n")
        print("Agreement with FP32 %:\n")
        print(table(rows, "agree_fp32", ".2f", with_bits=False) + "\n")
        print("Weight quantization + calibration time t_quant_s:\n")
        print(table(rows, "t_quant_s", ".2f", with_bits=False) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/table_beyond.py RUNS.jsonl [...]")
    main(sys.argv[1:])
