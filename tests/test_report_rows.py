"""The reporter under bad rows: each bad line is one ``file:line: reason`` warning and is skipped, the
tables are still written from the good rows, an ok row without top1 is not counted, and ``--out``
pointing at a file is a one-line error."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

COMMON = {"name": "common", "fold_bn": True, "first_wbits": 8}


def make_row(run_id, seed=0, top1=50.0, **kw):  # the shape of tests/test_report.py's rows
    row = {
        "run_id": run_id, "status": "ok", "error": None, "method": "rtn", "method_version": "1", "model": "net_a",
        "dataset": "ds_1", "wbits": 4, "abits": 4, "seed": seed, "protocol": COMMON, "method_cfg": {"name": "rtn"},
        "data": {"name": "noise", "num_samples": 8}, "weights": "w0", "n_eval": 100, "top1": top1,
        "top5": top1 + 10, "top1_fp32": 60.0, "delta_top1": 999.0, "agree_fp32": 90.0, "kl_fp32": 0.1,
        "t_quant_s": 0.5, "t_synth_s": 0.0, "t_total_s": 1.0,
    }
    row.update(kw)
    return row


def line(row) -> bytes:
    return json.dumps(row).encode() + b"\n"


def without(row, key):
    return {k: v for k, v in row.items() if k != key}


GOOD = [line(make_row("g0", seed=0, top1=50.0)), line(make_row("g1", seed=1, top1=54.0))]
# the good rows pooled: top1 50 and 54 -> 52.00 ± 2.83 (2); a bad row of seed 2 must not enter the cell
GOOD_CELL = "| rtn | 60.00 | 52.00 ± 2.83 (2) |"
BAD = {  # case -> (line, the reason the warning must give)
    "missing model": (line(without(make_row("b", seed=2), "model")), "missing field: model"),
    "missing run_id": (line(without(make_row("b", seed=2), "run_id")), "missing field: run_id"),
    "top1 a string": (line(make_row("b", seed=2, top1=0.0) | {"top1": "55.0"}), "top1='55.0' is a string"),
    "wbits a string": (line(make_row("b", seed=2, wbits="4")), "wbits='4' is a string"),
    "t_quant_s a string": (line(make_row("b", seed=2, t_quant_s="fast")), "t_quant_s='fast' is a string"),
    "invalid UTF-8": (line(make_row("b", seed=2, weights="XX")).replace(b"XX", b"\xff\xfe"), "invalid UTF-8"),
    "a JSON array": ([1, 2], "not a JSON object but an array"),
    "a JSON string": ("row", "not a JSON object but a string"),
    "JSON null": (None, "not a JSON object but null"),
    "ok row without top1": (line(make_row("b", seed=2, top1=0.0) | {"top1": None}), "an ok row without top1"),
    "ok row, top1 missing": (line(without(make_row("b", seed=2), "top1")), "an ok row without top1"),
}


def encoded(x) -> bytes:
    return x if isinstance(x, bytes) else line(x)


def run_report(runs: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfq_bench.report", str(runs), "--out", str(out), "--no-plots"],
                          capture_output=True, text=True, timeout=120)


def warnings_of(res) -> list[str]:
    return [x for x in res.stderr.splitlines() if x.startswith("warning: ")]


def cell_n(out: Path) -> int:
    with open(out / "summary.csv", newline="") as f:
        (cell,) = [r for r in csv.DictReader(f) if r["bits"] == "W4A4"]
    return int(cell["n"])


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_row_is_one_warning_with_its_line_and_the_good_rows_make_the_tables(case, tmp_path):
    bad, reason = BAD[case]
    runs = tmp_path / "runs.jsonl"
    runs.write_bytes(GOOD[0] + encoded(bad) + GOOD[1])
    res = run_report(runs, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    (warning,) = warnings_of(res)
    assert warning.startswith(f"warning: {runs}:2: ") and reason in warning, warning
    assert "Traceback" not in res.stderr
    assert GOOD_CELL in (tmp_path / "out" / "tables.md").read_text()
    assert cell_n(tmp_path / "out") == 2
    assert "2 finished runs, 0 failed" in res.stdout


def test_all_bad_cases_in_one_file(tmp_path):
    runs = tmp_path / "runs.jsonl"
    lines = [GOOD[0], *(encoded(b) for b, _ in BAD.values()), b'{"run_id": "torn", "top1": 1\n', GOOD[1]]
    runs.write_bytes(b"".join(lines))
    res = run_report(runs, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    got = warnings_of(res)
    bad_lines = range(2, len(lines))  # every line but the first and the last
    assert [w.split(": ", 2)[1] for w in got] == [f"{runs}:{n}" for n in bad_lines], got
    for w, (_, reason) in zip(got, BAD.values(), strict=False):
        assert reason in w, w
    assert "corrupt row skipped" in got[-1]
    md = (tmp_path / "out" / "tables.md").read_text()
    assert GOOD_CELL in md and "from 2 finished runs (0 failed" in md
    assert "None" not in md  # no section for the row without a model
    assert cell_n(tmp_path / "out") == 2


def test_an_ok_row_without_top1_leaves_the_earlier_ok_row_of_its_run_id_standing(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_bytes(GOOD[0] + GOOD[1] + line(make_row("g1", seed=1) | {"top1": None}))
    res = run_report(runs, tmp_path / "out")
    assert res.returncode == 0 and len(warnings_of(res)) == 1, res.stderr
    assert GOOD_CELL in (tmp_path / "out" / "tables.md").read_text()


def test_out_pointing_at_a_file_is_a_one_line_error_and_writes_nothing(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_bytes(b"".join(GOOD))
    out = tmp_path / "taken"
    out.write_text("mine\n")
    res = run_report(runs, out)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: --out={str(out)!r} is a file; valid: a directory (created if missing)"]
    assert out.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["runs.jsonl", "taken"]


def test_odd_values_in_fields_the_reporter_only_labels_by_do_not_crash_it(tmp_path):
    runs = tmp_path / "runs.jsonl"
    odd = [make_row("o1", seed=2, weights=["w", 1]), make_row("o2", seed=3, protocol={"name": [1]}),
           make_row("o3", seed=4, paper={"top1": [1], "fp32": "x"}),
           make_row("o4", seed=5, paper={"top1": {"rtn": {"W4A4": "56"}}, "source": ["T1"]})]
    runs.write_bytes(b"".join(GOOD) + b"".join(line(r) for r in odd))
    res = run_report(runs, tmp_path / "out")
    assert res.returncode == 0 and not warnings_of(res), res.stderr
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "from 6 finished runs" in md and "| rtn | 60.00 | 52.00 ± 2.83 (2) |" not in md  # its own variants
    assert "weights=['w', 1]" in md and "Ours vs the published numbers" not in md  # no usable paper number
