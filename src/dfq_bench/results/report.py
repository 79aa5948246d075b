"""Reporter: result rows -> tables (Markdown, CSV, LaTeX), plots (PNG, PDF) and an HTML page. Reads rows only.

    python -m dfq_bench.report results/runs.jsonl [more/runs.jsonl ...] --out results/report

Rows are deduplicated by run_id: the last ok row wins (files in the order given, lines in file order);
a run_id without any ok row is listed under "failed runs" with its last error. A line the reporter
cannot use (not UTF-8, not JSON, not an object, a field it needs missing, a string where a number
belongs, an ok row without top1 unless none of its views has a label: ``results.row_problem``) is a
``file:line: <reason>`` warning and is skipped; the tables are made from the other rows.

The ok rows become a pandas DataFrame, grouped by (model, dataset, method, bit-width label ``W4A4`` /
``W4A32`` for weight-only) and pooled over seeds into another, a line per cell (``aggregate``): mean ±
sample std over its n runs (std needs n >= 2). Runs of one method that differ in anything else recorded
in the row (protocol, calibration data, method options, method version, weights, n_eval, device) are not pooled:
such a method gets one table row per variant, labelled with the differing values (``squant
protocol=squant_paper``). Deltas to FP32 are computed here, per row, as top1 - top1_fp32 of the same
row. The tables are pivots of the cells (methods x bit settings); rows that carry a ``paper`` block
(experiment= overlays) get a side-by-side table: ours, the published number, and the difference. Where
some views have no label (``dataset_info.n_labelled`` below ``n_eval``: natural_images), top-1 counts the
labelled ones only, and the agreement with the FP32 top-1 and the KL to FP32, which count every view, get
tables (mean ± std over seeds) and a plot of their own (``partial`` sections).

Outputs in ``--out``: tables.md, tables.tex, summary.csv (long format, one line per cell),
failed.csv, per (model, dataset) the plots of results/plots.py: acc_vs_bits__<model>__<dataset>.{png,pdf} and
acc_vs_time__<model>__<dataset>.{png,pdf} (and acc_vs_size__... where mixed-precision runs exist:
``mixed_precision``; kl_vs_bits__... in partial sections), and the results page index.html
(results/html.py: the tables sortable, the plots, every run with its provenance and command; ``--html``:
the page alone, ``--no-html``: no page; ``--index DIR``: DIR/index.html linking DIR/*/index.html).
Everything is sorted and formatted with fixed precision, and the plots carry no date or software version,
so the same rows give the same bytes.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dfq_bench.results import ADDED_DEFAULTS, ADDED_FIELD_DEFAULTS, NUMBERS, LastOk, fields, row_problem


def bits_label(wbits, abits) -> str:
    return f"W{wbits}A{abits if abits is not None else 32}"


def bits_order(wbits, abits) -> tuple:
    """Weight-only first (W2A32, W3A32, ...), then weight+activation (W4A4, W4A8, W6A6, ...)."""
    return (abits is not None, int(wbits), int(abits) if abits is not None else 0)


def rid_of(row: dict) -> str:
    return str(row.get("run_id"))


def _number(v) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


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
    return tuple(str(row.get(k)) for k in ("model", "dataset", "method")) + (bits, str(row.get("seed")), rid_of(row))


# --- pooling -----------------------------------------------------------------------------------

# Cells pool runs over seeds by KEY_FIELDS; runs that differ in any other identity field of the row schema
# (results.py), in n_eval or in device (a row without it ran on the CPU) are variants of a method, not pooled.
# METRICS are pooled: the row's VALUE_FIELDS, the delta to FP32 and the stored bits per weight (the first of
# SIZE_FIELDS a row has).
KEY_FIELDS = ("model", "dataset", "method", "wbits", "abits", "seed")
SIG_FIELDS = (*(f for f in fields("identity") if f not in KEY_FIELDS and f != "run_id"), "n_eval")
_SIG_DEFAULTS = tuple(ADDED_FIELD_DEFAULTS.get(f) for f in SIG_FIELDS)  # what a row without the field had
VALUE_FIELDS = ("top1", "top5", "top1_fp32", "agree_fp32", "kl_fp32", "t_quant_s", "t_synth_s", "t_total_s")
SIZE_FIELDS = ("eff_wbits", "rex_eff_wbits")
METRICS = (*VALUE_FIELDS, "delta_top1", "size")
CELL_KEYS = ["model", "dataset", "method", "variant", "wbits", "abits"]
RUN_FIELDS = ("wbits", "abits", "seed", *VALUE_FIELDS, *SIZE_FIELDS, "paper", "dataset_info")  # columns of runs
COLUMNS = ("model", "dataset", "method", *SIG_FIELDS, *RUN_FIELDS)  # what aggregate reads of a row, in one pass
_DEFAULTS = (None, None, None, *_SIG_DEFAULTS, *[None] * len(RUN_FIELDS))
_SHORT = {"method_version": "v", "method_cfg": "method"}  # facet names in variant labels
_BLOCKS = ("method_cfg", "protocol", "data")  # config blocks: a facet per key, and the preset name


def _settings(table: list[tuple]) -> tuple[list[int], list[tuple]]:
    """A code per row of ``table`` (lines of ``COLUMNS``) for its (model, dataset, method, SIG_FIELDS values), and
    those distinct values by code. The values hold dicts (unhashable), and a sweep has few distinct ones per
    method: a row is compared with the first few of its method, and made hashable (``_frozen``) only where none is
    equal."""
    codes, index, distinct, seen, n = [], {}, [], {}, 3 + len(SIG_FIELDS)
    for t in table:
        sig, method = t[3:n], tuple(map(str, t[:3]))
        known = seen.setdefault(method, [])
        for s, c in known:
            if s == sig:
                code = c
                break
        else:
            code = index.setdefault((method, _frozen(sig)), len(index))
            if code == len(distinct):
                distinct.append((*method, sig))
            if len(known) < 8:
                known.append((sig, code))
        codes.append(code)
    return codes, distinct


def _frozen(v):
    """A hashable stand-in for the JSON value ``v``, equal to another one's where the values are equal."""
    if isinstance(v, dict):
        return dict, tuple(sorted((k, _frozen(x)) for k, x in v.items()))
    return (list, tuple(map(_frozen, v))) if isinstance(v, (list, tuple)) else v


