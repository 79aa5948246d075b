"""The results page: one self-contained HTML file (``index.html``) per results directory.

Made by the reporter from the cells it aggregates (``report.aggregate``: a DataFrame, a line per cell;
nothing is recomputed here) and written beside its tables, or alone with ``python -m dfq_bench.report
... --html``. No network: the CSS and the sorting script are inline, the plots are inline SVG. Per
(model, dataset): the top-1 of each method at each bit setting, a table with one line per (method, bit
setting) (mean ± std over seeds, delta to FP32, FP32, top-5, agreement, quantization time, and the
published number where rows carry one; where some views have no label, agreement ± std and the KL to
FP32 ± std, which count every view), the plots, and under each line its runs with their provenance
and the command that reproduces each; then the failed runs. Every table sorts by a click on a column
header (numbers by value, text alphabetically; again: the other direction), and the address fragment
``#sort=top1:desc`` (a column key, ``asc`` or ``desc``) sorts every table having that column when the
page opens; ``#open=all`` opens every run list (``#sort=top1:desc&open=all`` does both).

The same rows give the same bytes: nothing depends on the time or the machine of the reporter, rows
and cells are in the reporter's order, and the SVG ids are fixed (``svg.hashsalt``) and prefixed per
figure. ``write_index`` writes the index of the pages under a directory (``--index``).
"""

from __future__ import annotations

import io
import json
import math
import re
import shlex
from html import escape
from pathlib import Path

import pandas as pd

from dfq_bench.results import atomic_write, plots
from dfq_bench.results import report as rp

