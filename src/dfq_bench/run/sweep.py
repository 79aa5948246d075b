"""Resuming sweeps: which run_ids already have a finished (``status == "ok"``) row.

A sweep is resumed by running the same command again: every job whose run_id already has an ok row
in ``${results_dir}/runs.jsonl`` is skipped (``skip_done=true``, the default), so the unit of work is
the result, not the attempt. Failed rows do not count: their configs run again.

One launcher process may run hundreds of jobs, so the index is cached per file and only the bytes
appended since the last look are parsed (the file is append-only; a smaller file or a new inode
means it was replaced, and it is read again from the start). A line still being written (no
trailing newline yet) is left for the next look.
"""

from __future__ import annotations

import os
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