def _facets(sig: tuple) -> dict:
    """What else identifies a result besides KEY_FIELDS (``sig``: the values of SIG_FIELDS): a config block
    gives its preset name and a facet per key, another field itself; JSON scalars as they are, else repr."""
    d = {}
    for name, node in zip(SIG_FIELDS, sig, strict=True):
        prefix = _SHORT.get(name, name)
        if isinstance(node, dict):
            node = {**ADDED_DEFAULTS.get(name, {}), **node}  # a row from before a key existed: its default
            if name != "method_cfg":  # the method's name is in the key already
                d[prefix] = node.get("name")
            d.update((f"{prefix}.{k}", v) for k, v in node.items() if k != "name")
        elif name not in _BLOCKS:  # a null block (no calibration data) adds nothing
            d[prefix] = node
    return {k: v if v is None or isinstance(v, (str, int, float)) else repr(v) for k, v in d.items()}


def _labels(distinct: list[tuple], runs: pd.DataFrame) -> list[str]:
    """The variant label of each setting code: its method and the facets that take several values inside one
    cell of it, less those that the preset name (``protocol``, ``data``) gives one value each (the name says them).
    A row without a key of ``results.ADDED_DEFAULTS`` reads as that key's default (it ran with it)."""
    facets, by_method = [_facets(sig) for *_, sig in distinct], defaultdict(list)
    for code, w, a in runs[["code", "wbits", "abits"]].drop_duplicates().itertuples(index=False):
        by_method[distinct[code][:3]].append((code, (w, None if a != a else a)))
    labels = [""] * len(distinct)
    for (*_, method), items in by_method.items():
        values, fs = defaultdict(set), [facets[c] for c, _ in items]
        for (_, cell), f in zip(items, fs, strict=True):
            for k, v in f.items():
                values[cell, k].add(v)
        keep = {k for (_, k), vs in values.items() if len(vs) > 1}
        for prefix in ("protocol", "data"):  # a facet that one value per preset name gives is the name's
            if prefix in keep:
                names = {f.get(prefix) for f in fs}
                keep -= {k for k in keep if k.startswith(prefix + ".") and all(
                    len({f.get(k) for f in fs if f.get(prefix) == name}) == 1 for name in names)}
        for c, _ in items:
            labels[c] = " ".join([method, *(f"{k}={facets[c][k]}" for k in sorted(keep)
                                            if facets[c].get(k) is not None)])
    return labels


