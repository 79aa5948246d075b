"""Reporter: result rows -> tables (Markdown, CSV, LaTeX), plots (PNG, PDF) and an HTML page. Reads rows only.

    python -m dfq_bench.report results/runs.jsonl [more/runs.jsonl ...] --out results/report

Rows are deduplicated by run_id: the last ok row wins (files in the order given, lines in file order);
a run_id without any ok row is listed under "failed runs" with its last error. A line the reporter
cannot use (not UTF-8, not JSON, not an object, a field it needs missing, a string where a number
belongs, an ok row without top1: ``results.row_problem``) is a ``file:line: <reason>`` warning and is
skipped; the tables are made from the other rows.

Rows are grouped by (model, dataset, method, bit-width label ``W4A4`` / ``W4A32`` for weight-only) and
pooled over seeds: each cell is mean ± sample std over its n runs (std needs n >= 2). Runs of one
method that differ in anything else recorded in the row (protocol, calibration data, method options,
method version, weights, n_eval) are not pooled: such a method gets one table row per variant,
labelled with the differing values (``squant protocol=squant_paper``). Deltas to FP32 are computed
here, per row, as top1 - top1_fp32 of the same row. Rows that carry a ``paper`` block (experiment=
overlays) get a side-by-side table: ours, the published number, and the difference.

Outputs in ``--out``: tables.md, tables.tex, summary.csv (long format, one line per cell),
failed.csv, per (model, dataset) acc_vs_bits__<model>__<dataset>.{png,pdf} and
acc_vs_time__<model>__<dataset>.{png,pdf} (and acc_vs_size__... where mixed-precision runs exist:
``mixed_precision``), and the results page index.html (results/html.py: the tables sortable, the plots,
every run with its provenance and command; ``--html``: the page alone, ``--no-html``: no page;
``--index DIR``: DIR/index.html linking DIR/*/index.html). Everything is sorted and formatted with fixed
precision, and the plots carry no date or software version, so the same rows give the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

from dfq_bench.results import LastOk, fields, row_problem

SUMMARY_COLUMNS = (
    "model", "dataset", "method", "variant", "bits", "wbits", "abits", "n", "n_seeds",
    "top1_mean", "top1_std", "top5_mean", "top5_std", "top1_fp32_mean", "delta_top1_mean", "delta_top1_std",
    "agree_fp32_mean", "kl_fp32_mean", "t_quant_s_mean", "t_synth_s_mean", "t_total_s_mean",
    "paper_top1", "paper_fp32", "ours_minus_paper",
)
FAILED_COLUMNS = ("run_id", "model", "dataset", "method", "bits", "seed", "error")


def bits_label(wbits, abits) -> str:
    return f"W{wbits}A{abits if abits is not None else 32}"


def bits_order(wbits, abits) -> tuple:
    """Weight-only first (W2A32, W3A32, ...), then weight+activation (W4A4, W4A8, W6A6, ...)."""
    return (abits is not None, int(wbits), int(abits) if abits is not None else 0)


# --- reading -----------------------------------------------------------------------------------


@dataclass
class Rows:
    ok: list[dict] = field(default_factory=list)  # one row per run_id: the last ok one
    failed: list[dict] = field(default_factory=list)  # last row of run_ids without an ok row
    n_superseded: int = 0  # rows replaced by a later row of the same run_id
    warnings: list[str] = field(default_factory=list)


def load(paths: list[str | Path]) -> Rows:
    """Reads and deduplicates rows; lines ``row_problem`` rejects become ``file:line`` warnings."""
    latest = LastOk().read(*paths, check=row_problem)
    return Rows(list(latest.ok.values()), sorted(latest.never_ok(), key=_failed_order), latest.n_superseded,
                latest.warnings)


def _failed_order(row: dict) -> tuple:
    try:
        bits = bits_order(row.get("wbits"), row.get("abits"))
    except (TypeError, ValueError):
        bits = (True, 99, 99)
    return (str(row.get("model")), str(row.get("dataset")), str(row.get("method")), bits, str(row.get("seed")),
            rid_of(row))


def rid_of(row: dict) -> str:
    return str(row.get("run_id"))


# --- grouping ----------------------------------------------------------------------------------

# Cells pool runs over seeds by KEY_FIELDS; runs that differ in any other identity field of the row
# schema (results.py), or in n_eval, are variants of a method, not pooled. VALUE_FIELDS are pooled.
KEY_FIELDS = ("model", "dataset", "method", "wbits", "abits", "seed")
SIG_FIELDS = (*(f for f in fields("identity") if f not in KEY_FIELDS and f != "run_id"), "n_eval")
VALUE_FIELDS = ("top1", "top5", "top1_fp32", "agree_fp32", "kl_fp32", "t_quant_s", "t_synth_s", "t_total_s")
_key, _values, _sig = itemgetter(*KEY_FIELDS), itemgetter(*VALUE_FIELDS), itemgetter(*SIG_FIELDS)
_SHORT = {"method_version": "v", "method_cfg": "method"}  # facet names in variant labels
_BLOCKS = ("method_cfg", "protocol", "data")  # config blocks: a facet per key, and the preset name


def _facets(sig: tuple) -> dict:
    """What else identifies a result besides KEY_FIELDS; ``sig`` holds the values of SIG_FIELDS."""
    d = {}
    for name, node in zip(SIG_FIELDS, sig, strict=True):
        prefix = _SHORT.get(name, name)
        if isinstance(node, dict):
            if name != "method_cfg":  # the method's name is in the key already
                d[prefix] = _scalar(node.get("name"))
            for k, v in node.items():
                if k != "name":
                    d[f"{prefix}.{k}"] = _scalar(v)
        elif name not in _BLOCKS:  # a null block (no calibration data) adds nothing
            d[prefix] = _scalar(node)
    return d


def _scalar(v):
    """``v`` if it is a JSON scalar, else its repr: facet values are set members and labels."""
    return v if v is None or isinstance(v, (str, int, float)) else repr(v)


def _variant_keys(facets: list[dict], cells: list[tuple]) -> list[str]:
    """Facet keys that take several values inside one cell, reduced to the preset names
    (``protocol``, ``data``) when those already tell the variants apart."""
    values: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for f, cell in zip(facets, cells, strict=True):
        for k, v in f.items():
            values[cell][k].add(v)
    varying = sorted({k for per_cell in values.values() for k, vs in per_cell.items() if len(vs) > 1})
    keep = set(varying)
    for prefix in ("protocol", "data"):
        fields = [k for k in varying if k.startswith(prefix + ".")]
        if prefix in keep and fields:
            determined = all(len({tuple(f.get(k) for k in fields) for f in facets if f.get(prefix) == name}) == 1
                             for name in {f.get(prefix) for f in facets})
            if determined:
                keep -= set(fields)
    return sorted(keep)


def _label(method: str, facet: dict, keys: list[str]) -> str:
    parts = [f"{k}={facet[k]}" for k in keys if facet.get(k) is not None]
    return " ".join([method, *parts])


@dataclass
class Cell:
    model: str
    dataset: str
    method: str
    variant: str
    wbits: int
    abits: int | None
    n: int
    n_seeds: int
    stats: dict  # metric -> (mean, std); std is nan for n < 2
    paper_top1: float | None = None
    paper_fp32: float | None = None
    paper_source: str | None = None
    rows: list[dict] = field(default_factory=list, repr=False, compare=False)  # its runs, in file order

    @property
    def bits(self) -> str:
        return bits_label(self.wbits, self.abits)


def _mean_std(values) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return math.nan, math.nan
    mean = math.fsum(vals) / len(vals)
    if len(vals) < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


class _Signatures:
    """Interns the SIG_FIELDS values of rows (dicts, so unhashable) by equality: a sweep has few."""

    def __init__(self):
        self.known: list[tuple] = []
        self.by_json: dict[str, int] = {}
        self.last = 0

    def index(self, sig: tuple) -> int:
        known = self.known
        if known and known[self.last] == sig:
            return self.last
        if len(known) < 64:
            for i, k in enumerate(known):
                if k == sig:
                    self.last = i
                    return i
        else:  # many distinct settings: hash their JSON instead of comparing one by one
            blob = json.dumps(sig, sort_keys=True, default=str)
            if blob in self.by_json:
                self.last = self.by_json[blob]
                return self.last
            self.by_json[blob] = len(known)
        known.append(sig)
        self.last = len(known) - 1
        return self.last


def _row_parts(r: dict) -> tuple[tuple, tuple, tuple]:
    try:
        return _key(r), _sig(r), _values(r)
    except KeyError:  # rows from an older schema: missing fields are None
        return (tuple(r.get(k) for k in KEY_FIELDS), tuple(r.get(k) for k in SIG_FIELDS),
                tuple(r.get(k) for k in VALUE_FIELDS))


def aggregate(rows: list[dict]) -> tuple[list[Cell], list[str]]:
    """Pools ok rows over seeds; returns the cells (sorted) and warnings."""
    warnings = []
    by_method: dict[tuple, tuple[_Signatures, list]] = {}
    for r in rows:
        key, sig, vals = _row_parts(r)
        method_key = tuple(map(str, key[:3]))
        entry = by_method.get(method_key)
        if entry is None:
            entry = by_method[method_key] = (_Signatures(), [])
        entry[1].append((entry[0].index(sig), key[3], key[4], key[5], vals, r.get("paper"), r))
    cells = []
    for (model, dataset, method), (sigs, items) in sorted(by_method.items()):
        facets = [_facets(s) for s in sigs.known]
        pairs = sorted({(i, w, a) for i, w, a, *_ in items}, key=repr)
        keys = _variant_keys([facets[i] for i, _, _ in pairs], [(w, a) for _, w, a in pairs])
        labels = [_label(method, f, keys) for f in facets]
        groups: dict[tuple, list] = defaultdict(list)
        for item in items:
            groups[(labels[item[0]], item[1], item[2])].append(item)
        for (variant, wbits, abits), grp in groups.items():
            columns = dict(zip(VALUE_FIELDS, zip(*(it[4] for it in grp), strict=True), strict=True))
            stats = {m: _mean_std(columns[m]) for m in VALUE_FIELDS}
            stats["delta_top1"] = _mean_std([a - b for a, b in zip(columns["top1"], columns["top1_fp32"], strict=True)
                                             if a is not None and b is not None])
            seeds = Counter(it[3] for it in grp)
            if len(seeds) != len(grp):
                warnings.append(f"{model}/{dataset} {variant} {bits_label(wbits, abits)}: {len(grp)} runs "
                                f"for {len(seeds)} seeds (runs differing in unrecorded settings are pooled)")
            cell = Cell(model, dataset, method, variant, wbits, abits, len(grp), len(seeds), stats,
                        rows=[it[6] for it in grp])
            papers = {_paper_numbers(it[5], method, cell.bits) for it in grp if it[5]} - {(None, None, None)}
            if papers:
                cell.paper_top1, cell.paper_fp32, cell.paper_source = sorted(papers, key=repr)[-1]
            cells.append(cell)
    cells.sort(key=lambda c: (c.model, c.dataset, c.variant, bits_order(c.wbits, c.abits)))
    return cells, warnings


def _paper_numbers(paper, method: str, label: str) -> tuple[float | None, float | None, str | None]:
    """(published top-1 of ``method`` at ``label``, published FP32, source) from a row's paper block."""
    if not isinstance(paper, dict):
        return None, None, None
    top1 = paper.get("top1")
    top1 = top1.get(method) if isinstance(top1, dict) else None
    value = top1.get(label) if isinstance(top1, dict) else None
    source = paper.get("source")
    return _number(value), _number(paper.get("fp32")), None if source is None else str(source)


