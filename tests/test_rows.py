"""The row schema (runner, README, reporter, loggers), the one "last ok row per run_id wins" reader,
and the atomic file writer."""

import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dfq_bench.config import CONF_DIR, register_configs
from dfq_bench.results import (
    FIELDS,
    IN_EVERY_ROW,
    OPTIONAL_GROUPS,
    SCHEMA,
    LastOk,
    atomic_write,
    fields,
    parse_lines,
    read_rows,
    report,
    row_problem,
    schema_table,
)
from dfq_bench.run import loggers
from dfq_bench.run.runner import run

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=test_cnn", "dataset=fake", "dataset.num_samples=32", "dataset.batch_size=32"]


def compose_cfg(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_a_real_row_has_every_schema_field_and_a_failed_one_every_field_of_every_row(tmp_path):
    row = run(compose_cfg([*TINY, "method=rtn", "wbits=4", "abits=8", f"results_dir={tmp_path}"]))
    every = set(fields(*(g for g in SCHEMA if g not in OPTIONAL_GROUPS)))  # mixed precision: tests/test_mixed.py
    assert row["status"] == "ok" and every <= set(row) and not set(fields(*OPTIONAL_GROUPS)) & set(row)
    (written,) = read_rows(tmp_path / "runs.jsonl")
    assert every <= set(written) and written["run_id"] == row["run_id"]
    with pytest.raises(Exception, match="does not exist"):  # fails before the dataset is read
        run(compose_cfg([*TINY, "dataset=imagenet", "dataset.root=/nonexistent", f"results_dir={tmp_path}"]))
    failed = list(read_rows(tmp_path / "runs.jsonl"))[-1]
    assert failed["status"] == "failed" and set(IN_EVERY_ROW) <= set(failed)
    assert not set(fields("run info")) & set(failed)


def test_readme_field_table_is_the_schema():
    readme = (REPO / "README.md").read_text()
    assert schema_table() in readme
    section = readme.split("## The result row", 1)[1].split("\n## ", 1)[0]
    assert all(f"`{f}`" in section for f in FIELDS)


def test_reporter_and_loggers_read_their_fields_from_the_schema():
    assert loggers.IDENTITY == fields("identity")
    assert set(report.KEY_FIELDS + report.SIG_FIELDS + report.VALUE_FIELDS) <= set(FIELDS)
    assert set(report.KEY_FIELDS + report.SIG_FIELDS) == set(fields("identity")) - {"run_id"} | {"n_eval"}


def test_last_ok_row_per_run_id_wins_whole_or_incrementally(tmp_path):
    rows = [{"run_id": "a", "status": "failed"}, {"run_id": "a", "status": "ok", "v": 1},
            {"run_id": "b", "status": "ok", "v": 1}, {"run_id": "b", "status": "ok", "v": 2},
            {"run_id": "b", "status": "failed"}, {"run_id": "c", "status": "failed", "v": 1},
            {"run_id": "c", "status": "failed", "v": 2}, {"no_id": 1}, [1, 2]]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]) + "{torn\n"
                    + "".join(json.dumps(r) + "\n" for r in rows[4:]))
    whole = LastOk().read(path)
    assert {k: r["v"] for k, r in whole.ok.items()} == {"a": 1, "b": 2}
    assert whole.never_ok() == [{"run_id": "c", "status": "failed", "v": 2}]
    assert whole.n_rows == 7 and whole.n_superseded == 4  # a's failed, b's v=1, b's failed, c's v=1
    assert whole.warnings == [f"{path}:5: corrupt row skipped (Expecting property name enclosed in double quotes)",
                              f"{path}: a row without run_id skipped", f"{path}: a row without run_id skipped"]
    step = LastOk()
    for r in rows:
        step.add([r])
    assert (step.ok, step.failed, step.n_rows) == (whole.ok, whole.failed, whole.n_rows)


def test_atomic_write_replaces_whole_files_and_leaves_no_temp_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write(path, lambda tmp: tmp.write_text("one"))
    assert path.read_text() == "one"

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "one" and sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


class _Int(int):  # not the exact type json gives: row_problem's fast path leaves it to the detailed checks
    pass