def aggregate(rows: list[dict]) -> tuple[pd.DataFrame, list[str]]:
    """Pools ok rows over seeds: a line per cell (CELL_KEYS, ``bits``, ``bits_order``, ``n`` runs, ``n_seeds``,
    ``<metric>_mean`` and ``_std``, its ``rows`` in file order, ``partial``: some run has unlabelled views,
    ``paper_top1``, ``paper_fp32``, ``paper_source``), sorted by model, dataset, variant and bit setting; and
    the warnings. The mean is over the runs that have a value, an exactly rounded sum (math.fsum: pandas' is
    not quite, and the page shows means in full); the sample std needs two."""
    table = [tuple(map(r.get, COLUMNS, _DEFAULTS)) for r in rows]  # one pass: a row's fields are near each other
    codes, distinct = _settings(table)
    columns = dict(zip(COLUMNS, zip(*table, strict=True) if table else [()] * len(COLUMNS), strict=True))
    runs = {f: columns[f] for f in (*RUN_FIELDS, "n_eval")}
    for f in (*VALUE_FIELDS, *SIZE_FIELDS):  # columns: a third of the time of a DataFrame of the row dicts
        runs[f] = np.array(runs[f] if f in NUMBERS else [_number(v) for v in runs[f]], dtype=float)  # null: NaN
    runs = pd.DataFrame(runs).assign(code=codes, row=pd.Series(rows, dtype=object))
    runs = runs.assign(delta_top1=runs.top1 - runs.top1_fp32, size=runs.eff_wbits.fillna(runs.rex_eff_wbits))
    labelled = [i.get("n_labelled") if type(i) is dict else None for i in runs.dataset_info]  # views with a label
    runs["partial"] = [type(k) in (int, float) and k != n for k, n in zip(labelled, runs.n_eval, strict=True)]
    settings = pd.DataFrame([d[:3] for d in distinct], columns=CELL_KEYS[:3]).assign(variant=_labels(distinct, runs))
    groups = runs.join(settings, on="code").groupby(CELL_KEYS, sort=False, dropna=False)
    cell, values = groups.ngroup().to_numpy(), runs[list(METRICS)]
    mean = values.fillna(0.0).groupby(cell).agg(math.fsum) / values.groupby(cell).count()
    cells = pd.concat([groups.size().rename("n").reset_index(), groups.seed.nunique().rename("n_seeds").reset_index(
        drop=True), mean.add_suffix("_mean"), values.groupby(cell).std().add_suffix("_std")], axis=1)
    cells["abits"] = pd.Series([None if a != a else int(a) for a in cells.abits], dtype=object)
    wa = list(zip(cells.wbits, cells.abits, strict=True))
    rank = {k: i for i, k in enumerate(sorted(set(wa), key=lambda k: bits_order(*k)))}
    cells["bits"], cells["bits_order"] = [bits_label(*k) for k in wa], [rank[k] for k in wa]
    cells["rows"], cells["partial"] = groups.row.agg(list).to_numpy(), groups.partial.any().to_numpy()
    papers = [_paper(*c) for c in zip(groups.paper.agg(list), cells.method, cells.bits, strict=True)]
    papers = pd.DataFrame(papers, columns=["paper_top1", "paper_fp32", "paper_source"], dtype=object)
    cells = cells.join(papers.astype({"paper_top1": float, "paper_fp32": float})).rename_axis("cell")
    pooled = cells[cells.n != cells.n_seeds].sort_values(["model", "dataset", "method", "cell"])
    warnings = [f"{c.model}/{c.dataset} {c.variant} {c.bits}: {c.n} runs for {c.n_seeds} seeds (runs differing "
                "in unrecorded settings are pooled)" for c in pooled.itertuples()]
    return cells.sort_values(["model", "dataset", "variant", "bits_order"], ignore_index=True), warnings