def _number(v) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# --- formatting --------------------------------------------------------------------------------


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def fmt_ms(mean: float, std: float, n: int, spec: str = ".2f") -> str:
    """``66.14 ± 0.31 (3)``: mean ± sample std (n runs); no std for one run."""
    if math.isnan(mean):
        return "-"
    s = format(mean, spec)
    if not math.isnan(std):
        s += " ± " + format(std, spec.lstrip("+"))
    return f"{s} ({n})"


def fmt_time(mean: float, std: float = math.nan, n: int = 0) -> str:
    """Seconds with a readable unit and three significant digits: ``84.2 ms``, ``38 s``, ``5.7 h``."""
    if math.isnan(mean):
        return "-"
    for scale, unit, below in ((1e3, "ms", 1.0), (1.0, "s", 600.0), (1 / 60, "min", 7200.0), (1 / 3600, "h", math.inf)):
        if mean < below:
            return f"{format(mean * scale, '.3g')} {unit}"
    raise AssertionError


def _sections(cells: list[Cell]) -> dict[tuple, list[Cell]]:
    out: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        out[(c.model, c.dataset)].append(c)
    return dict(sorted(out.items()))


def _pivot(cells: list[Cell]) -> tuple[list[str], list[str], dict[tuple, Cell], dict[str, float]]:
    variants = sorted({c.variant for c in cells})
    labels = [bits_label(w, a) for w, a in sorted({(c.wbits, c.abits) for c in cells},
                                                  key=lambda wa: bits_order(*wa))]
    grid = {(c.variant, c.bits): c for c in cells}
    fp32 = {}
    for v in variants:
        means = [(c.stats["top1_fp32"][0], c.n) for c in cells if c.variant == v
                 and not math.isnan(c.stats["top1_fp32"][0])]
        fp32[v] = math.fsum(m * n for m, n in means) / sum(n for _, n in means) if means else math.nan
    return variants, labels, grid, fp32


