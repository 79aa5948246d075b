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
"""

from __future__ import annotations

import contextlib
import os
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
        try:
            yield None
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return
    yield None  # could not settle the claim (a race with another takeover): run anyway