def _paper(blocks: list, method: str, label: str) -> tuple[float | None, float | None, str | None]:
    """(published top-1 of ``method`` at ``label``, published FP32, source) from the rows' paper blocks (the
    last in repr order where they disagree), or Nones."""
    papers = set()
    for paper in (p for p in blocks if isinstance(p, dict)):
        top1 = paper.get("top1")
        top1 = top1.get(method) if isinstance(top1, dict) else None
        value, source = top1.get(label) if isinstance(top1, dict) else None, paper.get("source")
        papers.add((_number(value), _number(paper.get("fp32")), None if source is None else str(source)))
    papers -= {(None, None, None)}
    return sorted(papers, key=repr)[-1] if papers else (None, None, None)


# --- tables ------------------------------------------------------------------------------------


def sections(cells: pd.DataFrame):
    """((model, dataset), its cells) in order."""
    return cells.groupby(["model", "dataset"], sort=False)


def bit_labels(sec: pd.DataFrame) -> list[str]:
    """The bit settings of ``sec`` in ``bits_order``."""
    return sec[["bits_order", "bits"]].drop_duplicates("bits_order").sort_values("bits_order").bits.tolist()


def pivot(sec: pd.DataFrame, values) -> pd.DataFrame:
    """``values`` (one per cell of ``sec``) as methods (variants, in order) x bit settings; NaN where a method
    lacks a setting."""
    grid = pd.DataFrame({"variant": sec.variant, "bits": sec.bits, "value": list(values)})
    grid = grid.drop_duplicates(["variant", "bits"], keep="last").pivot(index="variant", columns="bits", values="value")
    return grid.reindex(index=sec.variant.unique(), columns=bit_labels(sec))


def fp32(sec: pd.DataFrame) -> pd.Series:
    """The FP32 top-1 of each variant: the mean of its cells' means, weighted by their runs."""
    known = sec[sec.top1_fp32_mean.notna()]
    weighted = (known.top1_fp32_mean * known.n).groupby(known.variant).agg(math.fsum)
    return (weighted / known.n.groupby(known.variant).sum()).reindex(sec.variant.unique())


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def fmt_ms(mean: float, std: float, n: int | None, spec: str = ".2f", pm: str = " ± ", missing: str = "-") -> str:
    """``66.14 ± 0.31 (3)``: mean ± sample std (n runs; ``None``: not shown); no std for one run."""
    if math.isnan(mean):
        return missing
    s = format(mean, spec) + ("" if math.isnan(std) else pm + format(std, spec.lstrip("+")))
    return s if n is None else f"{s} ({n})"


def fmt_time(mean: float) -> str:
    """Seconds with a readable unit and three significant digits: ``84.2 ms``, ``38 s``, ``5.7 h``."""
    if math.isnan(mean):
        return "-"
    scale, unit = next((s, u) for s, u, below in ((1e3, "ms", 1.0), (1.0, "s", 600.0), (1 / 60, "min", 7200.0),
                                                  (1 / 3600, "h", math.inf)) if mean < below)
    return f"{format(mean * scale, '.3g')} {unit}"


