"""Faults that must not turn finished work into a failed row or leave debris: unwritable caches (a
read-only directory, a file where the directory should be, a full disk), unreadable or foreign eval
cache entries, and Ctrl-C (one line, exit 130, a row whose error says "interrupted")."""

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import compose_cfg, rows_in

from dfq_bench.results import atomic_write
from dfq_bench.run.runner import run

DATA = ["model=test_cnn", "dataset=fake", "dataset.num_samples=32", "dataset.batch_size=32", "wbits=4",
        "abits=8", "progress=false"]
SYNTH = ["method=zeroq", "data=zeroq_cpu", "data.steps=2", "data.num_samples=4", "data.batch_size=4"]
REASONS = {"readonly_dir": ("Permission denied",), "readonly_parent": ("Permission denied",),
           "file": ("File exists", "Not a directory"), "enospc": ("No space left on device",)}


def under(path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


@pytest.fixture
def break_cache(tmp_path, monkeypatch):
    """``break_cache(kind, leaf)`` makes a cache that cannot be written and returns (root, the
    directory to configure). ``leaf`` is the subdirectory the entries go to (calib/cache.py writes to
    ``cache_dir/synth``). Kinds: ``readonly_dir`` (the entries' directory exists, mode 0555),
    ``readonly_parent`` (the cache directory does not exist and its parent is 0555: the first write
    has to create it), ``file`` (a regular file where the directory should be), ``enospc`` (a full
    disk: torch.save writes part of the file, then fails with ENOSPC).

    As root (this CI's containers) mode 0555 restricts nothing, so the read-only kinds then raise
    exactly what a non-root process gets: PermissionError from mkdir, and torch.save's RuntimeError
    ("open file failed with strerror: Permission denied") for a file in an existing directory.
    """
    root = tmp_path / "cache_root"
    real_save = torch.save
    read_only = []

    def make(kind: str, leaf: str = "") -> tuple[Path, Path]:
        if kind == "file":
            root.write_text("a file where the cache directory should be")
            return root, root
        if kind == "enospc":
            root.mkdir()

            def full_disk(obj, f, *args, **kwargs):
                if isinstance(f, (str, os.PathLike)) and under(f, root):
                    Path(f).write_bytes(b"PK\x03\x04 partial")  # the disk fills mid-write
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
                return real_save(obj, f, *args, **kwargs)

            monkeypatch.setattr(torch, "save", full_disk)
            return root, root
        locked = root / leaf if kind == "readonly_dir" else root
        locked.mkdir(parents=True)
        locked.chmod(0o555)
        read_only.append(locked)
        if os.access(locked, os.W_OK):  # root user: simulate what the kernel would refuse
            real_mkdir = Path.mkdir

            def mkdir(self, *args, **kwargs):
                if under(self, root) and not self.exists():
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
                return real_mkdir(self, *args, **kwargs)

            def save(obj, f, *args, **kwargs):
                if isinstance(f, (str, os.PathLike)) and under(f, root):
                    raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with "
                                       "strerror: Permission denied")
                return real_save(obj, f, *args, **kwargs)

            monkeypatch.setattr(Path, "mkdir", mkdir)
            monkeypatch.setattr(torch, "save", save)
        return root, root if kind == "readonly_dir" else root / "cache"

    yield make
    for d in read_only:
        d.chmod(0o755)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


# --- unwritable caches: the run keeps its result, writes an ok row, warns once ----------------