PAGE = "index.html"
MAX_LISTED_RUNS = 100  # runs listed under one cell; a larger cell says how many more are in the rows
MAX_REBUILT = 300  # commands rebuilt (run.command.row_command, ~20 ms each) per page; rows past it show none
NOT_RECORDED = "not recorded"
NOT_REBUILT = f"not recorded (the page rebuilds at most {MAX_REBUILT} commands)"

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:1.5em auto;
max-width:1280px;padding:0 1em;color:#1b1b1b;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.3em 0 1em;font-variant-numeric:tabular-nums}
th,td{padding:3px 8px;border-bottom:1px solid #e3e3e3;text-align:right;vertical-align:top;white-space:nowrap}
th{background:#f3f5f7;cursor:pointer;user-select:none;position:sticky;top:0}
th:after{content:" \\2195";color:#aaa;font-size:.8em}
th[aria-sort=ascending]:after{content:" \\25B2";color:#333}th[aria-sort=descending]:after{content:" \\25BC";color:#333}
td.t,th.t{text-align:left}td.t{white-space:normal}td.err{max-width:40em}
tbody tr:hover{background:#fafbe6}
details{margin:.15em 0}summary{cursor:pointer;color:#0b57a4}details[open]{margin-bottom:.8em}
table.runs{font-size:.85em;margin:.3em 0}table.runs th{cursor:default;position:static}
table.runs th:after{content:none}table.runs td.w{white-space:normal;text-align:left;min-width:14em}
code{font:12px/1.3 ui-monospace,"DejaVu Sans Mono",monospace;background:#f5f5f5;padding:1px 3px;word-break:break-all}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0;flex:1 1 600px}
figure svg{width:100%;height:auto}figcaption{font-size:.85em;color:#555}
.dirty{color:#b00020;font-weight:600}.note{color:#555;font-size:.9em}nav a{margin-right:1em}
"""

JS = """
(function(){
function val(td){var v=td.getAttribute('data-v');if(v!==null)return v===''?null:parseFloat(v);
return td.textContent.trim().toLowerCase();}
function sortTable(table,col,dir){
var tb=table.tBodies[0],rows=Array.prototype.slice.call(tb.rows);
var keyed=rows.map(function(r){return [val(r.cells[col]),+r.getAttribute('data-i'),r];});
keyed.sort(function(a,b){var x=a[0],y=b[0],c;
if(x===null||y===null){return x===y?a[1]-b[1]:(x===null?1:-1);}
if(typeof x==='number'&&typeof y==='number')c=x-y;else{x=String(x);y=String(y);c=x<y?-1:x>y?1:0;}
if(dir==='desc')c=-c;return c||a[1]-b[1];});
keyed.forEach(function(k){tb.appendChild(k[2]);});
var ths=table.tHead.rows[0].cells;
for(var i=0;i<ths.length;i++){if(i===col)ths[i].setAttribute('aria-sort',dir==='desc'?'descending':'ascending');
else ths[i].removeAttribute('aria-sort');}}
function columnOf(table,key){var ths=table.tHead.rows[0].cells;
for(var i=0;i<ths.length;i++)if(ths[i].getAttribute('data-key')===key)return i;return -1;}
var tables=document.querySelectorAll('table.sortable');
Array.prototype.forEach.call(tables,function(table){
Array.prototype.forEach.call(table.tBodies[0].rows,function(r,i){r.setAttribute('data-i',i);});
Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
th.addEventListener('click',function(){var now=th.getAttribute('aria-sort');
var dir=now?(now==='ascending'?'desc':'asc'):(th.getAttribute('data-type')==='num'?'desc':'asc');
sortTable(table,col,dir);});});});
function fromHash(){var m=/(?:^#|&)sort=([^&:]+)(?::(asc|desc))?/.exec(location.hash);if(!m)return;
var key=decodeURIComponent(m[1]);Array.prototype.forEach.call(tables,function(table){
var col=columnOf(table,key);if(col<0)return;
var dir=m[2]||(table.tHead.rows[0].cells[col].getAttribute('data-type')==='num'?'desc':'asc');
sortTable(table,col,dir);});}
function openAll(){if(/(?:^#|&)open=all/.test(location.hash))
Array.prototype.forEach.call(document.querySelectorAll('details'),function(d){d.open=true;});
var t=location.hash.length>1&&document.getElementById(decodeURIComponent(location.hash.slice(1)));
if(t&&t.tagName==='DETAILS'){t.open=true;t.scrollIntoView();}}
fromHash();openAll();window.addEventListener('hashchange',function(){fromHash();openAll();});
})();
"""


# --- pieces -------------------------------------------------------------------------------------


def _e(x) -> str:
    return escape(str(x), quote=True)


def _num(v) -> str:
    """A sort key for ``data-v``: the number in full (repr), '' for a missing one."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))


def _td(text, v=None, cls: str | None = None, raw: bool = False) -> str:
    attrs = "" if v is None else f' data-v="{v}"'
    attrs += f' class="{cls}"' if cls else ""
    return f"<td{attrs}>{text if raw else _e(text)}</td>"


class Col:
    def __init__(self, key: str, title: str, num: bool = True, tip: str = ""):
        self.key, self.title, self.num, self.tip = key, title, num, tip

    def th(self) -> str:
        tip = f' title="{_e(self.tip)}"' if self.tip else ""
        kind = 'data-type="num"' if self.num else 'data-type="text" class="t"'
        return f'<th data-key="{_e(self.key)}" {kind}{tip}>{_e(self.title)}</th>'


def _table(cols: list[Col], body: list[str], table_id: str, cls: str = "sortable") -> str:
    head = "".join(c.th() for c in cols)
    return (f'<table id="{_e(table_id)}" class="{cls}"><thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "".join(f"<tr>{r}</tr>\n" for r in body) + "</tbody></table>\n")


def row_command(row: dict, rebuild: bool = True) -> str | None:
    """The command that reproduces ``row``: its ``command`` field, else (``rebuild``) the one
    ``run.command.row_command`` rebuilds from the row's fields, where that module exists, else None."""
    cmd = row.get("command")
    if isinstance(cmd, list) and cmd:
        return shlex.join(map(str, cmd))
    if isinstance(cmd, str) and cmd.strip():
        return cmd
    if not rebuild:
        return None
    try:
        from dfq_bench.run.command import row_command as rebuild
    except ImportError:
        return None
    try:
        cmd = rebuild(row)
    except Exception:  # an old or odd row: the page still lists it
        return None
    return cmd if isinstance(cmd, str) and cmd.strip() else None


def _versions(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {v[k]}" for k in sorted(v, key=str))
    return "-" if v is None else str(v)


def _sha(row: dict) -> str:
    sha = row.get("git_sha")
    text = _e(str(sha)[:12]) if sha else "-"
    dirty = row.get("git_dirty")
    if dirty is True:
        return f'{text} <span class="dirty">dirty</span>'
    return text + (" clean" if dirty is False else "")


AGREE_TIP = "percent of all views (labelled or not) whose top-1 is the FP32 top-1, mean ± std over the runs"
KL_TIP = "KL(p_fp32 ‖ p_quant) of the softmax outputs averaged over all views, mean ± std over the runs"
RUN_HEADER = ("run_id", "seed", "top-1", "FP32", "delta", "quant time", "git", "versions", "device", "started",
              "command")


def _n_runs(n: int) -> str:
    return f"{n} run{'s' * (n != 1)}"


class Commands:
    """The command shown for each listed run: a recorded one always; a rebuilt one for up to MAX_REBUILT
    rows written by the runner (those with provenance fields: rebuilding imports the package's configs and
    torch, seconds once, which rows made by hand are spared). The runs of one cell differ only in their
    seed: once one of them cannot be rebuilt, the others are not tried."""

    def __init__(self):
        self.rebuilt = 0
        self.failed: set[str] = set()  # cells with a run that could not be rebuilt

    def __call__(self, row: dict, cell: str) -> str:
        cmd = row_command(row, rebuild=False)
        if cmd is None:
            if "git_sha" not in row or "versions" not in row or cell in self.failed:
                return NOT_RECORDED
            if self.rebuilt >= MAX_REBUILT:
                return NOT_REBUILT
            self.rebuilt += 1
            cmd = row_command(row)
            if cmd is None:
                self.failed.add(cell)
        return f"<code>{_e(cmd)}</code>" if cmd else NOT_RECORDED


def _run_order(row: dict) -> tuple:
    seed = row.get("seed")
    return (seed if isinstance(seed, int) and not isinstance(seed, bool) else math.inf, rp.rid_of(row))


def _time(v) -> str:
    v = rp._number(v)
    return rp.fmt_time(math.nan if v is None else v)


def _runs(rows: list[dict], anchor: str, what: str, commands: Commands) -> str:
    """The ``<details id=anchor>`` listing ``rows`` (one cell's runs, or one failed run) with their
    provenance and command."""
    listed = sorted(rows, key=_run_order)[:MAX_LISTED_RUNS]
    out = io.StringIO()
    out.write(f'<details id="{_e(anchor)}"><summary>{_e(what)}</summary><table class="runs"><tr>')
    out.write("".join(f"<th>{h}</th>" for h in RUN_HEADER) + "</tr>")
    for r in listed:
        top1, fp32 = rp._number(r.get("top1")), rp._number(r.get("top1_fp32"))
        delta = top1 - fp32 if top1 is not None and fp32 is not None else None
        out.write(f'<tr class="run" data-run="{_e(rp.rid_of(r))}"><td><code>{_e(rp.rid_of(r))}</code></td>'
                  f"<td>{_e(r.get('seed'))}</td><td>{rp.fmt(top1)}</td><td>{rp.fmt(fp32)}</td>"
                  f"<td>{rp.fmt(delta, '+.2f')}</td>"
                  f"<td>{_time(r.get('t_quant_s'))}</td>"
                  f"<td>{_sha(r)}</td><td class=\"w\">{_e(_versions(r.get('versions')))}</td>"
                  f"<td>{_e(r.get('device_name') or '-')}</td><td>{_e(r.get('started_at') or '-')}</td>"
                  f"<td class=\"w\">{commands(r, anchor)}</td></tr>")
    out.write("</table>")
    if len(rows) > len(listed):
        out.write(f'<p class="note">and {len(rows) - len(listed)} more runs (not listed here: see the rows)</p>')
    out.write("</details>\n")
    return out.getvalue()


def _section_id(model: str, dataset: str) -> str:
    return f"{plots.slug(model)}__{plots.slug(dataset)}"


def _pivot_table(sec: pd.DataFrame, sid: str) -> str:
    text, mean, fp32 = rp.pivot(sec, rp.texts(sec, "top1")).fillna(""), rp.pivot(sec, sec.top1_mean), rp.fp32(sec)
    cols = [Col("method", "method", num=False), Col("fp32", "FP32"), *(Col(lab, lab) for lab in text.columns)]
    body = []
    for v, texts, means in zip(text.index, text.to_numpy().tolist(), mean.to_numpy().tolist(), strict=True):
        line = [_td(v, cls="t"), _td(rp.fmt(fp32[v]), _num(fp32[v]))]  # a missing cell: no text, no number
        line += [_td(t, _num(m)) for t, m in zip(texts, means, strict=True)]
        body.append("".join(line))
    return _table(cols, body, f"pivot__{sid}")


def _cells_table(sec: pd.DataFrame, sid: str, commands: Commands) -> tuple[str, str]:
    """The sortable table of the cells of a section, and the run lists its last column links to."""
    paper, partial = sec.paper_top1.notna().any(), sec.partial.any()
    order = {lab: i for i, lab in enumerate(rp.bit_labels(sec))}
    cols = [Col("method", "method", num=False), Col("bits", "bits", tip="W = weight bits, A = activation bits "
                                                   "(A32 = float)"),
            Col("n", "runs"), Col("seeds", "seeds"), Col("top1", "top-1 (%)", tip="mean ± sample std over the runs"),
            Col("delta", "Δ FP32", tip="top-1 minus the FP32 top-1 of the same run, mean ± std"),
            Col("fp32", "FP32"), Col("top5", "top-5"), Col("agree", "agree FP32 (%)", tip=AGREE_TIP if partial else ""),
            *([Col("kl", "KL to FP32", tip=KL_TIP)] if partial else []),
            Col("t_quant", "quant time", tip="quantization time, mean over runs (synthetic data not included)")]
    if paper:
        cols += [Col("paper", "paper"), Col("ours_minus_paper", "ours - paper")]
    cols.append(Col("runs", "provenance", num=False))
    body, runs = [], []
    for k, c in enumerate(sec.itertuples(index=False)):  # by variant and bit setting
        line = [_td(c.variant, cls="t"), _td(c.bits, str(order[c.bits])), _td(c.n, str(c.n)),
                _td(c.n_seeds, str(c.n_seeds)), _td(rp.fmt_ms(c.top1_mean, c.top1_std, c.n), _num(c.top1_mean)),
                _td(rp.fmt_ms(c.delta_top1_mean, c.delta_top1_std, c.n, "+.2f"), _num(c.delta_top1_mean)),
                _td(rp.fmt(c.top1_fp32_mean), _num(c.top1_fp32_mean)), _td(rp.fmt(c.top5_mean), _num(c.top5_mean)),
                _td(rp.fmt_ms(c.agree_fp32_mean, c.agree_fp32_std, None) if partial else rp.fmt(c.agree_fp32_mean),
                    _num(c.agree_fp32_mean))]
        if partial:  # some views unlabelled: agreement and KL, which count every view, with their spread
            line.append(_td(rp.fmt_ms(c.kl_fp32_mean, c.kl_fp32_std, None, "#.3g"), _num(c.kl_fp32_mean)))
        line.append(_td(rp.fmt_time(c.t_quant_s_mean), _num(c.t_quant_s_mean)))
        if paper:  # NaN where a cell has no published number: shown as "-", sorted last
            diff = c.top1_mean - c.paper_top1
            line += [_td(rp.fmt(c.paper_top1), _num(c.paper_top1)), _td(rp.fmt(diff, "+.2f"), _num(diff))]
        anchor = f"runs__{sid}__{k}"
        line.append(_td(f'<a href="#{_e(anchor)}">{_n_runs(len(c.rows))}</a>', cls="t", raw=True))
        body.append("".join(line))
        runs.append(_runs(c.rows, anchor, f"{c.variant} {c.bits}: {_n_runs(len(c.rows))}", commands))
    return _table(cols, body, f"cells__{sid}"), "".join(runs)


def _paper_table(sec: pd.DataFrame, sid: str) -> str:
    table = rp.paper_table(sec)
    if table.empty:
        return ""
    keys = ("method", "bits", "ours", "paper", "ours_minus_paper", "fp32", "paper_fp32", "source")
    cols = [Col(k, h, num=k not in ("method", "bits", "source")) for k, h in zip(keys, rp.PAPER_HEADER, strict=True)]
    body = []
    for c, r in zip(sec[sec.paper_top1.notna()].itertuples(), table.itertuples(index=False), strict=True):
        vals = (None, None, c.top1_mean, c.paper_top1, c.top1_mean - c.paper_top1, c.top1_fp32_mean, c.paper_fp32, None)
        body.append("".join(_td(text, None if v is None and k in ("method", "bits", "source") else _num(v),
                                cls="t" if k in ("method", "bits", "source") else None)
                            for k, text, v in zip(keys, r, vals, strict=True)))
    return "<h3>Ours vs the published numbers (top-1 %)</h3>\n" + _table(cols, body, f"paper__{sid}")


_SVG_ID = re.compile(r'\s\bid="([^"]+)"')
_SVG_REF = re.compile(r"#([A-Za-z_][\w.-]*)")


def svg_text(fig, prefix: str) -> str:
    """``fig`` as inline SVG: text as text, no date or creator, no indentation, only the ids something
    refers to, each prefixed with ``prefix`` so that several figures share one page."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dfq_bench", "font.sans-serif": ["DejaVu Sans"]}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r" *\n *", "\n", svg)  # indentation and the line ends inside path data
    svg = re.sub(r"\n(?=[^<])", " ", svg)
    used = {m for m in _SVG_REF.findall(svg)} & set(_SVG_ID.findall(svg))
    svg = _SVG_ID.sub(lambda m: f' id="{prefix}-{m.group(1)}"' if m.group(1) in used else "", svg)
    svg = _SVG_REF.sub(lambda m: f"#{prefix}-{m.group(1)}" if m.group(1) in used else m.group(0), svg)
    return svg.strip() + "\n"


PLOT_CAPTIONS = {
    "acc_vs_bits": "Top-1 vs bit setting; error bars: std over seeds; dashed: FP32.",
    "acc_vs_time": "Top-1 vs quantization time (log scale; synthetic data not included).",
    "acc_vs_size": "Top-1 vs size: stored bits per weight, of every cell whose runs record it.",
    "kl_vs_bits": "KL(FP32 ‖ quantized) of the softmax outputs over all views vs bit setting (log scale); error "
                  "bars: std over seeds.",
}


def _plots(cells: pd.DataFrame) -> dict[str, list[str]]:
    """section id -> its figures as inline SVG, in the reporter's order."""
    out: dict[str, list[str]] = {}
    for i, (stem, fig) in enumerate(plots.figures(cells)):
        kind, sid = stem.split("__", 1)
        out.setdefault(sid, []).append(f'<figure id="fig-{_e(stem)}">{svg_text(fig, f"f{i}")}'
                                       f"<figcaption>{_e(PLOT_CAPTIONS.get(kind, kind))}</figcaption></figure>\n")
    return out


def _failed_table(rows: rp.Rows, commands: Commands) -> tuple[str, str]:
    cols = [Col("run_id", "run_id", num=False), Col("model", "model", num=False),
            Col("dataset", "dataset", num=False), Col("method", "method", num=False), Col("bits", "bits", num=False),
            Col("seed", "seed"), Col("error", "error", num=False), Col("runs", "provenance", num=False)]
    body, runs = [], []
    for k, r in enumerate(rows.failed):
        seed, anchor = r.get("seed"), f"failed__{k}"
        body.append(_td(rp.rid_of(r), cls="t") + "".join(_td(r.get(k), cls="t") for k in ("model", "dataset", "method"))
                    + _td(rp._bits_text(r), cls="t") + _td(seed, _num(seed) if isinstance(seed, int) else "")
                    + _td(rp._error_text(r, 1000), cls="t err")
                    + _td(f'<a href="#{anchor}">provenance</a>', cls="t", raw=True))
        runs.append(_runs([r], anchor, f"{rp.rid_of(r)} ({r.get('method')} {rp._bits_text(r)}, seed {seed})",
                          commands))
    return _table(cols, body, "failed"), "".join(runs)


# --- the page -----------------------------------------------------------------------------------


def page(rows: rp.Rows, cells: pd.DataFrame, title: str, sources: list[str], make_plots: bool = True) -> str:
    """The HTML page of ``rows`` (as the reporter read them) and their ``cells``."""
    sections = dict(list(rp.sections(cells)))
    summary = {"title": title, "runs": len(rows.ok), "failed": len(rows.failed), "superseded": rows.n_superseded,
               "sections": [f"{m} / {d}" for m, d in sections],
               "methods": sorted(set(cells.method))}
    figs = _plots(cells) if make_plots and len(cells) else {}
    commands = Commands()
    out = io.StringIO()
    out.write(f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
              f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
              f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n"
              f'<script type="application/json" id="summary">{_e(json.dumps(summary, sort_keys=True))}</script>\n'
              f"</head>\n<body>\n<h1>{_e(title)}</h1>\n")
    out.write(f'<p id="counts">Made by <code>python -m dfq_bench.report</code> from <b>{len(rows.ok)}</b> finished '
              f"runs ({len(rows.failed)} failed, {rows.n_superseded} superseded rows) in "
              + ", ".join(f"<code>{_e(s)}</code>" for s in sources) + ". Each cell pools the runs of one method at "
              "one bit setting over seeds (mean ± sample std, number of runs in brackets); runs differing in "
              "anything else recorded are separate lines. Click a column header to sort.</p>\n")
    nav = [f'<a href="#{_e(_section_id(m, d))}">{_e(m)} / {_e(d)}</a>' for m, d in sections]
    if rows.failed:
        nav.append(f'<a href="#failed-runs">failed runs ({len(rows.failed)})</a>')
    out.write("<nav>" + "".join(nav) + "</nav>\n")
    if rows.warnings:
        out.write(f"<details><summary>{len(rows.warnings)} warnings of the reporter</summary><ul>"
                  + "".join(f"<li><code>{_e(w)}</code></li>" for w in rows.warnings) + "</ul></details>\n")
    for (model, dataset), sec in sections.items():
        sid = _section_id(model, dataset)
        out.write(f'<section id="{_e(sid)}">\n<h2>{_e(model)} / {_e(dataset)}</h2>\n')
        if sec.partial.any():
            out.write(f'<p class="note">{_e(rp.PARTIAL_NOTE.replace("`", ""))}</p>\n')
        out.write("<h3>Top-1 (%) by bit setting, mean ± std over seeds (runs)</h3>\n")
        out.write(_pivot_table(sec, sid))
        out.write("<h3>Every method and bit setting</h3>\n")
        table, runs = _cells_table(sec, sid, commands)
        out.write(table)
        if figs.get(sid):
            out.write('<div class="plots">\n' + "".join(figs[sid]) + "</div>\n")
        out.write(_paper_table(sec, sid))
        out.write("<h3>The runs of each cell: provenance and the command that reproduces each</h3>\n" + runs)
        out.write("</section>\n")
    if rows.failed:
        out.write(f'<section id="failed-runs">\n<h2>Failed runs ({len(rows.failed)})</h2>\n'
                  '<p class="note">Run_ids without any ok row: the last row of each.</p>\n')
        table, runs = _failed_table(rows, commands)
        out.write(table + runs + "</section>\n")
    out.write(f"<script>{JS}</script>\n</body>\n</html>\n")
    return out.getvalue()


def write_page(rows: rp.Rows, cells: pd.DataFrame, out_dir: Path, title: str, sources: list[str],
               make_plots: bool = True) -> Path:
    path = Path(out_dir) / PAGE
    text = page(rows, cells, title, sources, make_plots)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


# --- the index ----------------------------------------------------------------------------------

_SUMMARY = re.compile(r'<script type="application/json" id="summary">(.*?)</script>', re.S)


def _page_summary(path: Path) -> dict | None:
    m = _SUMMARY.search(path.read_text(encoding="utf-8"))
    if not m:
        return None
    from html import unescape

    return json.loads(unescape(m.group(1)))


def _heading(path: Path) -> str | None:
    """The first Markdown heading of ``path``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return None


def index(root: Path) -> str:
    """The index of the results pages one level under ``root`` (``<dir>/index.html``), with each
    directory's notes (``<dir>.md``, ``<dir>/README.md``, ``<dir>/SWEEP.md``) linked."""
    root = Path(root)
    body = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        summary = _page_summary(d / PAGE) if (d / PAGE).is_file() else None
        if summary is None:
            continue
        notes = [n for n in (root / f"{d.name}.md", d / "README.md", d / "SWEEP.md") if n.is_file()]
        what = next((_heading(n) for n in notes if n.name != "SWEEP.md" and _heading(n)), "-")
        links = ", ".join(f'<a href="{_e(n.relative_to(root).as_posix())}">{_e(n.relative_to(root).as_posix())}</a>'
                          for n in notes)
        body.append(f'<td class="t"><a href="{_e(d.name)}/{PAGE}">{_e(d.name)}</a></td>'
                    f'<td class="t">{_e(what)}</td>'
                    f'<td data-v="{summary["runs"]}">{summary["runs"]}</td>'
                    f'<td data-v="{summary["failed"]}">{summary["failed"]}</td>'
                    f'<td class="t">{_e(", ".join(summary["sections"]))}</td>'
                    f'<td class="t">{_e(", ".join(summary["methods"]))}</td><td class="t">{links or "-"}</td>')
    cols = [Col("dir", "results", num=False), Col("title", "what", num=False), Col("runs", "runs"),
            Col("failed", "failed"), Col("sections", "models / datasets", num=False),
            Col("methods", "methods", num=False), Col("notes", "notes", num=False)]
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>dfq_bench results</title>\n<style>{CSS}td{{white-space:normal}}</style>\n</head>\n<body>\n"
            "<h1>dfq_bench results</h1>\n<p>One page per results directory, made by <code>python -m "
            "dfq_bench.report</code> from its <code>runs.jsonl</code>: tables sortable by any column, plots, and "
            "every run with its provenance and command. The pages open offline.</p>\n"
            + _table(cols, body, "pages") + f"<script>{JS}</script>\n</body>\n</html>\n")


def write_index(root: str | Path) -> Path:
    path = Path(root) / PAGE
    text = index(Path(root))
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