def texts(sec: pd.DataFrame, metric: str, spec: str = ".2f", tex: bool = False) -> list[str]:
    """The cells' ``metric`` as table text: ``fmt_ms`` (for LaTeX, ``tex``: without the runs), or ``fmt_time``
    for spec ``time``."""
    stats = zip(sec[f"{metric}_mean"], sec[f"{metric}_std"], [None] * len(sec) if tex else sec.n, strict=True)
    args = (TEX_PM, "--") if tex else ()
    return [fmt_time(m) if spec == "time" else fmt_ms(m, s, n, spec, *args) for m, s, n in stats]


def _pivot_text(sec: pd.DataFrame, metric: str, spec: str, with_fp32: bool, tex: bool = False) -> pd.DataFrame:
    """A pivot of ``texts`` as a table: method, FP32 (``with_fp32``), a column per bit setting ('' where none)."""
    table = pivot(sec, texts(sec, metric, spec, tex)).fillna("")
    if with_fp32:
        table.insert(0, "FP32", fp32(sec).map(fmt))
    return table.rename_axis("method").reset_index()


PAPER_HEADER = ["method", "bits", "ours", "paper", "ours - paper", "FP32 ours", "FP32 paper", "source"]


def paper_table(sec: pd.DataFrame, tex: bool = False) -> pd.DataFrame:
    """Ours next to the published numbers: the cells of ``sec`` that have one, as text (PAPER_HEADER)."""
    p = sec[sec.paper_top1.notna()]
    return pd.DataFrame({"method": p.variant, "bits": p.bits, "ours": texts(p, "top1", tex=tex),
                         "paper": p.paper_top1.map(fmt), "ours - paper": (p.top1_mean - p.paper_top1).map(
                             lambda v: fmt(v, "+.2f")), "FP32 ours": p.top1_fp32_mean.map(fmt),
                         "FP32 paper": p.paper_fp32.map(fmt), "source": p.paper_source.map(lambda s: str(s or "-"))},
                        columns=PAPER_HEADER)


FAILED_COLUMNS = ("run_id", "model", "dataset", "method", "bits", "seed", "error")


def failed_table(rows: Rows, text=str, limit: int = 200) -> pd.DataFrame:
    """The failed runs as text (FAILED_COLUMNS): ``text`` of model, dataset, method and seed; the error's first
    line, at most ``limit`` characters."""
    return pd.DataFrame([[rid_of(r), *(text(r.get(k)) for k in ("model", "dataset", "method")), _bits_text(r),
                          text(r.get("seed")), _error_text(r, limit)] for r in rows.failed], columns=FAILED_COLUMNS)


def _bits_text(row: dict) -> str:
    return bits_label(row.get("wbits"), row.get("abits"))


def _error_text(row: dict, limit: int = 200) -> str:
    text = (str(row.get("error") or "-").strip().splitlines() or ["-"])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def md_table(table: pd.DataFrame, align: str) -> str:
    """``table`` (text; its columns are the header) in Markdown; ``align``: l or r per column."""
    rule = "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"
    body = ["| " + " | ".join(str(x).replace("|", "\\|").replace("\n", " ") for x in r) + " |"
            for r in table.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(table.columns) + " |", rule, *body]) + "\n"


PIVOTS = (  # metric, title, format (``time``: fmt_time), with the FP32 column
    ("top1", "Top-1 (%), mean ± std over seeds (runs)", ".2f", True),
    ("delta_top1", "Top-1 minus FP32 top-1 of the same run (points), mean ± std (runs)", "+.2f", False),
    ("t_quant_s", "Quantization time, mean over runs (synthetic data not included)", "time", False),
)
FIDELITY = (  # in partial sections, after the deltas: what counts every view, labelled or not
    ("agree_fp32", "Agreement with the FP32 top-1 over all views (%), mean ± std over seeds (runs)", ".2f", False),
    ("kl_fp32", "KL(p_fp32 ‖ p_quant) of the softmax outputs over all views, mean ± std over seeds (runs)", "#.3g",
     False),
)
PARTIAL_NOTE = ("Top-1, top-5 and the deltas count the labelled views only (`dataset_info.n_labelled` of "
                "`n_eval`); agreement and KL count every view.")


