"""Sweeps that die and resume: skip_done, failures that do not stop a multirun, kills (SIGKILL/SIGTERM
on the process group) followed by a rerun, concurrent appends, torn and corrupt lines, the launchers
(joblib, submitit local, SLURM submission script), and the FP32 eval cache."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import cli, compose_cfg, rows_in

from dfq_bench.config import CONF_DIR
from dfq_bench.results import append_row, read_rows
from dfq_bench.run.runner import run, run_id
from dfq_bench.run.sweep import _INDEXES, finished_row, finished_rows

DATA = ["model=test_cnn", "dataset=fake", "dataset.num_samples=32", "dataset.batch_size=32"]
SMALL = [*DATA, "wbits=4"]


def rows_of(results: Path):
    errors = []
    return rows_in(results, errors), errors


def ok_count(rows):
    counts = {}
    for r in rows:
        if r["status"] == "ok":
            counts[r["run_id"]] = counts.get(r["run_id"], 0) + 1
    return counts


# --- kill a multirun midway, rerun, every config has exactly one ok row ----------------------

SEEDS = range(4)
FMNIST = ["model=resnet20_fmnist", "dataset=fake", "dataset.num_samples=32", "dataset.batch_size=32", "wbits=4"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A state-dict file and a torn copy of it: the torn one fails inside the run, when the model is
    built (a file that cannot be read; bad input that no up-front check sees, as a value would be)."""
    from dfq_bench.run.runner import build_model

    d = tmp_path_factory.mktemp("weights")
    torch.save(build_model(compose_cfg([*FMNIST, "model.weights=null"])).model.state_dict(), d / "good.pt")
    data = (d / "good.pt").read_bytes()
    (d / "torn.pt").write_bytes(data[: len(data) // 2])
    return d / "good.pt", d / "torn.pt"


def sweep_args(weights) -> list[str]:
    good, torn = weights
    return ["-m", "method=dummy", f"seed={','.join(map(str, SEEDS))}", f"model.weights={good},{torn}", *FMNIST]


def expected_ids(weights):
    """run_ids of the sweep's configs, composed here independently of the CLI."""
    ok, bad = set(), set()
    for seed in SEEDS:
        for path, target in zip(weights, (ok, bad), strict=True):
            target.add(run_id(compose_cfg(["method=dummy", f"seed={seed}", f"model.weights={path}", *FMNIST])))
    return ok, bad


def kill_midway(cwd: Path, sig: int, args: list[str]) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "dfq_bench", *args], cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = cwd / "results" / "runs.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if runs.exists() and runs.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, sig)  # the launcher and anything it started
    proc.wait(timeout=60)
    return runs.read_bytes().count(b"\n")


@pytest.mark.parametrize("sig", [
    signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["SIGKILL", "SIGTERM"])
def test_killed_multirun_resumes_with_exactly_one_ok_row_per_config(tmp_path, sig, weights):
    ok_ids, bad_ids = expected_ids(weights)
    n_before = kill_midway(tmp_path, sig, sweep_args(weights))
    assert 3 <= n_before < 2 * len(SEEDS), "the sweep was not killed midway"
    rows, errors = rows_of(tmp_path / "results")
    assert not errors and ok_count(rows) and set(ok_count(rows)) < ok_ids

    res = cli(sweep_args(weights), tmp_path)
    assert res.returncode == 1  # the torn-file configs fail again: reported at the end, after every job ran
    assert res.stderr.count("error: run failed (WeightsError: cannot read weights file") >= len(SEEDS)
    assert "Traceback" not in res.stderr
    n_skipped = res.stdout.count("skipped: run_id")
    rows, errors = rows_of(tmp_path / "results")
    assert not errors
    assert ok_count(rows) == {rid: 1 for rid in ok_ids}  # every config once, none twice
    assert {r["run_id"] for r in rows if r["status"] == "failed"} == bad_ids
    assert n_skipped == len([r for r in rows[:n_before] if r["status"] == "ok"])


# --- the results file under concurrency, torn and corrupt lines ------------------------------

def test_concurrent_writers_lose_nothing_and_the_index_never_sees_half_a_row(tmp_path):
    pad = 70_000  # rows far larger than a page and than any single write buffer
    code = textwrap.dedent(f"""
        import sys
        from dfq_bench.results import append_row
        w = int(sys.argv[1])
        for i in range(60):
            append_row({str(tmp_path)!r}, {{"run_id": f"{{w}}-{{i}}", "status": "ok", "pad": "x" * {pad}}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)]) for k in range(2)]
    seen = 0
    while any(p.poll() is None for p in procs):
        done = finished_rows(tmp_path)  # incremental reads while the writers append
        assert all(len(r["pad"]) == pad for r in done.values())
        seen = max(seen, len(done))
        time.sleep(0.01)
    assert all(p.returncode == 0 for p in procs)
    rows, errors = rows_of(tmp_path)
    assert not errors and len(rows) == 120
    assert {r["run_id"] for r in rows} == {f"{w}-{i}" for w in range(2) for i in range(60)}
    assert set(finished_rows(tmp_path)) == {r["run_id"] for r in rows}


def test_torn_last_line_is_reported_once_and_does_not_swallow_the_next_row(tmp_path):
    append_row(tmp_path, {"run_id": "a", "status": "ok"})
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"run_id": "b", "status": "o')  # a writer killed mid-line: no newline
    assert "b" not in finished_rows(tmp_path)
    append_row(tmp_path, {"run_id": "c", "status": "ok"})
    errors = []
    assert [r["run_id"] for r in read_rows(tmp_path / "runs.jsonl", errors)] == ["a", "c"]
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path / 'runs.jsonl'}:2: corrupt row skipped")
    assert set(finished_rows(tmp_path)) == {"a", "c"}


def test_done_index_reads_only_new_bytes_counts_only_ok_rows_and_notices_a_new_file(tmp_path):
    append_row(tmp_path, {"run_id": "a", "status": "ok", "top1": 1.0})
    append_row(tmp_path, {"run_id": "f", "status": "failed"})
    assert set(finished_rows(tmp_path)) == {"a"}
    path = str((tmp_path / "runs.jsonl").resolve())
    assert _INDEXES[path].offset == os.path.getsize(path)
    with open(path, "a") as f:
        f.write("not json\n")
    append_row(tmp_path, {"run_id": "f", "status": "ok", "top1": 2.0})
    assert set(finished_rows(tmp_path)) == {"a", "f"} and finished_row(tmp_path, "f")["top1"] == 2.0
    os.replace(tmp_path / "runs.jsonl", tmp_path / "old.jsonl")
    assert finished_rows(tmp_path) == {}
    append_row(tmp_path, {"run_id": "z", "status": "ok"})
    assert set(finished_rows(tmp_path)) == {"z"}


@pytest.mark.slow
def test_single_run_skips_a_done_run_id_despite_corrupt_lines_unless_skip_done_false(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "runs.jsonl").write_text('{"run_id": "x", "status": "ok"\ngarbage\n')
    args = ["method=dummy", *SMALL]
    assert cli(args, tmp_path).returncode == 0
    res = cli(args, tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("skipped: run_id ")
    assert cli([*args, "skip_done=false"], tmp_path).returncode == 0
    rows, errors = rows_of(results)
    assert len(rows) == 2 and len({r["run_id"] for r in rows}) == 1
    assert [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in errors] == ["1", "2"]


# --- launchers ---------------------------------------------------------------------------------

FAKE_SBATCH = """#!/bin/sh
for last; do :; done
cp "$last" "$FAKE_SBATCH_OUT"
echo "sbatch: error: fake sbatch for tests" >&2
exit 1
"""


def test_slurm_launcher_writes_the_configured_sbatch_options(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    script = tmp_path / "submitted.sh"
    res = cli(["-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=30",
               "hydra.launcher.mem_gb=4", "hydra.launcher.gpus_per_node=0", "hydra.launcher.array_parallelism=3",
               "method=dummy,rtn", "seed=0,1"], tmp_path,
              env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SBATCH_OUT": str(script)})
    assert res.returncode == 1 and "fake sbatch for tests" in res.stderr
    lines = script.read_text().splitlines()
    for option in ("--partition=debug", "--time=30", "--mem=4GB", "--gpus-per-node=0", "--array=0-3%3",
                   "--job-name=dfq_bench", "--cpus-per-task=8"):
        assert f"#SBATCH {option}" in lines, option
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
    assert not (tmp_path / "results" / "runs.jsonl").exists() or not rows_of(tmp_path / "results")[0]


@pytest.mark.slow
def test_submitit_local_executor_runs_the_sweep_for_real(tmp_path, weights):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "method=dummy,rtn",
            f"model.weights={weights[0]},{weights[1]}", *FMNIST]
    res = cli(args, tmp_path)
    assert res.returncode == 1 and "cannot read weights file" in res.stderr
    rows, errors = rows_of(tmp_path / "results")
    assert not errors and sorted((r["method"], r["status"]) for r in rows) == [
        ("dummy", "failed"), ("dummy", "ok"), ("rtn", "failed"), ("rtn", "ok")]
    assert len({r["run_id"] for r in rows}) == 4 and {r["n_eval"] for r in rows if r["status"] == "ok"} == {32}
    sweep_dirs = list((tmp_path / "multirun").glob("*/*/.submitit"))
    assert len(sweep_dirs) == 1 and len(list(sweep_dirs[0].glob("*/*_result.pkl"))) == 4
    again = cli(args, tmp_path)  # resumes through submitit too: the two ok configs are skipped
    assert again.returncode == 1
    assert ok_count(rows_of(tmp_path / "results")[0]) == {r["run_id"]: 1 for r in rows if r["status"] == "ok"}


@pytest.mark.slow
def test_joblib_local_launcher_runs_jobs_in_parallel_workers(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    res = cli(["-m", "hydra/launcher=local", "method=dummy,rtn", "seed=0,1", *SMALL], tmp_path)
    assert res.returncode == 0, res.stderr
    rows, errors = rows_of(tmp_path / "results")
    assert not errors and len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert len({r["run_id"] for r in rows}) == 4


# --- FP32 eval cache ---------------------------------------------------------------------------

def test_eval_cache_hit_gives_the_same_metrics_as_no_cache(tmp_path):
    base = ["method=rtn", "abits=4", *DATA, f"results_dir={tmp_path / 'r'}"]
    plain = run(compose_cfg([*base, "wbits=4"]))
    miss = run(compose_cfg([*base, f"eval_cache={tmp_path / 'c'}", "wbits=3"]))  # entries serve every bit-width
    base.append("wbits=4")
    hit = run(compose_cfg([*base, f"eval_cache={tmp_path / 'c'}"]))
    assert (plain["eval_cache"], miss["eval_cache"], hit["eval_cache"]) == (None, "miss", "hit")
    for key in ("top1", "top5", "top1_fp32", "top5_fp32", "agree_fp32", "kl_fp32", "n_eval"):
        assert hit[key] == plain[key], key  # exact: the cached logits are the FP32 forward's
    assert hit["t_eval_fp32_s"] == miss["t_eval_fp32_s"] and hit["run_id"] == plain["run_id"]
    (entry,) = (tmp_path / "c").glob("*.pt")
    blob = torch.load(entry, weights_only=True)
    assert blob["logits"].shape == (32, 10) and blob["labels"].shape == (32,)
    # another evaluation set is another entry
    other = run(compose_cfg([*base[:-1], f"eval_cache={tmp_path / 'c'}", "dataset.limit=16"]))
    assert other["eval_cache"] == "miss" and len(list((tmp_path / "c").glob("*.pt"))) == 2
    # an entry whose labels do not match the loader is an error, never silently reused
    blob["labels"] = (blob["labels"] + 1) % 10
    torch.save(blob, entry)
    with pytest.raises(RuntimeError, match="eval cache does not match this loader at image 0"):
        run(compose_cfg([*base, f"eval_cache={tmp_path / 'c'}"]))
    # an unreadable entry is recomputed
    entry.write_bytes(b"torn")
    again = run(compose_cfg([*base, f"eval_cache={tmp_path / 'c'}"]))
    assert again["eval_cache"] == "miss" and again["kl_fp32"] == plain["kl_fp32"]


# --- the reference sweep driver ------------------------------------------------------------------

def load_reference_sweep():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_sweep", CONF_DIR.parent / "scripts" / "reference_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_reference_sweep_plan_covers_every_bit_width_and_seeds_only_seeded_settings():
    ref = load_reference_sweep()
    assert "dummy" not in ref.all_methods() and {"rtn", "squant"} <= set(ref.all_methods())
    steps = ref.plan(["rtn", "genie"], ["test_cnn"], 3, ["dataset=fake"])
    by = [(s.method, [o for o in s.overrides if o.split("=")[0] in ("wbits", "abits", "seed", "method", "data")],
           s.n_runs) for s in steps]
    assert by == [
        ("rtn", ["method=rtn", "wbits=2,3,4,6,8", "abits=null", "seed=0"], 5),  # deterministic: one seed
        ("rtn", ["method=rtn", "wbits=4", "abits=4,8", "seed=0,1,2"], 6),  # noise calibration: 3 seeds
        ("rtn", ["method=rtn", "wbits=6", "abits=6", "seed=0,1,2"], 3),
        ("rtn", ["method=rtn", "wbits=8", "abits=8", "seed=0,1,2"], 3),
        ("genie", ["method=genie_cpu", "data=genie_cpu", "wbits=4", "abits=4", "seed=0"], 1),
        ("genie", ["method=genie_cpu", "data=genie_cpu", "wbits=8", "abits=8", "seed=0"], 1),
    ]


@pytest.mark.slow
def test_reference_sweep_script_runs_resumes_and_reproduces_its_tables(tmp_path):
    out = tmp_path / "ref"
    cmd = [sys.executable, str(CONF_DIR.parent / "scripts" / "reference_sweep.py"), "--methods", "rtn",
           "--models", "test_cnn", "--dataset", "fake", "--seeds", "2", "--out", str(out),
           "--eval-cache", str(tmp_path / "cache"), "--sweep-dir", str(tmp_path / "multirun"),
           "dataset.num_samples=32", "dataset.batch_size=32"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr
    rows, errors = rows_of(out)
    assert not errors and len(rows) == 5 + 4 + 2 + 2 and all(r["status"] == "ok" for r in rows)
    assert sorted({(r["wbits"], r["abits"]) for r in rows}, key=str) == sorted(
        [(2, None), (3, None), (4, None), (6, None), (8, None), (4, 4), (4, 8), (6, 6), (8, 8)], key=str)
    assert [r["eval_cache"] for r in rows].count("miss") == 1  # one FP32 pass over the test set
    tables = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".tex", ".csv", ".png", ".pdf")}
    assert {"tables.md", "summary.csv", "SWEEP.md", "acc_vs_bits__test_cnn__fake.png"} <= set(tables)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0 and second.stdout.count("skipped: run_id") == 13
    assert len(rows_of(out)[0]) == 13
    for name, blob in tables.items():
        if name != "SWEEP.md":  # it records the start time
            assert (out / name).read_bytes() == blob, name
