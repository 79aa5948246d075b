"""The zero-shot QAT family beside training-free methods: the tables of results/zeroshot.md (issue 15).

    python scripts/table_zeroshot.py results/zeroshot/runs.jsonl [more.jsonl ...]

Reads result rows only (the last ok row per run_id wins) and prints, per model, each method (GranQ by its
activation granularity, the controls by ``method.samples`` / ``method.finetune``) at W3A3 and W4A4:
  - final top-1: the model after the last step, on the full evaluation set (``n_eval``), mean +- std over
    seeds with the number of seeds;
  - best epoch: ``top1_best_epoch``, the best of the per-epoch curve (on the first ``method.eval_images``
    images, ``curve_n_eval``: what the released scripts report, the test set choosing the model), and the
    mean of (best epoch - last epoch) on those same images: the inflation that model selection on the test
    set adds (the curve's images are not the full set, so compare the best epoch with the last, not with
    the final top-1);
  - t_synth_s and t_quant_s (the generator and student training are in t_quant_s).
"""

from __future__ import annotations

import statistics
import sys

from dfq_bench.results import LastOk
from dfq_bench.results.report import bits_label

SETTINGS = [(3, 3), (4, 4)]
ORDER = ["RTN", "SQuant", "GENIE (cpu)", "GDFQ", "Qimera", "AdaDFQ", "GranQ (dynamic)", "GranQ (static)",
         "AdaDFQ: noise images", "AdaDFQ: real images", "AdaDFQ: generator, calibration only"]
NAMES = {"rtn": "RTN", "squant": "SQuant", "gdfq": "GDFQ", "qimera": "Qimera", "adadfq": "AdaDFQ",
         "granq": "GranQ"}


def label(row: dict) -> str:
    c, m = row.get("method_cfg") or {}, row["method"]
    if m == "genie":
        return f"GENIE ({c.get('preset')})"
    name = NAMES.get(m, m)
    if m == "granq":
        dynamic = c.get("a_granularity") == "dynamic"
        name += " (dynamic)" if dynamic else " (static)"
    if "samples" in c and (c["samples"] != "generator" or not c.get("finetune", True)):
        name += (f": {c['samples']} images" if c["samples"] != "generator" else ": generator")
        name += "" if c.get("finetune", True) else ", calibration only"
    p = row.get("protocol") or {}
    if p.get("name", "common") != "common":  # the references' protocol: where the activation quantizers sit
        where = "after every ReLU" if p.get("a_placement") == "after_relu" else "at layer inputs"
        name += f" [{p['name']}, acts {where}, {c.get('quantizer', 'protocol')} quantizer]"
    return name


def heads() -> list[str]:
    return [bits_label(w, a) for w, a in SETTINGS]


def mean_std(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f} (n={len(vals)})"


def final(rs: list[dict]) -> str:
    return mean_std([r["top1"] for r in rs])


def best(rs: list[dict]) -> str:
    pairs = [(r["top1_best_epoch"], r["top1_curve"][-1]) for r in rs if r.get("top1_best_epoch") is not None]
    if not pairs:
        return "-"
    gap = statistics.fmean(b - last for b, last in pairs)
    return f"{statistics.fmean(b for b, _ in pairs):.2f} ({gap:+.2f})"


def times(rs: list[dict]) -> str:
    return f"{statistics.fmean(r['t_synth_s'] for r in rs):.1f} / {statistics.fmean(r['t_quant_s'] for r in rs):.1f}"


def table(by: dict, cell) -> str:
    lines = ["| method | " + " | ".join(heads()) + " |", "|---" * (len(heads()) + 1) + "|"]
    for name in sorted(by, key=lambda n: (ORDER.index(n) if n in ORDER else 99, n)):
        lines.append(f"| {name} | " + " | ".join(cell(by[name][h]) if by[name].get(h) else "-" for h in heads())
                     + " |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    groups: dict[str, dict[str, dict[str, list[dict]]]] = {}
    fp32: dict[str, list[float]] = {}
    for row in LastOk().read(*paths).ok.values():
        by = groups.setdefault(row["model"], {})
        by.setdefault(label(row), {}).setdefault(bits_label(row['wbits'], row['abits']), []).append(row)
        fp32.setdefault(row["model"], []).append(row["top1_fp32"])
    for model, by in sorted(groups.items()):
        n = sum(len(rs) for cells in by.values() for rs in cells.values())
        n_eval = {r["n_eval"] for cells in by.values() for rs in cells.values() for r in rs}
        print(f"### {model} (FP32 top-1 {statistics.fmean(fp32[model]):.2f}%, n_eval {sorted(n_eval)}, {n} runs)\n")
        print("Final top-1 % (the model after the last step, mean ± std over seeds):\n")
        print(table(by, final) + "\n")
        print("Best-epoch top-1 % (`top1_best_epoch`, on the curve's `curve_n_eval` images) and, in brackets, "
              "best minus last epoch on the same images (what selecting the model on the test set adds):\n")
        print(table(by, best) + "\n")
        print("t_synth_s / t_quant_s:\n")
        print(table(by, times) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/table_zeroshot.py RUNS.jsonl [RUNS.jsonl ...]")
    main(sys.argv[1:])