def pivots(sec: pd.DataFrame) -> tuple:
    """The pivot tables of a section (PIVOTS), with FIDELITY's where some views have no label (``partial``)."""
    return (*PIVOTS[:2], *FIDELITY, PIVOTS[2]) if sec.partial.any() else PIVOTS


def markdown(rows: Rows, cells: pd.DataFrame) -> str:
    out = ["# Results\n\n", f"Made by `python -m dfq_bench.report` from {len(rows.ok)} finished runs "
           f"({len(rows.failed)} failed, {rows.n_superseded} superseded rows).\n"]
    for (model, dataset), sec in sections(cells):
        out.append(f"\n## {model} / {dataset}\n" + (f"\n{PARTIAL_NOTE}\n" if sec.partial.any() else ""))
        for metric, title, spec, with_fp32 in pivots(sec):
            table = _pivot_text(sec, metric, spec, with_fp32)
            out.append(f"\n{title}:\n\n" + md_table(table, "l" + "r" * (table.shape[1] - 1)))
        paper = paper_table(sec)
        if len(paper):
            out.append("\nOurs vs the published numbers (top-1 %):\n\n" + md_table(paper, "llrrrrrl"))
    if rows.failed:
        out.append(f"\n## Failed runs ({len(rows.failed)})\n\n" + md_table(failed_table(rows), "lllllrl"))
    return "".join(out)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$",
        "‖": r"$\|$"}
TEX_PM = r"$\pm$"


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def latex(cells: pd.DataFrame) -> str:
    out = ["% Made by python -m dfq_bench.report; needs \\usepackage{booktabs}.\n"]
    for (model, dataset), sec in sections(cells):
        for metric, title, spec, with_fp32 in (p for p in pivots(sec) if p[2] != "time"):
            table = _pivot_text(sec, metric, spec, with_fp32, tex=True)
            caption = tex_escape(f"{title.split(',')[0]} of {model} on {dataset}; mean ± std over seeds.")
            out.append(_tex_table(f"{model} / {dataset}: {metric}", caption, "l" + "r" * (table.shape[1] - 1), table))
        paper = paper_table(sec, tex=True).iloc[:, :5]
        if len(paper):
            caption = f"Top-1 (\\%) of {tex_escape(model)} on {tex_escape(dataset)}: ours vs published."
            out.append(_tex_table(f"{model} / {dataset}: ours vs paper", caption, "llrrr",
                                  paper.set_axis(["Method", "Bits", "Ours", "Paper", "Diff."], axis=1)))
    return "".join(out)


def _tex_table(comment: str, caption: str, cols: str, table: pd.DataFrame) -> str:
    """A booktabs table of ``table`` (text; the header and the first column, the method, TeX-escaped)."""
    lines = [["Method", *map(tex_escape, table.columns[1:])],
             *([tex_escape(v), *rest] for v, *rest in table.itertuples(index=False))]
    head, *body = (" & ".join(line) + " \\\\\n" for line in lines)
    return (f"\n% {comment}\n\\begin{{table}}[t]\n\\centering\n\\caption{{{caption}}}\n\\begin{{tabular}}{{{cols}}}\n"
            f"\\toprule\n{head}\\midrule\n" + "".join(body) + "\\bottomrule\n\\end{tabular}\n\\end{table}\n")