@pytest.mark.parametrize("kind", list(REASONS))
@pytest.mark.parametrize("which", ["eval", "synth"])
def test_unwritable_cache_warns_once_and_the_run_keeps_its_ok_row(which, kind, break_cache, tmp_path, caplog):
    root, cache = break_cache(kind, "synth" if which == "synth" else "")
    results = tmp_path / "r"
    overrides = ([*DATA, "method=rtn", f"eval_cache={cache}"] if which == "eval" else
                 [*DATA, *SYNTH, f"data.cache_dir={cache}"])
    before = root.read_text() if kind == "file" else None
    with caplog.at_level(logging.WARNING):
        row = run(compose_cfg([*overrides, f"results_dir={results}"]))
    assert row["status"] == "ok" and row["error"] is None and row["top1"] is not None
    (stored,) = rows_in(results)
    assert stored["status"] == "ok" and stored["error"] is None and stored["top1"] == row["top1"]
    if which == "eval":
        assert row["eval_cache"] == "miss"
    else:
        assert row["data_info"]["cache"] == "miss" and "cache_file" not in row["data_info"]
        assert any(r in row["data_info"]["cache_error"] for r in REASONS[kind])
    (warning,) = warnings_of(caplog)  # once, naming the path and the reason
    assert str(cache) in warning and any(r in warning for r in REASONS[kind]), warning
    # no partial entry (the ENOSPC writer left part of a file: atomic_write removed it)
    assert files_under(root) == [] and (before is None or root.read_text() == before)


@pytest.mark.parametrize("kind", ["readonly_parent", "file"])
def test_unwritable_eval_cache_at_lookup_is_a_miss_not_a_failure(kind, break_cache):
    from dfq_bench.run.evalcache import EvalCache, FP32Outputs

    root, cache = break_cache(kind)
    entry = EvalCache(cache, {"k": 1})
    assert entry.load() is None
    assert entry.save(FP32Outputs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0.5)) is False
    assert files_under(root) == []


def test_atomic_write_removes_its_temp_file_when_the_disk_is_full(tmp_path):
    path = tmp_path / "entry.pt"
    path.write_bytes(b"old")

    def write(tmp):
        tmp.write_bytes(b"half of the new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.pt"] and path.read_bytes() == b"old"


# --- unreadable or foreign eval cache entries are recomputed ----------------------------------

def foreign_entry(entry: Path, tmp_path: Path, kind: str) -> None:
    if kind == "torn":
        entry.write_bytes(b"torn")
    elif kind == "other_dict":
        torch.save({"weights": torch.zeros(3)}, entry)
    elif kind == "tensor":
        torch.save(torch.zeros(3), entry)
    elif kind == "bad_shapes":
        blob = torch.load(entry, weights_only=True)
        torch.save({**blob, "logits": blob["logits"][:, :3]}, entry)
    else:  # another run's valid entry copied under this key (16 images, not 32)
        other = tmp_path / "other"
        run(compose_cfg([*DATA, "method=rtn", f"eval_cache={other}", "dataset.limit=16",
                         f"results_dir={tmp_path / 'r_other'}"]))
        (made,) = other.glob("*.pt")
        entry.write_bytes(made.read_bytes())


@pytest.mark.parametrize("kind", ["torn", "other_dict", "tensor", "bad_shapes", "other_key"])
def test_unreadable_or_foreign_eval_cache_entry_is_recomputed(kind, tmp_path, caplog):
    base = [*DATA, "method=rtn", f"results_dir={tmp_path / 'r'}"]
    plain = run(compose_cfg(base))
    cached = [*base, f"eval_cache={tmp_path / 'c'}"]
    assert run(compose_cfg(cached))["eval_cache"] == "miss"
    (entry,) = (tmp_path / "c").glob("*.pt")
    foreign_entry(entry, tmp_path, kind)
    with caplog.at_level(logging.WARNING):
        again = run(compose_cfg(cached))
    assert again["status"] == "ok" and again["eval_cache"] == "miss"
    for key in ("top1", "top1_fp32", "agree_fp32", "kl_fp32", "n_eval"):
        assert again[key] == plain[key], key
    (warning,) = warnings_of(caplog)
    assert str(entry) in warning and "recomputing" in warning
    assert run(compose_cfg(cached))["eval_cache"] == "hit"  # the entry was rewritten


# --- Ctrl-C ------------------------------------------------------------------------------------

