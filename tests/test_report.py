"""The reporter: dedup of reruns, pooling over seeds, variants, deltas, failed runs, corrupt lines,
byte-for-byte determinism, the committed reference tables, and wandb (offline)."""

import csv
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from dfq_bench.results import SCHEMA, append_row, report, row_problem

COMMON = {"name": "common", "fold_bn": True, "first_wbits": 8}
PAPER_PROTO = {"name": "squant_paper", "fold_bn": False, "first_wbits": None}


def make_row(run_id, method="rtn", wbits=4, abits=4, seed=0, top1=50.0, fp32=60.0, status="ok", **kw):
    row = {
        "run_id": run_id, "status": status, "error": None if status == "ok" else "RuntimeError: boom | x\nmore",
        "method": method, "method_version": "1", "model": "net_a", "dataset": "ds_1", "wbits": wbits,
        "abits": abits, "seed": seed, "protocol": COMMON, "method_cfg": {"name": method},
        "data": {"name": "noise", "num_samples": 8} if abits is not None else None, "weights": "w0",
        "n_eval": 100, "top1": top1 if status == "ok" else None, "top5": None if status != "ok" else top1 + 10,
        "top1_fp32": fp32 if status == "ok" else None, "delta_top1": 999.0,  # the reporter recomputes it
        "agree_fp32": 90.0, "kl_fp32": 0.1, "t_quant_s": 0.5, "t_synth_s": 0.0, "t_total_s": 1.0,
    }
    row.update(kw)
    return row