def _usable(row) -> bool:
    """What the reporter can use, written out from its rules (results.row_problem's docstring and NEEDED)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(row, dict) or any(f not in row for f in ("run_id", "status", "model", "dataset", "method",
                                                                 "wbits", "abits", "seed")):
        return False
    if not isinstance(row["run_id"], str) or not all(isinstance(row[f], int) and not isinstance(row[f], bool)
                                                     for f in ("wbits", "seed")):
        return False
    if row["abits"] is not None and not (isinstance(row["abits"], int) and not isinstance(row["abits"], bool)):
        return False
    if not all(row.get(f) is None or number(row.get(f)) for f in fields("metrics", "timing")):
        return False
    info = row.get("dataset_info")
    n_labelled = info.get("n_labelled") if isinstance(info, dict) else None
    no_labels = isinstance(n_labelled, int) and not isinstance(n_labelled, bool) and n_labelled == 0
    return not (row["status"] == "ok" and row.get("top1") is None and not no_labels)


def test_row_problem_accepts_exactly_the_usable_rows_and_says_why_for_the_others():
    rng = random.Random(0)
    base = {"run_id": "r", "status": "ok", "model": "m", "dataset": "d", "method": "rtn", "wbits": 4, "abits": 8,
            "seed": 0, "top1": 50.0, "top5": 60.0, "kl_fp32": 0.1, "n_eval": 100, "t_quant_s": 0.5}
    odd = [None, True, False, "4", 4, 4.0, _Int(4), [4], {"x": 4}, -0.0, 10**30]
    seen = {True: 0, False: 0}
    for _ in range(5000):
        row = dict(base)
        for _ in range(rng.randrange(4)):
            key = rng.choice([*base, "top1_fp32", "t_total_s", "peak_rss_mb", "weights", "dataset_info"])
            if rng.random() < 0.2:
                row.pop(key, None)
            elif key == "dataset_info":  # n_labelled = 0: an ok row may lack top1
                row[key] = rng.choice([{"n_labelled": rng.choice([0, 0.0, False, 3, None])}, {}, None, [0]])
            else:
                row[key] = rng.choice([*odd, "ok", "failed"]) if key == "status" else rng.choice(odd)
        problem = row_problem(row)
        assert (problem is None) == _usable(row), (row, problem)
        assert problem is None or (isinstance(problem, str) and problem)
        seen[problem is None] += 1
    assert min(seen.values()) > 500  # both kinds were drawn
    for value in ([1], "row", None, 3):
        assert row_problem(value).startswith("not a JSON object but ")
    no_top1 = dict(base, top1=None)
    for n_labelled in (3, 0.0, False, None, "0"):
        assert row_problem(dict(no_top1, dataset_info={"n_labelled": n_labelled})) == "an ok row without top1"
    assert row_problem(no_top1) == "an ok row without top1"
    assert row_problem(dict(no_top1, dataset_info={"n_labelled": 0})) is None  # no view labelled: no top-1


LINES = ['{"a": 1}', '  {"a": [1, 2.5, null]}\t\r', '{"a": 1} {"b": 2}', '{"a": 1}x', '[1, 2]', '"s"', 'NaN',
         '{"a": "\x01"}', '{"a": 1', '{"a": 1}}', 'nul', '{"a": 1}\x0b', '\u00a0{"a": 1}', '{"k": "é\\u00e9"}', '1e999',
         '{"a": 1}   ', '{"a":1,}', "{'a': 1}", '-', '{"a": {"b": {"c": [[]]}}}', '{"a": 1, "a": 2}']


def test_parse_lines_agrees_with_json_loads():
    """parse_lines calls the C scanner itself: each line gets the value json.loads gives it, or the error
    json.loads raises for it, in its words (an independent reference: json.loads line by line)."""
    want_values, want_errors = [], []
    for i, line in enumerate(LINES, 1):
        try:
            want_values.append(json.loads(line))
        except ValueError as e:
            want_errors.append(f"f:{i}: corrupt row skipped ({e.msg})")
    for lines in (LINES, [s.encode() for s in LINES]):
        errors = []
        got = list(parse_lines(lines, "f", errors))
        assert json.dumps(got) == json.dumps(want_values) and errors == want_errors
    assert len(want_errors) == 11  # the cases above cover both paths
