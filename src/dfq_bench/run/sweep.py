"""Resuming sweeps: which run_ids already have a finished (``status == "ok"``) row.

A sweep is resumed by running the same command again: every job whose run_id already has an ok row
in ``${results_dir}/runs.jsonl`` is skipped (``skip_done=true``, the default), so the unit of work is
the result, not the attempt. Failed rows do not count: their configs run again.

One launcher process may run hundreds of jobs, so the index is cached per file and only the bytes
appended since the last look are parsed (the file is append-only; a smaller file or a new inode
means it was replaced, and it is read again from the start). A line still being written (no
trailing newline yet) is left for the next look.

A run in progress holds a claim, ``${results_dir}/.claims/<run_id>`` (created exclusively, holding its
pid), so that an identical config started at the same time is skipped instead of run twice; a claim
whose process is gone (killed) is taken over.

The jobs of a local multirun stop with their sweep: the CLI puts its pid in ``DFQ_BENCH_SWEEP_PARENT``
before the launcher starts, and a job in a process that this parent spawned directly (a joblib/loky
worker, a submitit local job) watches its parent; once the parent is gone (killed), it ends its process
at once, writing no row (its claim is released first). Jobs that a remote launcher (SLURM) runs are
not children of the submitting process and outlive it, as a cluster job should.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dfq_bench.results import RUNS_FILE, LastOk, parse_lines


@dataclass
class _Index:
    inode: int = -1
    offset: int = 0
    rows: LastOk = field(default_factory=LastOk)


_INDEXES: dict[str, _Index] = {}
SWEEP_PARENT_ENV = "DFQ_BENCH_SWEEP_PARENT"
EXIT_PARENT_GONE = 143  # 128 + SIGTERM: what the job would report had the parent stopped it
_HELD_CLAIMS: set[Path] = set()  # released by the watchdog before it ends the process
_watchdog: threading.Thread | None = None


def mark_sweep_parent() -> None:
    """Called by the CLI before a multirun's launcher starts: its job processes learn this pid."""
    os.environ[SWEEP_PARENT_ENV] = str(os.getpid())


def watch_sweep_parent(poll_s: float = 0.2) -> bool:
    """In a job process spawned directly by the sweep's parent, starts (once) a daemon thread that ends
    this process as soon as that parent is gone; returns whether this process is watched."""
    global _watchdog
    try:
        parent = int(os.environ.get(SWEEP_PARENT_ENV, ""))
    except ValueError:
        return False
    if parent == os.getpid() or os.getppid() != parent:  # the sweep's own process, or a remote job
        return False
    if _watchdog is None:
        _watchdog = threading.Thread(target=_watch, args=(parent, poll_s), name="sweep-parent", daemon=True)
        _watchdog.start()
    return True


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    for path in list(_HELD_CLAIMS):
        with contextlib.suppress(OSError):
            path.unlink()
    print(f"stopped: the sweep's process {parent} is gone; this job (pid {os.getpid()}) writes no row",
          file=sys.stderr, flush=True)
    os._exit(EXIT_PARENT_GONE)


def finished_rows(results_dir: str | Path) -> dict[str, dict]:
    """Maps run_id -> last ok row of ``results_dir/runs.jsonl`` (empty if there is no file).

    Corrupt lines are ignored here (the reporter reports them with their line numbers).
    """
    path = os.path.abspath(os.path.join(str(results_dir), RUNS_FILE))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _INDEXES.pop(path, None)
        return {}
    index = _INDEXES.get(path)
    if index is None or index.inode != st.st_ino or st.st_size < index.offset:
        index = _INDEXES[path] = _Index(inode=st.st_ino)
    if st.st_size > index.offset:
        with open(path, "rb") as f:
            f.seek(index.offset)
            chunk = f.read(st.st_size - index.offset)
        end = chunk.rfind(b"\n") + 1  # only complete lines
        index.rows.add(parse_lines(chunk[:end].split(b"\n"), path), path)
        index.offset += end
    return index.rows.ok


def finished_row(results_dir: str | Path, run_id: str) -> dict | None:
    """The last ok row of ``run_id`` in ``results_dir``, or None."""
    return finished_rows(results_dir).get(run_id)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def claim(results_dir: str | Path, run_id: str) -> Iterator[int | None]:
    """Claims ``run_id`` for this process while the block runs; yields None when the claim is ours,
    or the pid of the live process that holds it. The claim is removed when the block ends."""
    path = Path(results_dir) / ".claims" / run_id
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _alive(owner):
                yield owner
                return
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale claim (its process was killed): take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        _HELD_CLAIMS.add(path)
        try:
            yield None
        finally:
            _HELD_CLAIMS.discard(path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return
    yield None  # could not settle the claim (a race with another takeover): run anyway