def write(path: Path, rows, corrupt_after=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        append_row(path.parent, r)
        if corrupt_after == i:
            with open(path, "a") as f:
                f.write('{"run_id": "torn", "top1": 1\n')


@pytest.fixture
def runs(tmp_path):
    rows = []
    # rtn W4A4: 3 seeds; the seed-2 run first failed, then succeeded (the ok row must win)
    rows.append(make_row("rtn-4-4-2", seed=2, status="failed"))
    for seed, top1 in enumerate([50.0, 52.0, 57.0]):
        rows.append(make_row(f"rtn-4-4-{seed}", seed=seed, top1=top1))
    # rtn W4A32 (weight-only): one seed; an earlier ok row of the same run_id is replaced by the later one
    rows.append(make_row("rtn-4-w", abits=None, top1=10.0))
    rows.append(make_row("rtn-4-w", abits=None, top1=58.0))
    # rtn W2A32 and W8A8: ordering of the columns
    rows.append(make_row("rtn-2-w", wbits=2, abits=None, top1=20.0))
    rows.append(make_row("rtn-8-8", wbits=8, abits=8, top1=59.5))
    # squant under two protocols at W4A4: two variants, not pooled
    rows.append(make_row("sq-c", method="squant", top1=55.0))
    rows.append(make_row("sq-p", method="squant", top1=54.0, protocol=PAPER_PROTO,
                         paper={"source": "Paper T1", "fp32": 71.5, "top1": {"squant": {"W4A4": 56.25}}}))
    # a run that only ever failed, and an ok run followed by a failed rerun (the ok row stands)
    rows.append(make_row("zq-fail", method="zeroq", status="failed"))
    rows.append(make_row("rtn-8-8", wbits=8, abits=8, status="failed"))
    path = tmp_path / "in" / "runs.jsonl"
    write(path, rows, corrupt_after=3)
    return path


def summary_rows(out: Path):
    with open(out / "summary.csv", newline="") as f:
        return {(r["variant"], r["bits"]): r for r in csv.DictReader(f)}


def test_pooling_dedup_deltas_variants_and_failures(runs, tmp_path):
    rows, written = report.report([runs], tmp_path / "out", make_plots=False)
    out = tmp_path / "out"
    assert len(rows.ok) == 8 and [r["run_id"] for r in rows.failed] == ["zq-fail"]
    assert rows.n_superseded == 3  # failed-then-ok, ok-then-ok, ok-then-failed
    assert rows.warnings == [f"{runs}:5: corrupt row skipped (Expecting ',' delimiter)"]
    s = summary_rows(out)
    cell = s[("rtn", "W4A4")]
    vals = [50.0, 52.0, 57.0]
    assert (int(cell["n"]), int(cell["n_seeds"])) == (3, 3)
    assert float(cell["top1_mean"]) == pytest.approx(statistics.mean(vals), abs=1e-4)
    assert float(cell["top1_std"]) == pytest.approx(statistics.stdev(vals), abs=1e-4)
    assert float(cell["delta_top1_mean"]) == pytest.approx(statistics.mean(vals) - 60.0, abs=1e-4)
    assert float(s[("rtn", "W4A32")]["top1_mean"]) == 58.0 and s[("rtn", "W4A32")]["top1_std"] == ""
    assert float(s[("rtn", "W8A8")]["top1_mean"]) == 59.5
    # squant's two protocols are two variants named by the protocol preset
    assert float(s[("squant protocol=common", "W4A4")]["top1_mean"]) == 55.0
    paper = s[("squant protocol=squant_paper", "W4A4")]
    assert (float(paper["paper_top1"]), float(paper["ours_minus_paper"])) == (56.25, -2.25)
    md = (out / "tables.md").read_text()
    assert "| rtn | 60.00 | 20.00 (1) | 58.00 (1) | 53.00 ± 3.61 (3) | 59.50 (1) |" in md
    assert "| method | FP32 | W2A32 | W4A32 | W4A4 | W8A8 |" in md
    assert "| squant protocol=squant_paper | W4A4 | 54.00 (1) | 56.25 | -2.25 | 60.00 | 71.50 | Paper T1 |" in md
    assert "| zq-fail | net_a | ds_1 | zeroq | W4A4 | 0 | RuntimeError: boom \\| x |" in md
    assert "rtn-8-8" not in md  # its failed rerun is superseded by the ok row
    tex = (out / "tables.tex").read_text()
    assert r"net\_a" in tex and r"53.00$\pm$3.61" in tex and r"squant protocol=squant\_paper" in tex
    with open(out / "failed.csv", newline="") as f:
        assert [r["run_id"] for r in csv.DictReader(f)] == ["zq-fail"]


def test_output_is_byte_for_byte_deterministic(runs, tmp_path):
    report.report([runs], tmp_path / "a")
    report.report([runs], tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {"acc_vs_bits__net_a__ds_1.png", "acc_vs_time__net_a__ds_1.pdf", "tables.md"} <= set(files)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    pdf = (tmp_path / "a" / "acc_vs_bits__net_a__ds_1.pdf").read_bytes()
    png = (tmp_path / "a" / "acc_vs_bits__net_a__ds_1.png").read_bytes()
    assert b"CreationDate" not in pdf and b"Matplotlib" not in pdf
    assert png.startswith(b"\x89PNG") and b"Software" not in png and b"matplotlib" not in png.lower()


def test_cli_warns_about_corrupt_lines_and_goes_on(runs, tmp_path):
    res = subprocess.run([sys.executable, "-m", "dfq_bench.report", str(runs), "--out", str(tmp_path / "o"),
                          "--no-plots"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"warning: {runs}:5: corrupt row skipped" in res.stderr
    assert "8 finished runs, 1 failed, 3 superseded rows" in res.stdout
    assert (tmp_path / "o" / "tables.md").exists() and not list((tmp_path / "o").glob("*.png"))
    bad = subprocess.run([sys.executable, "-m", "dfq_bench.report", str(tmp_path / "nope.jsonl"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {str(tmp_path / 'nope.jsonl')!r} is not a file; valid: a runs.jsonl written by dfq_bench"]


def test_several_files_later_ones_win(tmp_path):
    write(tmp_path / "a" / "runs.jsonl", [make_row("x", top1=10.0), make_row("y", seed=1, top1=30.0)])
    write(tmp_path / "b" / "runs.jsonl", [make_row("x", top1=20.0)])
    report.report([tmp_path / "a" / "runs.jsonl", tmp_path / "b" / "runs.jsonl"], tmp_path / "o", make_plots=False)
    cell = summary_rows(tmp_path / "o")[("rtn", "W4A4")]
    assert float(cell["top1_mean"]) == 25.0 and cell["n"] == "2"  # x=20 (later file) and y=30


REFERENCE = REPO / "results" / "reference"


def test_committed_reference_tables_are_reproduced_byte_for_byte(tmp_path):
    assert len((REFERENCE / "runs.jsonl").read_text().splitlines()) >= 210  # the committed reference sweep
    report.report([REFERENCE / "runs.jsonl"], tmp_path, make_plots=False)
    for name in ("tables.md", "tables.tex", "summary.csv", "failed.csv"):
        assert (tmp_path / name).read_bytes() == (REFERENCE / name).read_bytes(), name


def test_wandb_offline_logs_every_row_field_and_the_plots(runs, tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb")
    from dfq_bench.run.loggers import flatten, log_report, log_row

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    row = make_row("wb-1", top1=12.3456)
    log_row({"name": "wandb", "project": "dfq_test", "tags": ["t"]}, row)
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, caplog.text  # a failed wandb call is only a warning in log_row
    # wandb's offline record log (protobuf, strings stored plainly) is written by its service process,
    # which may still be flushing when finish() returns (seen in a full CI run): teardown waits for it.
    import wandb

    wandb.teardown()
    deadline = time.time() + 60
    while b"wb-1" not in run_files[0].read_bytes() and time.time() < deadline:
        time.sleep(0.2)
    blob = run_files[0].read_bytes()
    for key, value in flatten(row).items():
        assert key.encode() in blob, key
        if isinstance(value, str):
            assert value.split("\n")[0].encode() in blob, key
    assert b"12.3456" in blob and b"wb-1" in blob

    report.report([runs], tmp_path / "rep")
    log_report(tmp_path / "rep", project="dfq_test")
    images = (tmp_path / "wandb").glob("offline-run-*/files/media/images/**/*.png")
    media = sorted(p.name.split("__")[0] for p in images)
    assert media == ["acc_vs_bits", "acc_vs_time"], caplog.text  # the one (model, dataset) of the rows
    (table,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/summary_*.table.json")
    with open(tmp_path / "rep" / "summary.csv", newline="") as f:
        expected = list(csv.reader(f))
    logged = json.loads(table.read_text())
    assert logged["columns"] == expected[0] and len(logged["data"]) == len(expected) - 1


def test_a_cells_mean_is_the_exactly_rounded_sum_over_its_runs(tmp_path):
    """A cell's mean is math.fsum / n (statistics.fmean): of these four top-1s 42.845 - 1e-15, 42.84 at two
    decimals, where a compensated running sum (pandas' mean) gives 42.845000000000006, 42.85. The page holds the
    mean in full (data-v)."""
    vals = [39.53, 57.65, 34.03, 40.17]
    write(tmp_path / "in" / "runs.jsonl", [make_row(f"s{i}", seed=i, top1=v) for i, v in enumerate(vals)])
    report.report([tmp_path / "in" / "runs.jsonl"], tmp_path / "out", make_plots=False)
    mean = statistics.fmean(vals)
    cell = f"{mean:.2f} ± {statistics.stdev(vals):.2f} (4)"
    assert cell.startswith("42.84 ") and f"| rtn | 60.00 | {cell} |" in (tmp_path / "out" / "tables.md").read_text()
    assert summary_rows(tmp_path / "out")[("rtn", "W4A4")]["top1_mean"] == f"{mean:.4f}"
    assert f'data-v="{mean!r}">{cell}</td>' in (tmp_path / "out" / "index.html").read_text()


def test_many_settings_of_interleaved_methods_are_told_apart_and_equal_ones_pooled(tmp_path):
    """Twelve settings of one method (more than the reporter compares row by row before hashing them), its rows
    interleaved with another method's, two seeds each; and two settings equal as values but written differently
    (key order, 8 and 8.0) pooled into one cell."""
    rows = []
    for seed in range(2):
        for k in range(12):
            rows.append(make_row(f"r{k}-{seed}", seed=seed, top1=10.0 + k + seed, method_cfg={"name": "rtn", "k": k}))
            rows.append(make_row(f"q{k}-{seed}", method="squant", seed=seed + 2 * k, top1=50.0))
    reordered = dict(reversed(list(COMMON.items()))) | {"first_wbits": 8.0}
    rows += [make_row("d0", method="dfq", top1=30.0),
             make_row("d1", method="dfq", seed=1, top1=32.0, protocol=reordered)]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))  # as given, not key-sorted
    text = runs.read_text()
    assert '"name": "common", "fold_bn": true, "first_wbits": 8}' in text
    assert '"first_wbits": 8.0, "fold_bn": true, "name": "common"}' in text
    rows_read, _ = report.report([runs], tmp_path / "out", make_plots=False, html=False)
    assert rows_read.warnings == []
    s = summary_rows(tmp_path / "out")
    assert sorted(s) == sorted([*((f"rtn method.k={k}", "W4A4") for k in range(12)), ("squant", "W4A4"),
                                ("dfq", "W4A4")])
    for k in range(12):
        assert (s[(f"rtn method.k={k}", "W4A4")]["n"], s[(f"rtn method.k={k}", "W4A4")]["top1_mean"]) == (
            "2", f"{10.5 + k:.4f}")
    assert (s[("squant", "W4A4")]["n"], s[("squant", "W4A4")]["n_seeds"]) == ("24", "24")
    assert (s[("dfq", "W4A4")]["n"], s[("dfq", "W4A4")]["top1_mean"]) == ("2", "31.0000")


def test_a_row_from_before_a_protocol_key_pools_with_one_that_has_its_default(tmp_path):
    """results.ADDED_DEFAULTS: a row written before protocol.a_placement (or w_range) existed ran with its default,
    so it pools with a newer row of the same setting; a row at another value is its own variant."""
    rows = [make_row("old", seed=0, top1=50.0),
            make_row("new", seed=1, top1=54.0, protocol={**COMMON, "a_placement": "layer_input",
                                                         "w_range": "include_zero"}),
            make_row("relu", seed=0, top1=40.0, protocol={**COMMON, "a_placement": "after_relu"})]
    write(tmp_path / "in" / "runs.jsonl", rows)
    report.report([tmp_path / "in" / "runs.jsonl"], tmp_path / "out", make_plots=False, html=False)
    s = summary_rows(tmp_path / "out")
    assert sorted(s) == [("rtn protocol.a_placement=after_relu", "W4A4"),
                         ("rtn protocol.a_placement=layer_input", "W4A4")]
    pooled = s[("rtn protocol.a_placement=layer_input", "W4A4")]
    assert (pooled["n"], pooled["n_seeds"], pooled["top1_mean"]) == ("2", "2", "52.0000")


def test_a_gpu_run_is_its_own_variant_and_a_row_from_before_the_device_field_reads_as_cpu(tmp_path):
    """results.ADDED_FIELD_DEFAULTS: every row before the `device` field ran on the CPU, so it pools with a newer
    CPU row; the same setting run with device=cuda is a variant of its own, labelled so."""
    rows = [make_row("old", seed=0, top1=50.0), make_row("cpu", seed=1, top1=54.0, device="cpu"),
            make_row("gpu", seed=0, top1=51.0, device="cuda")]
    write(tmp_path / "in" / "runs.jsonl", rows)
    report.report([tmp_path / "in" / "runs.jsonl"], tmp_path / "out", make_plots=False, html=False)
    s = summary_rows(tmp_path / "out")
    assert sorted(s) == [("rtn device=cpu", "W4A4"), ("rtn device=cuda", "W4A4")]
    assert (s[("rtn device=cpu", "W4A4")]["n"], s[("rtn device=cpu", "W4A4")]["top1_mean"]) == ("2", "52.0000")
    assert (s[("rtn device=cuda", "W4A4")]["n"], s[("rtn device=cuda", "W4A4")]["top1_mean"]) == ("1", "51.0000")


def test_variant_labels_keep_only_the_facets_a_preset_name_does_not_give(tmp_path):
    """Two presets: the facets that differ between them (fold_bn, first_wbits) are told by the preset name and left
    out; one that takes two values inside a preset (a_placement inside squant_paper) is kept."""
    rows = [make_row("c", top1=50.0),
            make_row("p1", top1=51.0, protocol={**PAPER_PROTO, "a_placement": "after_relu"}),
            make_row("p2", top1=52.0, protocol={**PAPER_PROTO, "a_placement": "layer_input"})]
    write(tmp_path / "in" / "runs.jsonl", rows)
    report.report([tmp_path / "in" / "runs.jsonl"], tmp_path / "out", make_plots=False, html=False)
    assert {v: r["top1_mean"] for (v, _), r in summary_rows(tmp_path / "out").items()} == {
        "rtn protocol=common protocol.a_placement=layer_input": "50.0000",
        "rtn protocol=squant_paper protocol.a_placement=after_relu": "51.0000",
        "rtn protocol=squant_paper protocol.a_placement=layer_input": "52.0000"}


def test_bench_report_rows_have_every_field_of_the_row_schema_and_no_other():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_report
    finally:
        sys.path.remove(str(REPO / "scripts"))
    rows = [bench_report.synthetic_row(i, random.Random(i)) for i in range(50)]
    schema = {name for group in SCHEMA.values() for names in group for name in names.split()}
    assert all(set(r) == schema for r in rows)
    assert all(row_problem(r) is None for r in rows if r["status"] == "ok")


def test_bench_report_prints_the_tables_time_against_the_3_s_target():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_report.py"), "--rows", "300", "--repeats", "1",
                          "--tables-only"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    target = r"^tables only: \d+\.\d\d s median wall = \d+\.\d\d x the 3 s target"
    assert re.search(target, res.stdout, re.M), res.stdout
