"""The results page (results/html.py) in headless Chromium: the DOM after its script ran holds the numbers
of the rows (computed here from the rows, independently of the reporter), sorting a column reorders the
lines, failed runs are listed apart, every run is listed with its provenance and command, a screenshot is
a real image; and the committed page of results/reference is reproduced by the reporter and opens offline
with its 210 runs.

Chromium is Debian's ``chromium`` (scripts/setup.sh installs it where apt-get exists). Without it these
tests skip, except under CI (``CI`` set), where a missing browser is a failure.
"""

import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import REPO

from dfq_bench.results import append_row, html, report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
REFERENCE = REPO / "results" / "reference"
COMMON = {"name": "common", "fold_bn": True, "first_wbits": 8}


def chromium() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium in CI: scripts/setup.sh installs Debian's chromium (apt-get, as root)")
        pytest.skip("no chromium on this machine (scripts/setup.sh installs Debian's chromium where apt-get exists)")
    return found


def browse(page: Path, fragment: str, profile: Path, *flags: str) -> str:
    """Opens ``page#fragment`` in headless Chromium, offline (every host name fails to resolve), and
    returns its stdout (the DOM after the scripts ran, with --dump-dom)."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--disable-background-networking", "--disable-component-update", "--host-resolver-rules=MAP * ~NOTFOUND",
           f"--user-data-dir={profile}", *flags, page.resolve().as_uri() + fragment]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def dom(page: Path, fragment: str, profile: Path) -> "Dom":
    text = browse(page, fragment, profile, "--dump-dom")
    assert "<table" in text, text[:500]
    return Dom(text)


class Dom(HTMLParser):
    """The tables of a dumped DOM: ``tables[id]`` = (header cells' attributes, rows of (text, data-v));
    ``runs`` = the ``data-run`` of every run line; ``svgs`` = how many inline SVGs."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, tuple[list[dict], list[list[tuple[str, str | None]]]]] = {}
        self.runs: list[str] = []
        self.commands: dict[str, str] = {}
        self.svgs = 0
        self._stack: list[str] = []  # open tables' ids
        self._cell: list[str] | None = None
        self._v: str | None = None
        self._run: str | None = None
        self._col = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.svgs += 1
        elif tag == "table":
            self._stack.append(a.get("id") or "")
            self.tables.setdefault(self._stack[-1], ([], []))
        elif tag == "tr" and self._stack:
            if "data-run" in a:
                self._run, self._col = a["data-run"], 0
                self.runs.append(self._run)
            elif a.get("class") != "run":
                self._run = None
            if self._stack[-1]:
                self.tables[self._stack[-1]][1].append([])
        elif tag in ("td", "th") and self._stack:
            self._cell, self._v = [], a.get("data-v")
            if tag == "th" and self._stack[-1]:
                self.tables[self._stack[-1]][0].append(a)

    def handle_endtag(self, tag):
        if tag == "table" and self._stack:
            self._stack.pop()
        elif tag in ("td", "th") and self._cell is not None:
            text = " ".join("".join(self._cell).split())
            if self._run is not None:
                self._col += 1
                if self._col == len(html.RUN_HEADER):
                    self.commands[self._run] = text
            if tag == "td" and self._stack and self._stack[-1]:
                self.tables[self._stack[-1]][1][-1].append((text, self._v))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def column(self, table: str, key: str) -> list[str]:
        head, rows = self.tables[table]
        i = [h.get("data-key") for h in head].index(key)
        return [r[i][0] for r in rows if r]

    def sorted_as(self, table: str, key: str) -> str | None:
        head, _ = self.tables[table]
        return next(h.get("aria-sort") for h in head if h.get("data-key") == key)


def make_row(run_id, method="rtn", wbits=4, abits=4, seed=0, top1=50.0, fp32=60.0, status="ok", **kw):
    row = {
        "run_id": run_id, "status": status, "error": None if status == "ok" else "RuntimeError: boom <b>\nmore",
        "method": method, "method_version": "1", "model": "net_a", "dataset": "ds_1", "wbits": wbits,
        "abits": abits, "seed": seed, "protocol": COMMON, "method_cfg": {"name": method},
        "data": {"name": "noise"} if abits is not None else None, "weights": "w0", "n_eval": 100,
        "top1": top1 if status == "ok" else None, "top5": top1 + 10 if status == "ok" else None,
        "top1_fp32": fp32 if status == "ok" else None, "agree_fp32": 90.0, "kl_fp32": 0.1,
        "t_quant_s": 0.5 * wbits, "t_synth_s": 0.0, "t_total_s": 1.0, "git_sha": f"{seed:040x}",
        "git_dirty": seed == 1, "versions": {"torch": "2.14.1", "python": "3.11.7"}, "device_name": "cpu X",
        "started_at": f"2026-01-0{seed + 1}T00:00:00+00:00",
    }
    row.update(kw)
    return row


ROWS = [
    *(make_row(f"rtn-44-{s}", seed=s, top1=t) for s, t in enumerate([50.0, 52.0, 57.0])),
    make_row("rtn-88", wbits=8, abits=8, top1=59.5, command="python -m dfq_bench method=rtn wbits=8 abits=8"),
    make_row("rtn-4w", abits=None, top1=58.0),
    make_row("rtn-2w", wbits=2, abits=None, top1=20.0, fp32=61.0),
    make_row("sq-44", method="squant", top1=55.25,
             paper={"source": "Paper T1", "fp32": 71.5, "top1": {"squant": {"W4A4": 56.25}}}),
    make_row("sq-88", method="squant", wbits=8, abits=8, top1=59.75),
    make_row("zq-44", method="zeroq", status="failed"),
]


def expected_cells(rows):
    """(method, bits) -> (top-1 text, delta text, top-1 mean), from the rows alone."""
    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[(r["method"], f"W{r['wbits']}A{r['abits'] or 32}")].append(r)

    def ms(vals, spec):
        m = statistics.mean(vals)
        s = f"{format(m, spec)} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else format(m, spec)
        return f"{s} ({len(vals)})", m

    out = {}
    for key, rs in groups.items():
        top1, mean = ms([r["top1"] for r in rs], ".2f")
        delta, _ = ms([r["top1"] - r["top1_fp32"] for r in rs], "+.2f")
        out[key] = (top1, delta, mean)
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    (tmp / "in").mkdir()
    for r in ROWS:
        append_row(tmp / "in", r)
    report.report([tmp / "in" / "runs.jsonl"], tmp / "out", title="test page <&>")
    return tmp


def test_the_page_holds_the_rows_numbers_and_sorting_a_column_reorders_them(made):
    page, profile = made / "out" / html.PAGE, made / "profile"
    want = expected_cells(ROWS)
    table = "cells__net_a__ds_1"
    for direction in ("desc", "asc"):
        d = dom(page, f"#sort=top1:{direction}", profile)
        assert d.sorted_as(table, "top1") == ("descending" if direction == "desc" else "ascending")  # JS ran
        lines = list(zip(d.column(table, "method"), d.column(table, "bits"), d.column(table, "top1"),
                         d.column(table, "delta"), strict=True))
        assert {(m, b): (t, dl) for m, b, t, dl in lines} == {k: v[:2] for k, v in want.items()}
        order = sorted(want, key=lambda k: want[k][2], reverse=direction == "desc")
        assert [(m, b) for m, b, *_ in lines] == order
    # a click sorts too (numbers: high first), a second click the other way
    clicked = made / "clicked.html"
    click = f"document.querySelector('#{table} th[data-key=top1]').click();"
    clicked.write_text(page.read_text().replace("</body>", f"<script>{click}</script>\n</body>"))
    d = dom(clicked, "", profile)
    assert d.sorted_as(table, "top1") == "descending"
    assert d.column(table, "top1")[0] == want[max(want, key=lambda k: want[k][2])][0]
    clicked.write_text(page.read_text().replace("</body>", f"<script>{click * 2}</script>\n</body>"))
    d = dom(clicked, "", profile)
    assert d.sorted_as(table, "top1") == "ascending"
    assert d.column(table, "top1")[0] == want[min(want, key=lambda k: want[k][2])][0]
    # a text column sorts alphabetically; the pivot (methods x bit settings) sorts by its columns too
    d = dom(page, "#sort=method:desc", profile)
    assert d.column(table, "method") == sorted(d.column(table, "method"), reverse=True)
    assert d.column("pivot__net_a__ds_1", "method") == ["squant", "rtn"]
    d = dom(page, "#sort=W8A8:asc", profile)
    pivot = dict(zip(d.column("pivot__net_a__ds_1", "method"), d.column("pivot__net_a__ds_1", "W4A4"), strict=True))
    assert pivot == {"rtn": want[("rtn", "W4A4")][0], "squant": want[("squant", "W4A4")][0]}
    assert d.column("pivot__net_a__ds_1", "method") == ["rtn", "squant"]  # W8A8: 59.50 < 59.75
    assert d.column("pivot__net_a__ds_1", "W2A32") == [want[("rtn", "W2A32")][0], ""]
    # the published number beside ours, failed runs apart, every run with its provenance and command
    assert d.column("paper__net_a__ds_1", "paper") == ["56.25"] and d.column("paper__net_a__ds_1",
                                                                              "ours_minus_paper") == ["-1.00"]
    assert d.column("failed", "run_id") == ["zq-44"] and d.column("failed", "error") == ["RuntimeError: boom <b>"]
    assert "zq-44" not in d.column(table, "method") and ("zeroq", "W4A4") not in want
    assert sorted(d.runs) == sorted(r["run_id"] for r in ROWS)
    assert d.commands["rtn-88"] == ROWS[3]["command"]
    try:
        import dfq_bench.run.command  # noqa: F401  (another source of commands, where it exists)
    except ImportError:
        assert d.commands["rtn-44-0"] == html.NOT_RECORDED
    assert d.svgs == 2  # accuracy vs bits and vs time; no run records a size
    text = page.read_text()
    assert "<title>test page &lt;&amp;&gt;</title>" in text and "dirty" in text and "2.14.1" in text
    assert not re.search(r"""(src|href)=["']?(https?:)?//|@import|url\(["']?https?:""", text)  # self-contained


def test_a_screenshot_of_the_page_is_an_image_of_it(made):
    shot = made / "shot.png"
    browse(made / "out" / html.PAGE, "#open=all", made / "profile", "--hide-scrollbars", "--window-size=1000,900",
           f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1000, 900)
    from PIL import Image

    with Image.open(shot) as im:
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # text, table rules and plots, not a blank page


def test_the_committed_reference_page_is_reproduced_and_opens_offline_with_its_210_runs(tmp_path, monkeypatch):
    committed = REFERENCE / html.PAGE
    monkeypatch.chdir(REPO)  # the page names its rows file as given: results/reference/runs.jsonl
    report.report([Path("results/reference/runs.jsonl")], tmp_path, tables=False, title="dfq_bench results: reference")
    made, kept = (tmp_path / html.PAGE).read_text(), committed.read_text()
    svg = re.compile(r"<svg.*?</svg>", re.S)  # the plots: matplotlib's SVG, as exact as its PNGs (not checked)
    assert svg.sub("<svg/>", made) == svg.sub("<svg/>", kept)
    assert len(svg.findall(kept)) == 6
    rows = [r for r in report.load([REFERENCE / "runs.jsonl"]).ok]
    assert len(rows) == 210
    d = dom(committed, "#sort=top1:desc", tmp_path / "profile")
    assert sorted(d.runs) == sorted(r["run_id"] for r in rows)
    for model in ("resnet20_fmnist", "mobilenetv2_fmnist", "vgg_fmnist"):
        table = f"cells__{model}__fashion_mnist"
        want = expected_cells([r for r in rows if r["model"] == model])
        shown = dict(zip(zip(d.column(table, "method"), d.column(table, "bits"), strict=True),
                         d.column(table, "top1"), strict=True))
        assert shown == {k: v[0] for k, v in want.items()}, model
        means = [float(t.split()[0]) for t in d.column(table, "top1")]
        assert means == sorted(means, reverse=True)
    assert d.svgs == 6


def test_html_only_no_html_the_index_and_the_size_plot(tmp_path):
    runs = tmp_path / "in"
    runs.mkdir()
    sized = [make_row("u4", abits=None, top1=58.0, eff_wbits=4.3), make_row("u3", wbits=3, abits=None, eff_wbits=3.4),
             make_row("mp4", method="rex", abits=None, top1=59.0, eff_wbits=5.1)]
    for r in (*ROWS[:3], *sized):  # without provenance: no command rebuilt (no torch import in the CLI)
        append_row(runs, {k: v for k, v in r.items() if k not in ("git_sha", "versions")})
    base = [sys.executable, "-m", "dfq_bench.report", str(runs / "runs.jsonl")]
    ok = subprocess.run([*base, "--out", str(tmp_path / "a" / "x"), "--html"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "a" / "x").iterdir()) == [html.PAGE]
    page = (tmp_path / "a" / "x" / html.PAGE).read_text()
    assert "<title>dfq_bench results: in</title>" in page and page.count("<svg") == 3  # bits, time, size (rex at W4A32)
    assert 'id="fig-acc_vs_size__net_a__ds_1"' in page
    no = subprocess.run([*base, "--out", str(tmp_path / "b"), "--no-html", "--no-plots", "--index",
                         str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    assert no.returncode == 0, no.stderr
    assert html.PAGE not in {p.name for p in (tmp_path / "b").iterdir()}
    index = (tmp_path / "a" / html.PAGE).read_text()
    assert '<a href="x/index.html">x</a>' in index and '<td data-v="6">6</td>' in index
    report.report([runs / "runs.jsonl"], tmp_path / "c", make_plots=True)
    assert (tmp_path / "c" / "acc_vs_size__net_a__ds_1.png").is_file() and (tmp_path / "c" / html.PAGE).is_file()
    # uniform runs only (their size follows from their bits): no size plot
    (runs / "runs.jsonl").write_text("")
    for r in (*ROWS[:3], *sized[:2]):
        append_row(runs, {k: v for k, v in r.items() if k not in ("git_sha", "versions")})
    report.report([runs / "runs.jsonl"], tmp_path / "d", tables=False)
    assert (tmp_path / "d" / html.PAGE).read_text().count("<svg") == 2
