"""Mixed precision (core/mixed.py): top-1 at fixed budgets and the accuracy-vs-size frontier.

    python scripts/table_mp.py results/mixed_precision/runs.jsonl [more.jsonl ...] [--out DIR]
                               [--budgets 2.5,3,3.5,4,5,6]

Reads result rows only (the last ok row per run_id wins; rows without ``mp`` are left out) and
writes, into ``--out`` (default: the first file's directory), ``mp_table.md`` (also printed) and one
plot per model, ``mp_frontier__<model>.png``: top-1 against ``size_mb`` (weights at their bits plus
scales), one line per method and allocator, a panel per activation bit-width; the ``dp`` line is
the Pareto frontier of the sensitivities. The table gives, per (model, activation bits), top-1 of
each method and allocator at each budget ``mp.avg_wbits`` (mean over ``mp.seed`` for ``random``,
with its spread), the plan's ``size_mb`` below it, and the times of the sensitivity pass (as made,
``mp_sensitivity.t_made_s``) and of the solver (``t_plan_s``), medians over the rows.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from dfq_bench.results import LastOk

ALLOCATORS = ["dp", "greedy", "random", "uniform"]
NAMES = {"rtn": "RTN", "squant": "SQuant", "dfq": "DFQ", "zeroq": "ZeroQ", "genie": "GENIE"}


def mp_rows(paths: list[str]) -> list[dict]:
    return [r for r in LastOk().read(*paths).ok.values() if isinstance(r.get("mp"), dict)]


def abits_label(a) -> str:
    return f"A{a}" if a is not None else "A32"


def series(row: dict) -> tuple:
    """(method, allocator): one line of a plot, one row of a table."""
    alloc = row["mp"]["allocator"]
    return (row["method"], ALLOCATORS.index(alloc) if alloc in ALLOCATORS else 9, alloc)


def label(key: tuple) -> str:
    return f"{NAMES.get(key[0], key[0])} {key[2]}"


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def cell(rows: list[dict]) -> str:
    top1 = [r["top1"] for r in rows]
    text = f"{statistics.fmean(top1):.2f}"
    if len(top1) > 1:
        text += f" ± {statistics.stdev(top1):.2f}"
    return text + f"<br>{statistics.fmean(r['size_mb'] for r in rows) * 1024:.1f} KB"


def table(rows: list[dict], budgets: list[float]) -> str:
    by: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        b = r["mp"].get("avg_wbits")
        if b is not None and (not budgets or b in budgets):
            by[series(r)][b].append(r)
    cols = sorted({b for per in by.values() for b in per})
    lines = ["| method, allocator | " + " | ".join(f"{b:g} b" for b in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key in sorted(by):
        lines.append(f"| {label(key)} | " + " | ".join(cell(by[key][b]) if by[key].get(b) else "-" for b in cols)
                     + " |")
    return "\n".join(lines)


def plot(rows_by_abits: dict, model: str, fp32: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(rows_by_abits, key=lambda a: -(a or 99))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False, sharey=True)
    styles = {"dp": "-", "greedy": "--", "random": ":", "uniform": "-."}
    markers = {"dp": "o", "greedy": "s", "random": "^", "uniform": "D"}
    colors = {}
    for ax, a in zip(axes[0], panels, strict=True):
        by: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for r in rows_by_abits[a]:
            by[series(r)][r["mp"].get("avg_wbits") or r["size_mb"]].append(r)
        for key in sorted(by):
            color = colors.setdefault(key[0], f"C{len(colors)}")
            pts = sorted((statistics.fmean(r["size_mb"] for r in rs) * 1024, statistics.fmean(r["top1"] for r in rs))
                         for rs in by[key].values())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(key[2], "-"), marker=markers.get(key[2], "o"),
                    ms=3.5, color=color, label=label(key))
        ax.axhline(fp32, color="0.4", lw=1, ls="--", label="FP32")
        ax.set_title(f"{model}: mixed-precision weights, {abits_label(a)}")
        ax.set_xlabel("weights at their bits + scales (KB)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=None, help="directory of mp_table.md and the plots (default: the first file's)")
    ap.add_argument("--budgets", default="", help="the mp.avg_wbits columns (default: every budget in the rows)")
    args = ap.parse_args()
    out = Path(args.out or Path(args.runs[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    rows = mp_rows(args.runs)
    groups: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["model"], r["dataset"])][r["abits"]].append(r)
    text = ["# Mixed precision: top-1 at fixed budgets", "",
            "Budget = `mp.avg_wbits`: mean weight bits of the allocated layers (the first/last layers stay at the "
            "protocol's 8 bits); each cell: top-1 % (mean ± std over seeds where there are several) and the "
            "plan's size (weights at their bits + per-channel scales and zero-points). Rows: "
            f"{len(rows)} (`scripts/table_mp.py`).", ""]
    for (model, dataset), by_abits in sorted(groups.items()):
        every = [r for rs in by_abits.values() for r in rs]
        fp32 = statistics.fmean(r["top1_fp32"] for r in every)
        n_eval = sorted({r["n_eval"] for r in every})
        sens = [r.get("mp_sensitivity") or {} for r in every]
        made = [s["t_made_s"] for s in sens if s.get("cache") in ("miss", "off")]
        solve = [r["t_plan_s"] for r in every if r["mp"]["allocator"] == "dp"]
        text += [f"## {model} / {dataset} (FP32 {fp32:.2f}, n_eval {', '.join(map(str, n_eval))})", "",
                 f"Sensitivity pass (as made, cache misses): median {median(made):.2f} s over {len(made)}; "
                 f"DP solver: median {median(solve) * 1e3:.1f} ms over {len(solve)} runs.", ""]
        for a in sorted(by_abits, key=lambda a: -(a or 99)):
            text += [f"### W mixed, {abits_label(a)}", "", table(by_abits[a], budgets), ""]
        png = out / f"mp_frontier__{model}.png"
        plot(by_abits, model, fp32, png)
        text += [f"![{model}]({png.name})", ""]
    (out / "mp_table.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