def test_interrupt_during_the_cache_write_writes_an_interrupted_row_and_no_entry(tmp_path, monkeypatch):
    real_save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and under(f, tmp_path / "c"):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg([*DATA, "method=rtn", f"eval_cache={tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}"]))
    (row,) = rows_in(tmp_path / "r")
    assert row["status"] == "failed" and row["error"] == "interrupted"
    assert files_under(tmp_path / "c") == []


def test_ctrl_c_on_the_cli_prints_one_line_exits_130_and_writes_an_interrupted_row(tmp_path):
    # 20,000 images: evaluation takes many seconds, the SIGINT lands in it (the progress bar says when)
    args = ["method=rtn", "model=test_cnn", "dataset=fake", "dataset.num_samples=20000", "dataset.batch_size=64",
            "wbits=4", "abits=8", "progress=true", f"results_dir={tmp_path / 'r'}", f"eval_cache={tmp_path / 'c'}"]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dfq_bench", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=err)
        try:
            deadline = time.monotonic() + 120
            while "eval" not in err_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, err_path.read_text()
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = err_path.read_text()
    lines = [seg.strip() for line in stderr.split("\n") for seg in line.split("\r") if seg.strip()]
    assert rc == 130, stderr
    assert "Traceback" not in stderr and lines[-1] == "interrupted" and stderr.count("interrupted") == 1, stderr
    (row,) = rows_in(tmp_path / "r")
    assert row["status"] == "failed" and row["error"] == "interrupted"
    assert files_under(tmp_path / "c") == []


# ---- labels outside the model's classes -----------------------------------------------------------


def test_corrupt_fashion_mnist_labels_file_is_an_error_naming_it(tmp_path):
    """A labels byte above 9 (a corrupt file) fails with the file's name, not as a lower accuracy."""
    import gzip
    import shutil

    from dfq_bench.data.fashion_mnist import DatasetError, load_split

    src = Path("/usr/share/datasets/fashion-mnist")
    if not (src / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (make setup installs it)")
    for f in src.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(labels.read_bytes()))
    data[8 + 123] = 10  # header (8 bytes), then one byte per label
    labels.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DatasetError, match=rf"^{labels} holds label 10 at index 123; valid: 0..9"):
        load_split(str(tmp_path), "test")


def test_labels_outside_the_heads_classes_fail_the_evaluation():
    import torch

    from dfq_bench.data import DatasetError
    from dfq_bench.run.runner import evaluate

    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 3, 0])  # label 3 of a 3-class head
    with pytest.raises(DatasetError, match=r"label 3 in evaluation images 0..7 is outside the model's 3 classes"):
        evaluate(model, model, [(x, y)], "cpu", lambda it, **kw: it)


def test_nan_in_a_weights_file_is_named_as_such(tmp_path):
    import torch

    from dfq_bench.models.torchvision_timm import WeightsError, read_state_dict

    sd = {"conv.weight": torch.ones(2, 3), "fc.bias": torch.tensor([0.0, float("nan")])}
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"w.pt: tensor 'fc.bias' holds NaN or Inf"):
        read_state_dict(tmp_path / "w.pt", None)
    sd["fc.bias"] = torch.zeros(2)
    torch.save(sd, tmp_path / "w.pt")
    assert set(read_state_dict(tmp_path / "w.pt", None)[0]) == {"conv.weight", "fc.bias"}


def test_a_limit_above_the_split_size_says_so_in_the_row_and_the_log(tmp_path, caplog):
    from helpers import compose_cfg

    from dfq_bench.config import validate_config
    from dfq_bench.run.runner import run

    overrides = ["model=test_cnn", "dataset=fake", "dataset.num_samples=16", "dataset.limit=40", "method=dummy",
                 f"results_dir={tmp_path}"]
    cfg = compose_cfg(overrides)
    validate_config(cfg, overrides)
    with caplog.at_level("WARNING"):
        row = run(cfg)
    assert row["status"] == "ok" and row["n_eval"] == 16 and row["dataset_info"]["limit_above_split"] == 16
    assert "dataset.limit=40 is above the 16 images of fake: evaluating all 16" in caplog.text