# summary.csv: a line per cell; the number columns and their format (empty where there is none)
SUMMARY_NUMBERS = {
    "top1_mean": ".4f", "top1_std": ".4f", "top5_mean": ".4f", "top5_std": ".4f", "top1_fp32_mean": ".4f",
    "delta_top1_mean": ".4f", "delta_top1_std": ".4f", "agree_fp32_mean": ".4f", "agree_fp32_std": ".4f",
    "kl_fp32_mean": ".6g", "kl_fp32_std": ".6g",
    "t_quant_s_mean": ".6g", "t_synth_s_mean": ".6g", "t_total_s_mean": ".6g", "paper_top1": ".2f",
    "paper_fp32": ".2f", "ours_minus_paper": ".4f",
}
SUMMARY_COLUMNS = ("model", "dataset", "method", "variant", "bits", "wbits", "abits", "n", "n_seeds", *SUMMARY_NUMBERS)
PARTIAL_ONLY = ("agree_fp32_std", "kl_fp32_std")  # columns only where some section is partial


def summary_csv(cells: pd.DataFrame) -> str:
    table = cells.assign(ours_minus_paper=cells.top1_mean - cells.paper_top1, abits=cells.abits.map(_csv_text))
    for col, spec in SUMMARY_NUMBERS.items():
        table[col] = table[col].map(lambda v, spec=spec: "" if math.isnan(v) else format(v, spec))
    columns = [c for c in SUMMARY_COLUMNS if c not in PARTIAL_ONLY or cells.partial.any()]
    return table.to_csv(columns=columns, index=False, lineterminator="\n")


def _csv_text(v) -> str:  # as csv.writer writes a value
    return "" if v is None else str(v)


def failed_csv(rows: Rows) -> str:
    return failed_table(rows, _csv_text, 1000).to_csv(index=False, lineterminator="\n")


# --- command -----------------------------------------------------------------------------------


def report(paths: list[str | Path], out_dir: str | Path, make_plots: bool = True, html: bool = True,
           tables: bool = True, title: str | None = None) -> tuple[Rows, list[Path]]:
    """Writes every table (``tables``), plot (``make_plots``, with the tables) and the HTML page (``html``,
    titled ``title``, default ``dfq_bench results: <the directory of the rows>``) of ``paths`` into ``out_dir``;
    returns the rows and the files."""
    gc_was_on = gc.isenabled()
    gc.disable()  # rows are acyclic JSON: the cycle collector would rescan 100,000s of live dicts while they
    try:  # are read, and at each collection while the outputs are written, unless frozen (left out)
        rows = load(paths)
        cells, warnings = aggregate(rows.ok)
        gc.freeze()
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
            if make_plots and len(cells):
                from dfq_bench.results.plots import save_figures

                written += save_figures(cells, out_dir)
        if html:
            from dfq_bench.results.html import write_page

            dirs = dict.fromkeys(Path(p).resolve().parent.name for p in paths)
            title = title or f"dfq_bench results: {', '.join(dirs)}"
            written.append(write_page(rows, cells, out_dir, title, [str(p) for p in paths], make_plots))
        return rows, written
    finally:
        gc.unfreeze()
        if gc_was_on:
            gc.enable()


def main(argv: list[str] | None = None, exit_now: bool = False) -> int:
    """The command line; ``exit_now`` (``python -m dfq_bench.report``): end the process at once when done,
    flushed but without freeing the rows one by one (a fifth of the tables' time at 100,000 rows), unless
    wandb, whose end runs at exit, was used."""
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
    if (not args.runs or args.out is None) and not (args.index and not args.runs and args.out is None):
        ap.error("the runs files and --out are required (or --index DIR alone)")
    if args.runs:
        out, missing = Path(args.out), [p for p in args.runs if not Path(p).is_file()]
        error = (f"--out={args.out!r} is a file; valid: a directory (created if missing)"
                 if out.exists() and not out.is_dir() else
                 f"{missing[0]!r} is not a file; valid: a runs.jsonl written by dfq_bench" if missing else None)
        if error is None:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a file on the way, no permission
                error = f"--out={args.out!r} cannot be made ({e.strerror or e}); valid: a directory (created if " \
                        "missing)"
        if error:
            print(f"error: {error}", file=sys.stderr)
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
    if exit_now and not args.wandb:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