def md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(md_escape(x) for x in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


PIVOTS = (
    ("top1", "Top-1 (%), mean ± std over seeds (runs)", ".2f", True),
    ("delta_top1", "Top-1 minus FP32 top-1 of the same run (points), mean ± std (runs)", "+.2f", False),
    ("t_quant_s", "Quantization time, mean over runs (synthetic data not included)", "time", False),
)


def _paper_rows(cells: list[Cell]) -> list[list[str]]:
    rows = []
    for c in cells:
        if c.paper_top1 is None:
            continue
        ours = c.stats["top1"]
        rows.append([c.variant, c.bits, fmt_ms(*ours, c.n), fmt(c.paper_top1), fmt(ours[0] - c.paper_top1, "+.2f"),
                     fmt(c.stats["top1_fp32"][0]), fmt(c.paper_fp32), str(c.paper_source or "-")])
    return rows


PAPER_HEADER = ["method", "bits", "ours", "paper", "ours - paper", "FP32 ours", "FP32 paper", "source"]


def markdown(rows: Rows, cells: list[Cell]) -> str:
    out = io.StringIO()
    out.write("# Results\n\n")
    out.write(f"Made by `python -m dfq_bench.report` from {len(rows.ok)} finished runs "
              f"({len(rows.failed)} failed, {rows.n_superseded} superseded rows).\n")
    for (model, dataset), sec in _sections(cells).items():
        variants, labels, grid, fp32 = _pivot(sec)
        out.write(f"\n## {model} / {dataset}\n")
        for metric, title, spec, with_fp32 in PIVOTS:
            out.write(f"\n{title}:\n\n")
            header = ["method", *(["FP32"] if with_fp32 else []), *labels]
            body = []
            for v in variants:
                line = [v, *([fmt(fp32[v])] if with_fp32 else [])]
                for lab in labels:
                    c = grid.get((v, lab))
                    cell = "" if c is None else fmt_time(*c.stats[metric]) if spec == "time" else \
                        fmt_ms(*c.stats[metric], c.n, spec)
                    line.append(cell)
                body.append(line)
            out.write(md_table(header, body, "l" + "r" * (len(header) - 1)))
        paper = _paper_rows(sec)
        if paper:
            out.write("\nOurs vs the published numbers (top-1 %):\n\n")
            out.write(md_table(PAPER_HEADER, paper, "llrrrrrl"))
    if rows.failed:
        out.write(f"\n## Failed runs ({len(rows.failed)})\n\n")
        body = [[rid_of(r), str(r.get("model")), str(r.get("dataset")), str(r.get("method")),
                 _bits_text(r), str(r.get("seed")), _error_text(r)] for r in rows.failed]
        out.write(md_table(list(FAILED_COLUMNS), body, "lllllrl"))
    return out.getvalue()


def _bits_text(row: dict) -> str:
    return bits_label(row.get("wbits"), row.get("abits"))


def _error_text(row: dict, limit: int = 200) -> str:
    err = str(row.get("error") or "-").strip().splitlines()
    text = err[0] if err else "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _tex_cell(mean: float, std: float, spec: str) -> str:
    if math.isnan(mean):
        return "--"
    s = format(mean, spec)
    return s + (r"$\pm$" + format(std, spec.lstrip("+")) if not math.isnan(std) else "")


def latex(cells: list[Cell]) -> str:
    out = io.StringIO()
    out.write("% Made by python -m dfq_bench.report; needs \\usepackage{booktabs}.\n")
    for (model, dataset), sec in _sections(cells).items():
        variants, labels, grid, fp32 = _pivot(sec)
        for metric, title, spec, with_fp32 in PIVOTS[:2]:
            cols = "l" + "r" * (len(labels) + with_fp32)
            out.write(f"\n% {model} / {dataset}: {metric}\n\\begin{{table}}[t]\n\\centering\n")
            caption = tex_escape(f"{title.split(',')[0]} of {model} on {dataset}; mean ± std over seeds.")
            out.write(f"\\caption{{{caption}}}\n")
            out.write(f"\\begin{{tabular}}{{{cols}}}\n\\toprule\n")
            header = ["Method", *(["FP32"] if with_fp32 else []), *labels]
            out.write(" & ".join(tex_escape(h) for h in header) + " \\\\\n\\midrule\n")
            for v in variants:
                line = [tex_escape(v), *([fmt(fp32[v])] if with_fp32 else [])]
                for lab in labels:
                    c = grid.get((v, lab))
                    line.append(_tex_cell(*c.stats[metric], spec) if c else "")
                out.write(" & ".join(line) + " \\\\\n")
            out.write("\\bottomrule\n\\end{tabular}\n\\end{table}\n")
        paper = [c for c in sec if c.paper_top1 is not None]
        if paper:
            out.write(f"\n% {model} / {dataset}: ours vs paper\n\\begin{{table}}[t]\n\\centering\n")
            out.write(f"\\caption{{Top-1 (\\%) of {tex_escape(model)} on {tex_escape(dataset)}: ours vs "
                      "published.}\n\\begin{tabular}{llrrr}\n\\toprule\n"
                      "Method & Bits & Ours & Paper & Diff. \\\\\n\\midrule\n")
            for c in paper:
                m, s = c.stats["top1"]
                out.write(f"{tex_escape(c.variant)} & {c.bits} & {_tex_cell(m, s, '.2f')} & {fmt(c.paper_top1)} & "
                          f"{fmt(m - c.paper_top1, '+.2f')} \\\\\n")
            out.write("\\bottomrule\n\\end{tabular}\n\\end{table}\n")
    return out.getvalue()


def _csv_num(v, spec: str = ".6g") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summary_csv(cells: list[Cell]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)
    for c in cells:
        s = c.stats
        diff = s["top1"][0] - c.paper_top1 if c.paper_top1 is not None else None
        w.writerow([c.model, c.dataset, c.method, c.variant, c.bits, c.wbits, "" if c.abits is None else c.abits,
                    c.n, c.n_seeds, _csv_num(s["top1"][0], ".4f"), _csv_num(s["top1"][1], ".4f"),
                    _csv_num(s["top5"][0], ".4f"), _csv_num(s["top5"][1], ".4f"),
                    _csv_num(s["top1_fp32"][0], ".4f"), _csv_num(s["delta_top1"][0], ".4f"),
                    _csv_num(s["delta_top1"][1], ".4f"), _csv_num(s["agree_fp32"][0], ".4f"),
                    _csv_num(s["kl_fp32"][0]), _csv_num(s["t_quant_s"][0]), _csv_num(s["t_synth_s"][0]),
                    _csv_num(s["t_total_s"][0]), _csv_num(c.paper_top1, ".2f"), _csv_num(c.paper_fp32, ".2f"),
                    _csv_num(diff, ".4f")])
    return out.getvalue()


def failed_csv(rows: Rows) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(FAILED_COLUMNS)
    for r in rows.failed:
        w.writerow([rid_of(r), r.get("model"), r.get("dataset"), r.get("method"), _bits_text(r), r.get("seed"),
                    _error_text(r, 1000)])
    return out.getvalue()


# --- plots -------------------------------------------------------------------------------------

LEGEND = {"fontsize": 7, "loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}
PNG_META = {"Software": None}
PDF_META = {"Creator": None, "Producer": None, "CreationDate": None}
RC = {"figure.dpi": 100, "savefig.dpi": 120, "font.size": 9, "svg.hashsalt": "dfq_bench", "pdf.compression": 6}


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")


def plots(cells: list[Cell], out_dir: Path) -> list[Path]:
    """Writes each figure of ``figures`` as PNG and PDF into ``out_dir``."""
    written = []
    for stem, fig in figures(cells):
        written += _save(fig, out_dir / stem)
    return written


SIZE_FIELDS = ("eff_wbits", "rex_eff_wbits")  # stored bits per weight (the first a row has)


def cell_size(cell: Cell) -> float:
    """Mean stored bits per weight of the cell's runs (nan where no run records them)."""
    return _mean_std(next((r[f] for f in SIZE_FIELDS if _number(r.get(f)) is not None), None)
                     for r in cell.rows)[0]


def mixed_precision(cells: list[Cell]) -> bool:
    """Whether some runs' size is not given by their bit setting: two cells of one bit setting (W4A4)
    differ in stored bits per weight (a per-layer planner, REx's extra orders)."""
    sizes: dict[str, set] = defaultdict(set)
    for c in cells:
        size = cell_size(c)
        if not math.isnan(size):
            sizes[c.bits].add(round(size, 6))
    return any(len(v) > 1 for v in sizes.values())


def figures(cells: list[Cell]):
    """Yields (file stem, matplotlib figure) per plot and (model, dataset): accuracy vs bit-width,
    accuracy vs quantization time and, where mixed-precision runs exist (``mixed_precision``), accuracy
    vs size (every cell whose runs record it). The figure is closed when the caller asks for the next."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler
    from matplotlib.ticker import LogFormatter

    colors = plt.get_cmap("tab10").colors
    rc = {**RC, "axes.prop_cycle": cycler(color=colors)}
    markers = "osD^vP*Xh<>p"
    with plt.rc_context(rc):
        for (model, dataset), sec in _sections(cells).items():
            variants, labels, grid, fp32 = _pivot(sec)
            name = f"{slug(model)}__{slug(dataset)}"
            # accuracy vs bit-width, one line per method (variant), error bars = std over seeds
            fig, ax = plt.subplots(figsize=(9, 4))
            x = {lab: i for i, lab in enumerate(labels)}
            for i, v in enumerate(variants):
                label = v
                for weight_only in (True, False):  # no line across the two families
                    pts = [(x[lab], grid[(v, lab)]) for lab in labels
                           if (v, lab) in grid and lab.endswith("A32") == weight_only]
                    if not pts:
                        continue
                    ys = [p[1].stats["top1"][0] for p in pts]
                    es = [0.0 if math.isnan(p[1].stats["top1"][1]) else p[1].stats["top1"][1] for p in pts]
                    ax.errorbar([p[0] for p in pts], ys, yerr=es, marker=markers[i % len(markers)], capsize=3,
                                label=label, color=colors[i % len(colors)])
                    label = None  # one legend entry per method
            fp = [f for f in fp32.values() if not math.isnan(f)]
            if fp:
                ax.axhline(math.fsum(fp) / len(fp), color="0.4", ls="--", lw=1, label="FP32")
            n_wonly = sum(lab.endswith("A32") for lab in labels)
            if 0 < n_wonly < len(labels):  # weight-only | weight+activation
                ax.axvline(n_wonly - 0.5, color="0.75", lw=1)
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel("bit-width (W = weights, A = activations; A32 = float)")
            ax.set_ylabel("top-1 (%)")
            ax.set_title(f"{model} / {dataset}: accuracy vs bit-width")
            ax.grid(alpha=0.3)
            ax.legend(**LEGEND)
            yield f"acc_vs_bits__{name}", fig
            plt.close(fig)
            # accuracy vs quantization time, log x; one marker per method, one point per bit-width
            fig, ax = plt.subplots(figsize=(9, 4))
            for i, v in enumerate(variants):
                pts = [grid[(v, lab)] for lab in labels if (v, lab) in grid]
                ts = [max(p.stats["t_quant_s"][0], 1e-4) if not math.isnan(p.stats["t_quant_s"][0]) else math.nan
                      for p in pts]
                ys = [p.stats["top1"][0] for p in pts]
                ax.scatter(ts, ys, marker=markers[i % len(markers)], color=colors[i % len(colors)], label=v, s=22)
                for t, y, p in zip(ts, ys, pts, strict=True):
                    ax.annotate(p.bits, (t, y), xytext=(3, 2), textcoords="offset points", fontsize=6,
                                color=colors[i % len(colors)])
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(LogFormatter())
            ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
            ax.set_xlabel("quantization time (s, log scale; synthetic data not included)")
            ax.set_ylabel("top-1 (%)")
            ax.set_title(f"{model} / {dataset}: accuracy vs quantization time")
            ax.grid(alpha=0.3, which="both")
            ax.legend(**LEGEND)
            yield f"acc_vs_time__{name}", fig
            plt.close(fig)
            sized = [(v, [c for c in (grid.get((v, lab)) for lab in labels) if c and not math.isnan(cell_size(c))])
                     for v in variants]
            if not mixed_precision(sec):
                continue
            # accuracy vs size (stored bits per weight), one marker per method
            fig, ax = plt.subplots(figsize=(9, 4))
            for i, (v, pts) in enumerate(sized):
                if not pts:
                    continue
                xs, ys = [cell_size(p) for p in pts], [p.stats["top1"][0] for p in pts]
                ax.scatter(xs, ys, marker=markers[i % len(markers)], color=colors[i % len(colors)], label=v, s=22)
                for xv, y, p in zip(xs, ys, pts, strict=True):
                    ax.annotate(p.bits, (xv, y), xytext=(3, 2), textcoords="offset points", fontsize=6,
                                color=colors[i % len(colors)])
            ax.set_xlabel("size: stored bits per weight (first/last layers and extra orders included)")
            ax.set_ylabel("top-1 (%)")
            ax.set_title(f"{model} / {dataset}: accuracy vs size")
            ax.grid(alpha=0.3)
            ax.legend(**LEGEND)
            yield f"acc_vs_size__{name}", fig
            plt.close(fig)


def _save(fig, stem: Path) -> list[Path]:
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    fig.subplots_adjust(left=0.07, right=0.80, bottom=0.13, top=0.91)  # fixed: no layout pass
    fig.savefig(png, metadata=PNG_META)
    fig.savefig(pdf, metadata=PDF_META)
    return [png, pdf]


# --- command -----------------------------------------------------------------------------------


def report(paths: list[str | Path], out_dir: str | Path, make_plots: bool = True, html: bool = True,
           tables: bool = True, title: str | None = None) -> tuple[Rows, list[Path]]:
    """Writes every table (``tables``), plot (``make_plots``, with the tables) and the HTML page (``html``,
    titled ``title``, default ``dfq_bench results: <the directory of the rows>``) of ``paths`` into ``out_dir``;
    returns the rows and the files."""
    gc_was_on = gc.isenabled()
    gc.disable()  # rows are acyclic JSON: the cycle collector would rescan 100,000s of live dicts
    try:
        rows = load(paths)
        cells, warnings = aggregate(rows.ok)
    finally:
        if gc_was_on:
            gc.enable()
    rows.warnings += warnings
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if tables:
        for name, text in (("tables.md", markdown(rows, cells)), ("tables.tex", latex(cells)),
                           ("summary.csv", summary_csv(cells)), ("failed.csv", failed_csv(rows))):
            (out_dir / name).write_text(text, encoding="utf-8")
            written.append(out_dir / name)
        if make_plots and cells:
            written += plots(cells, out_dir)
    if html:
        from dfq_bench.results.html import write_page

        dirs = dict.fromkeys(Path(p).resolve().parent.name for p in paths)
        title = title or f"dfq_bench results: {', '.join(dirs)}"
        written.append(write_page(rows, cells, out_dir, title, [str(p) for p in paths], make_plots))
    return rows, written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfq_bench.report", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", help="runs.jsonl files (later files win for repeated run_ids)")
    ap.add_argument("--out", help="output directory for tables, plots and the HTML page")
    ap.add_argument("--no-plots", action="store_true", help="tables only (and the HTML page without plots)")
    ap.add_argument("--html", action="store_true", help="only the HTML page (index.html; written by default "
                    "beside the tables)")
    ap.add_argument("--no-html", action="store_true", help="no HTML page")
    ap.add_argument("--title", help="the HTML page's title (default: dfq_bench results: <the runs files' "
                    "directory>)")
    ap.add_argument("--index", metavar="DIR", help="(re)write DIR/index.html linking the pages DIR/*/index.html, "
                    "after the report if runs are given")
    ap.add_argument("--wandb", action="store_true", help="also log the summary table and plots to wandb")
    ap.add_argument("--wandb-project", default="dfq_bench")
    args = ap.parse_args(argv)
    if args.html and args.no_html:
        ap.error("--html and --no-html exclude each other")
    if not args.runs or args.out is None:
        if args.index and not args.runs and args.out is None:
            from dfq_bench.results.html import write_index

            print(f"-> {write_index(args.index)}")
            return 0
        ap.error("the runs files and --out are required (or --index DIR alone)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"error: --out={args.out!r} is a file; valid: a directory (created if missing)", file=sys.stderr)
        return 2
    for p in args.runs:
        if not Path(p).is_file():
            print(f"error: {p!r} is not a file; valid: a runs.jsonl written by dfq_bench", file=sys.stderr)
            return 2
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, no permission
        print(f"error: --out={args.out!r} cannot be made ({e.strerror or e}); valid: a directory (created if "
              "missing)", file=sys.stderr)
        return 2
    rows, written = report(args.runs, args.out, make_plots=not args.no_plots, html=not args.no_html,
                           tables=not args.html, title=args.title)
    for w in rows.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{len(rows.ok)} finished runs, {len(rows.failed)} failed, {rows.n_superseded} superseded rows "
          f"-> {len(written)} files in {args.out}")
    if args.wandb:
        from dfq_bench.run.loggers import log_report

        log_report(args.out, project=args.wandb_project)
    if args.index:
        from dfq_bench.results.html import write_index

        print(f"-> {write_index(args.index)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
