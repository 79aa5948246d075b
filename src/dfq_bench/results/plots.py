"""The reporter's plots (results/report.py's cells -> matplotlib figures): per (model, dataset) accuracy vs
bit-width, the KL to FP32 vs bit-width where some views have no label, accuracy vs quantization time and, where
mixed-precision runs exist, accuracy vs size. Saved as PNG and PDF without date or software version
(``save_figures``), and as inline SVG on the results page (results/html.py), so the same rows give the same bytes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from dfq_bench.results.report import bit_labels, fp32, sections

LEGEND = {"fontsize": 7, "loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}
PNG_META = {"Software": None}
PDF_META = {"Creator": None, "Producer": None, "CreationDate": None}
RC = {"figure.dpi": 100, "savefig.dpi": 120, "font.size": 9, "svg.hashsalt": "dfq_bench", "pdf.compression": 6}


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")


def mixed_precision(cells: pd.DataFrame) -> bool:
    """Whether some runs' size is not given by their bit setting: two cells of one bit setting (W4A4)
    differ in stored bits per weight (``size_mean``: a per-layer planner, REx's extra orders)."""
    sized = cells[cells.size_mean.notna()]
    return bool(sized.size_mean.round(6).groupby(sized.bits).nunique().gt(1).any())


def figures(cells: pd.DataFrame):
    """Yields (file stem, matplotlib figure) per plot and (model, dataset): accuracy vs bit-width, the KL to
    FP32 vs bit-width (partial sections: some views have no label), accuracy vs quantization time and, where
    mixed-precision runs exist (``mixed_precision``), accuracy vs size (every cell whose runs record it); the
    accuracy plots where some cell has a top-1. The figure is closed when the caller asks for the next."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler
    from matplotlib.ticker import LogFormatter

    colors, markers = plt.get_cmap("tab10").colors, "osD^vP*Xh<>p"
    with plt.rc_context({**RC, "axes.prop_cycle": cycler(color=colors)}):
        for (model, dataset), sec in sections(cells):
            labels, name, where = bit_labels(sec), f"{slug(model)}__{slug(dataset)}", f"{model} / {dataset}"
            variants = [(v, pts, {"marker": markers[i % len(markers)], "color": colors[i % len(colors)]})
                        for i, (v, pts) in enumerate(sec.groupby("variant", sort=False))]  # cells by bit setting
            accuracy, x = sec.top1_mean.notna().any(), {lab: i for i, lab in enumerate(labels)}
            for metric in [m for m, shown in (("top1", accuracy), ("kl_fp32", sec.partial.any())) if shown]:
                # the metric vs bit-width, one line per method (variant), error bars = std over seeds
                fig, ax = plt.subplots(figsize=(9, 4))
                for v, pts, st in variants:
                    pts = pts[pts[f"{metric}_mean"].notna()]
                    wonly = pts.bits.str.endswith("A32")
                    parts = [p for p in (pts[wonly], pts[~wonly]) if len(p)]
                    for i, part in enumerate(parts):  # no line across the two families; one legend entry per method
                        ax.errorbar(part.bits.map(x).tolist(), part[f"{metric}_mean"].tolist(), capsize=3,
                                    yerr=part[f"{metric}_std"].fillna(0.0).tolist(), label=None if i else v, **st)
                fp = fp32(sec).dropna() if metric == "top1" else ()
                if len(fp):
                    ax.axhline(math.fsum(fp) / len(fp), color="0.4", ls="--", lw=1, label="FP32")
                n_wonly = sum(lab.endswith("A32") for lab in labels)
                if 0 < n_wonly < len(labels):  # weight-only | weight+activation
                    ax.axvline(n_wonly - 0.5, color="0.75", lw=1)
                ax.set_xticks(range(len(labels)), labels)
                ax.set_xlabel("bit-width (W = weights, A = activations; A32 = float)")
                if metric == "top1":
                    yield _finish(ax, f"{where}: accuracy vs bit-width", f"acc_vs_bits__{name}")
                else:  # a KL of 0 (no output changed), or an error bar reaching 0, is left out of the log axis
                    ax.set_yscale("log", nonpositive="mask")
                    yield _finish(ax, f"{where}: KL to FP32 vs bit-width (all views)", f"kl_vs_bits__{name}",
                                  ylabel="KL(p_fp32 ‖ p_quant), log scale")
                plt.close(fig)
            if not accuracy:
                continue
            # accuracy vs quantization time, log x; one marker per method, one point per bit-width
            fig, ax = plt.subplots(figsize=(9, 4))
            for v, pts, st in variants:
                _points(ax, pts.t_quant_s_mean.clip(lower=1e-4), pts, v, st)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(LogFormatter())
            ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
            ax.set_xlabel("quantization time (s, log scale; synthetic data not included)")
            yield _finish(ax, f"{where}: accuracy vs quantization time", f"acc_vs_time__{name}", "both")
            plt.close(fig)
            if mixed_precision(sec):  # accuracy vs size (stored bits per weight), one marker per method
                fig, ax = plt.subplots(figsize=(9, 4))
                for v, pts, st in variants:
                    _points(ax, pts.size_mean, pts[pts.size_mean.notna()], v, st)
                ax.set_xlabel("size: stored bits per weight (first/last layers and extra orders included)")
                yield _finish(ax, f"{where}: accuracy vs size", f"acc_vs_size__{name}")
                plt.close(fig)


def _points(ax, xs: pd.Series, cells: pd.DataFrame, label: str, style: dict) -> None:
    """A scatter of the top-1 of those ``cells`` that have one at ``xs`` (by cell), each point annotated with its
    bit setting."""
    cells = cells[cells.top1_mean.notna()]
    if len(cells):
        xs, ys = xs[cells.index].tolist(), cells.top1_mean.tolist()
        ax.scatter(xs, ys, label=label, s=22, **style)
        for xv, y, bits in zip(xs, ys, cells.bits, strict=True):
            ax.annotate(bits, (xv, y), xytext=(3, 2), textcoords="offset points", fontsize=6, color=style["color"])


def _finish(ax, title: str, stem: str, grid: str = "major", ylabel: str = "top-1 (%)"):
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which=grid)
    ax.legend(**LEGEND)
    return stem, ax.figure


def save_figures(cells: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Writes each of ``figures(cells)`` as <stem>.png and <stem>.pdf into ``out_dir``; returns the files."""
    written = []
    for stem, fig in figures(cells):
        fig.subplots_adjust(left=0.07, right=0.80, bottom=0.13, top=0.91)  # fixed: no layout pass
        for suffix, meta in ((".png", PNG_META), (".pdf", PDF_META)):
            fig.savefig(out_dir / f"{stem}{suffix}", metadata=meta)
            written.append(out_dir / f"{stem}{suffix}")
    return written
