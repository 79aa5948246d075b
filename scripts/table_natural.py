"""Real ImageNet weights over natural_images: the tables of results/natural_images.md.

    python scripts/table_natural.py results/natural_images/runs.jsonl [more.jsonl ...]

Reads result rows only (the last ok row per run_id wins) and prints, per model, each method (SQuant by
mode, DFQ by relu6_scope) at W4A32, W3A32, W4A4, W6A6, W8A8 as "top-1 / agreement / KL": top-1 % on the
labelled views (``dataset_info.n_labelled``), agreement % with the FP32 top-1 and mean KL(FP32 || quantized)
on every view; then t_quant_s; then, over the models, SQuant minus RTN at 4 bits and DFQ's ReLU6 -> ReLU
cost (scope all minus safe). Means over seeds where there are several.
"""

from __future__ import annotations

import statistics
import sys

from dfq_bench.results import LastOk
from dfq_bench.results.report import bits_label

SETTINGS = [(4, None), (3, None), (4, 4), (6, 6), (8, 8)]
ORDER = ["RTN", "SQuant", "SQuant-K", "SQuant-C", "SQuant-E", "DFQ (relu6 all)", "DFQ (relu6 safe)", "ZeroQ",
         "GENIE (cpu)"]


def label(row: dict) -> str:
    c, m = row.get("method_cfg") or {}, row["method"]
    if m == "squant":
        return {"squant": "SQuant", "squant-k": "SQuant-K", "squant-c": "SQuant-C", "squant-e": "SQuant-E"}[c["mode"]]
    if m == "dfq":
        return f"DFQ (relu6 {c['relu6_scope']})" if c.get("relu6_to_relu", True) else "DFQ (relu6 kept)"
    return {"rtn": "RTN", "zeroq": "ZeroQ", "genie": f"GENIE ({c.get('preset')})"}.get(m, m)


def heads() -> list[str]:
    return [bits_label(w, a) for w, a in SETTINGS]


def cells(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        out.setdefault(label(r), {}).setdefault(bits_label(r['wbits'], r['abits']), []).append(r)
    return out


def mean(rs: list[dict], field: str) -> float:
    return statistics.fmean(r[field] for r in rs)


def fidelity(rs: list[dict] | None) -> str:
    if not rs:
        return "-"
    return f"{mean(rs, 'top1'):.1f} / {mean(rs, 'agree_fp32'):.1f} / {mean(rs, 'kl_fp32'):.3f}"


def table(by: dict, cell) -> str:
    lines = ["| method | " + " | ".join(heads()) + " |", "|---" * (len(heads()) + 1) + "|"]
    for name in sorted(by, key=lambda n: (ORDER.index(n) if n in ORDER else 99, n)):
        lines.append(f"| {name} | " + " | ".join(cell(by[name].get(h)) for h in heads()) + " |")
    return "\n".join(lines)


def diff(by: dict, a: str, b: str, h: str, field: str) -> float | None:
    if not (by.get(a, {}).get(h) and by.get(b, {}).get(h)):
        return None
    return mean(by[a][h], field) - mean(by[b][h], field)


def main(paths: list[str]) -> None:
    groups: dict[str, list[dict]] = {}
    for row in LastOk().read(*paths).ok.values():
        if row["dataset"] == "natural_images":
            groups.setdefault(row["model"], []).append(row)
    by_model = {m: cells(rows) for m, rows in sorted(groups.items())}
    for model, rows in sorted(groups.items()):
        info = rows[0]["dataset_info"]
        fp32 = statistics.fmean(r["top1_fp32"] for r in rows)
        print(f"### {model} (n_eval {rows[0]['n_eval']} views, {info['n_labelled']} labelled; "
              f"FP32 top-1 {fp32:.1f}%, {len(rows)} runs)\n")
        print("top-1 % (labelled views) / agreement with FP32 % / KL(FP32 || quantized), all views:\n")
        print(table(by_model[model], fidelity) + "\n")
        print("Quantization time t_quant_s (weights + activation calibration):\n")
        print(table(by_model[model], lambda rs: "-" if not rs else f"{mean(rs, 't_quant_s'):.1f}") + "\n")
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    comparisons = (("SQuant minus RTN", "SQuant", "RTN"),
                   ("DFQ ReLU6 -> ReLU everywhere (all) minus only where exact (safe)", "DFQ (relu6 all)",
                    "DFQ (relu6 safe)"))
    for title, a, b in comparisons:
        print(f"### {title}: top-1 points / agreement points / KL\n")
        print("| model | " + " | ".join(heads()) + " |\n" + "|---" * (len(heads()) + 1) + "|")
        for model, by in by_model.items():
            row = [f"{f(diff(by, a, b, h, 'top1'), '+.1f')} / {f(diff(by, a, b, h, 'agree_fp32'), '+.1f')} / "
                   f"{f(diff(by, a, b, h, 'kl_fp32'), '+.3f')}" for h in heads()]
            print(f"| {model} | " + " | ".join(row) + " |")
        print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/table_natural.py RUNS.jsonl [RUNS.jsonl ...]")
    main(sys.argv[1:])