def test_a_truncated_image_names_its_file(tmp_path):
    import numpy as np
    from PIL import Image

    from dfq_bench.data import DatasetError
    from dfq_bench.data.imagenet import image_folder

    for k, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((40, 40, 3), 60 * k, dtype=np.uint8)).save(tmp_path / name / "x.jpg")
    bad = tmp_path / "b" / "x.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # a download cut short
    ds = image_folder(tmp_path, None, "imagenet")
    assert ds[0][0].size == (40, 40)  # the intact image loads
    with pytest.raises(DatasetError, match=rf"^cannot read image {bad}: OSError"):
        ds[1]


# ---- two identical configs at once ----------------------------------------------------------------


def test_an_identical_config_started_while_one_runs_is_skipped_not_run_twice(tmp_path):
    """Another process holds the run's claim (as a run of the same config does while it works): the
    CLI skips it and writes no row; once that process is killed, its stale claim is taken over."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import cli, compose_cfg, rows_in

    from dfq_bench.run.runner import run_id

    results = tmp_path / "results"
    overrides = ["model=test_cnn", "dataset=fake", "dataset.num_samples=32", "method=rtn", f"results_dir={results}"]
    rid = run_id(compose_cfg(overrides))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom dfq_bench.run.sweep import claim\n"
        f"with claim({str(results)!r}, {rid!r}):\n    print('claimed', flush=True)\n    time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        busy = cli(overrides, tmp_path)
        assert busy.returncode == 0, busy.stderr
        assert f"skipped: run_id {rid} is being run by process {holder.pid}" in busy.stdout
        assert not rows_in(results)  # not run twice
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its claim file stays behind
        holder.wait(timeout=30)
    time.sleep(0.1)
    assert (results / ".claims" / rid).exists()
    again = cli(overrides, tmp_path)
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in rows_in(results)] == ["ok"] and not (results / ".claims" / rid).exists()


def test_a_stale_claim_of_a_killed_run_is_taken_over(tmp_path):
    from dfq_bench.run.sweep import claim

    (tmp_path / ".claims").mkdir()
    (tmp_path / ".claims" / "abc").write_text("999999999")  # no such process
    with claim(tmp_path, "abc") as owner:
        assert owner is None and (tmp_path / ".claims" / "abc").read_text() == str(__import__("os").getpid())
    assert not (tmp_path / ".claims" / "abc").exists()


# ---- a killed multirun ------------------------------------------------------------------------------


def test_killing_a_joblib_multirun_stops_its_workers_before_they_append_rows(tmp_path):
    """SIGKILL to the sweep's process while both joblib workers are in a job: the workers end within
    seconds (they used to finish their jobs and append rows, minutes later), no row, no claim left."""
    args = ["-m", "hydra/launcher=local", "seed=0,1", "method=rtn", "model=test_cnn", "dataset=fake",
            "dataset.num_samples=200000", "dataset.batch_size=64", "wbits=4", "abits=8", "progress=false",
            f"results_dir={tmp_path / 'r'}", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    claims = tmp_path / "r" / ".claims"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dfq_bench", *args], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err)
        workers: set[int] = set()
        try:
            deadline = time.monotonic() + 120
            while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
                workers = {int(p.read_text() or 0) for p in claims.glob("*")} - {0} if claims.is_dir() else set()
            assert len(workers) == 2 and proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            deadline = time.monotonic() + 30
            while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
            for pid in workers:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    assert not any(alive(pid) for pid in workers)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert stderr.count("stopped: the sweep's process") == 2, stderr
    assert rows_in(tmp_path / "r") == [] and list(claims.glob("*")) == []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a killed worker nobody reaps yet is a zombie: not running
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
