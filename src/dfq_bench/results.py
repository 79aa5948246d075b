"""Result rows: one flat JSON object per run, appended to ``runs.jsonl`` as a single line under an
exclusive file lock (so concurrent runs never interleave), and written as ``result.json`` by
temp file + rename. Nothing already in a file is ever rewritten."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

RUNS_FILE = "runs.jsonl"


class ResultsDirError(OSError):
    pass


def check_writable(results_dir: str | Path) -> Path:
    """Creates ``results_dir`` if needed and checks a row could be appended; raises one line."""
    path = Path(results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(path / RUNS_FILE, "a"):
            pass
    except OSError as e:
        raise ResultsDirError(
            f"results_dir={str(results_dir)!r} is not writable ({e.strerror or e}); "
            "valid: a directory you can write to"
        ) from None
    return path


def append_row(results_dir: str | Path, row: dict) -> None:
    """Appends ``row`` as one line, flushed and fsynced under an exclusive lock.

    If the file does not end with a newline (a writer killed in the middle of its line), the row
    starts on a new line, so the torn line stays one corrupt line and does not swallow this row.
    """
    line = json.dumps(row, sort_keys=True, default=str) + "\n"
    with open(Path(results_dir) / RUNS_FILE, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            size = os.fstat(f.fileno()).st_size
            if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
                line = "\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json(path: str | Path, obj: dict) -> None:
    """Writes ``obj`` atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_rows(path: str | Path, errors: list | None = None) -> Iterator[dict]:
    """Yields the rows of a runs.jsonl; a corrupt line is reported in ``errors`` and skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                if errors is not None:
                    errors.append(f"{path}:{lineno}: corrupt row skipped ({e.msg})")
