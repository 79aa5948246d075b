"""Result rows: their schema, the store and the one reader.

One flat JSON object per run, appended to ``runs.jsonl`` as a single line under an exclusive file
lock (so concurrent runs never interleave), and written as ``result.json`` by temp file + rename.
Nothing already in a file is ever rewritten. ``LastOk`` implements "the last ok row per run_id wins"
for the reporter, the sweep's done-index and scripts/table_*.py.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

RUNS_FILE = "runs.jsonl"

# --- the schema ---------------------------------------------------------------------------------
# Keys added to a config block after rows had been written without them, and the value those rows ran with:
# the run_id leaves a key out at that value (config.identity_config), and the reporter reads a row without it
# as having it (results/report.py), so old and new rows of one setting pool.
ADDED_DEFAULTS: dict[str, dict[str, str]] = {"protocol": {"w_range": "include_zero", "a_placement": "layer_input"}}
# Row fields added after rows had been written without them, and the value those rows had: the reporter reads a
# row without one as having it (every row before the `device` field ran on the CPU).
ADDED_FIELD_DEFAULTS: dict[str, str] = {"device": "cpu"}

# The core fields of a row, by group: "fields": meaning. README.md's table is schema_table()
# (tests/test_rows.py checks it, and that a real row has every field). Methods add their own counts
# as further fields; `paper` (experiment= overlays) and the deploy=onnxruntime fields are optional.
# Paths in a row (run_dir, deploy_dir, data.cache_dir, data_info.cache_file, dataset_info.root and
# train_root, a local weights file) are relative to the repository root when inside it, else as given
# (run/runner.py `_relative_paths`): committed rows hold no absolute path of the machine that made them.
SCHEMA: dict[str, dict[str, str]] = {
    "identity": {
        "run_id": "hash of the resolved config (minus `results_dir`, `progress`)",
        "method method_version method_cfg": "the plugin, its numerics version, its keys",
        "model weights dataset": "what was evaluated; `weights` is the weights' identity",
        "wbits abits seed protocol data": "the choices; `data` is the calibration generator config",
        # added after the rows of results/ were made: they lack it and ran on the CPU (ADDED_FIELD_DEFAULTS)
        "device": "the run's `device=` (`cpu`, `cuda`, `cuda:N`); `device_name` names that processor or GPU",
        "mp": "the mixed-precision keys that decide the plan (`mp.*`: allocator, budget, bits; core/mixed.py); "
        "null: the protocol's bits",
    },
    "status": {"status error": '`"ok"` or `"failed"`, with the error text'},
    "metrics": {
        "top1 top5 top1_fp32 top5_fp32 delta_top1": "percent, quantized and FP32 in the same run",
        "agree_fp32": "percent of samples whose quantized top-1 equals the FP32 top-1",
        "kl_fp32": "mean KL(p_fp32 ‖ p_quant) of the softmax outputs",
        "n_eval": "number of evaluation samples",
    },
    "timing": {
        "t_synth_s t_quant_s t_eval_s t_eval_fp32_s t_total_s": "seconds per phase (perf_counter)",
        "peak_rss_mb": "peak resident memory of the process",
    },
    "provenance": {
        "git_sha git_dirty versions device_name started_at run_dir": (
            "where and with what it ran (`git_dirty`: tracked changes outside the run's own results directory)"),
        "data_info eval_cache": "where calibration data and FP32 logits came from (cache hit or miss)",
        # added with issue 17: rows made before it lack it (results.report and row_command accept that)
        "command": "the command line that reproduces the row from the repository root (run/command.py)",
    },
    "run info": {  # set as the run gets there: absent from a row that failed before; `dummy` has no counts
        "dataset_info": "the evaluation set as loaded (source, split, limit, preprocessing)",
        "act_range n_layers n_bn_folded n_act_quant n_act_bn_rule": "what the pipeline did",
        "eff_wbits": "stored bits per weight over the quantized layers (first/last layers at their own bits; "
        "REx's extra orders counted; scales not counted)",
        "bn_fold_rule n_norm_act_split n_bn_unfolded": "how BN was folded (`graph`, or `module` for an untraceable "
        "model; null when not folded), fused norm-activation modules split, BN modules left unfolded",
    },
    "mixed precision": {  # only in rows with mp.allocator set (OPTIONAL_GROUPS)
        "mp_bits": "weight bits of every Conv/Linear in plan (execution) order, fixed first/last layers included",
        "avg_wbits size_mb": "`eff_wbits` again; MB of the quantized weights at their bits plus per-channel "
        "float32 scales and (asymmetric) zero-points at the layer's bits (biases not counted)",
        "mp_budget mp_objective": "the budget in bits of the allocated layers, the bits used, the DP's bin; "
        "summed sensitivity of the plan (null for `uniform`, `random`)",
        "mp_sensitivity": "where the sensitivities came from: calibration source, images, cache hit or miss",
        "t_sensitivity_s t_plan_s": "seconds of the sensitivity pass (a cache hit: its load) and of the solver, "
        "both inside `t_quant_s`",
    },
}
OPTIONAL_GROUPS = ("mixed precision",)  # groups whose fields only some rows have
FIELDS: dict[str, str] = {f: group for group, lines in SCHEMA.items() for names in lines for f in names.split()}


def fields(*groups: str) -> tuple[str, ...]:
    """The schema's fields of ``groups``, in schema order."""
    return tuple(f for f, g in FIELDS.items() if g in groups)


IN_EVERY_ROW = fields("identity", "status", "metrics", "timing", "provenance")  # failed rows too


def schema_table() -> str:
    """The schema as the Markdown table in README.md."""
    lines = ["| group | fields | meaning |", "|---|---|---|"]
    for group, entries in SCHEMA.items():
        for i, (names, meaning) in enumerate(entries.items()):
            lines.append(f"| {'' if i else group} | {', '.join(f'`{n}`' for n in names.split())} | {meaning} |")
    return "\n".join(lines) + "\n"


# --- writing ------------------------------------------------------------------------------------


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


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Calls ``write(tmp)`` on a temp file beside ``path`` and renames it over ``path``: a reader sees
    the old file or the new one, never part of one. The temp file is removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"))


# --- reading ------------------------------------------------------------------------------------


# What the reporter needs of a row to place it in a table: these fields in every row, ok or failed,
# and a top1 in an ok row, unless none of its evaluation images has a label (dataset_info.n_labelled = 0:
# natural_images; top-1 is null, agreement and KL are not). Rows of an older schema lack later fields
# (agree_fp32, t_eval_fp32_s, ...): those read as null, so only these are required.
NEEDED = ("run_id", "status", "model", "dataset", "method", "wbits", "abits", "seed")
NUMBERS = fields("metrics", "timing")  # a number or null
INTEGERS = ("wbits", "abits", "seed")  # an integer; abits null = weight-only
_KINDS = {str: "a string", list: "an array", dict: "an object", int: "a number", float: "a number",
          bool: "a boolean", type(None): "null"}


def _kind(v) -> str:
    return _KINDS.get(type(v), type(v).__name__)


_NEEDED_SET = frozenset(NEEDED)
_NUMBER_TYPES = frozenset((int, float, type(None)))
_INT_OR_NULL = frozenset((int, type(None)))


def row_problem(row) -> str | None:
    """Why the reporter cannot use ``row`` (a parsed JSON value), or None if it can."""
    # A row as the runner writes it passes these exact-type checks, set operations at C speed (a third of the
    # time of the checks below, which took 0.2 s of the reporter's 4 at 100,000 rows); any other row gets the
    # checks below, which say why. They accept no row that those reject (exact types: a bool is no int here).
    if (type(row) is dict and row.keys() >= _NEEDED_SET and type(row["run_id"]) is str
            and type(row["wbits"]) is int and type(row["seed"]) is int and type(row["abits"]) in _INT_OR_NULL
            and _NUMBER_TYPES.issuperset(map(type, map(row.get, NUMBERS)))
            and (row["status"] != "ok" or row.get("top1") is not None)):
        return None
    if not isinstance(row, dict):
        return f"not a JSON object but {_kind(row)}"
    missing = [f for f in NEEDED if f not in row]
    if missing:
        return f"missing field: {', '.join(missing)}"
    if not isinstance(row["run_id"], str):
        return f"run_id={row['run_id']!r} is {_kind(row['run_id'])}; valid: a string"
    for f in INTEGERS:
        v = row[f]
        if (isinstance(v, bool) or not isinstance(v, int)) and not (v is None and f == "abits"):
            return f"{f}={v!r} is {_kind(v)}; valid: an integer" + (" or null" if f == "abits" else "")
    for f in NUMBERS:
        v = row.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"{f}={v!r} is {_kind(v)}; valid: a number or null"
    info = row.get("dataset_info")
    unlabelled = isinstance(info, dict) and type(info.get("n_labelled")) is int and info["n_labelled"] == 0
    if row["status"] == "ok" and row.get("top1") is None and not unlabelled:
        return "an ok row without top1"
    return None


_scan = json.JSONDecoder().scan_once  # one JSON value from an index of a string: (value, end)
_JSON_SPACE = " \t\n\r"  # the whitespace JSON allows around a value


def parse_lines(lines: Iterable[str | bytes], where: str | Path, errors: list | None = None,
                check: Callable[[object], str | None] | None = None) -> Iterator:
    """Yields the JSON value of each non-blank line (bytes are decoded as UTF-8). A line that is not
    UTF-8 or not JSON, or whose value ``check`` returns a reason for (None: fine), is reported in
    ``errors`` as ``where:lineno: <reason>`` and skipped."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = (line.decode("utf-8") if isinstance(line, bytes) else line).strip(_JSON_SPACE)
            try:  # the C scanner directly: json.loads' Python layers cost a sixth of the parse at 100,000 rows
                value, end = _scan(text, 0)
            except StopIteration:
                end = -1
            if end != len(text):  # not one JSON value: json.loads says why, in its words
                value = json.loads(text)
        except UnicodeDecodeError as e:
            problem = f"row skipped (invalid UTF-8 at byte {e.start})"
        except ValueError as e:
            problem = f"corrupt row skipped ({getattr(e, 'msg', e)})"
        else:
            reason = check(value) if check is not None else None
            if reason is None:
                yield value
                continue
            problem = f"row skipped ({reason})"
        if errors is not None:
            errors.append(f"{where}:{lineno}: {problem}")


def read_rows(path: str | Path, errors: list | None = None,
              check: Callable[[object], str | None] | None = None) -> Iterator:
    """Yields the rows of a runs.jsonl in file order; a line that is not UTF-8 or not JSON, or that
    ``check`` rejects (``row_problem`` for the reporter), is reported in ``errors`` and skipped."""
    with open(path, "rb") as f:  # decoded line by line: one bad byte costs its line, not the file
        yield from parse_lines(f, path, errors, check)


class LastOk:
    """Folds rows, in the order given, into ``ok``: run_id -> its last ok row. Keeps the last other
    row of each run_id in ``failed`` and counts rows, so a caller can list the run_ids that never
    succeeded and say how many rows were superseded. ``add`` can be called again as a file grows."""

    def __init__(self):
        self.ok: dict[str, dict] = {}
        self.failed: dict[str, dict] = {}
        self.n_rows = 0  # rows with a run_id
        self.warnings: list[str] = []

    def add(self, rows: Iterable, where: str | Path = "") -> LastOk:
        for row in rows:
            try:
                rid, status = row["run_id"], row.get("status")
            except (KeyError, TypeError, AttributeError):
                self.warnings.append(f"{where}: a row without run_id skipped")
                continue
            self.n_rows += 1
            (self.ok if status == "ok" else self.failed)[rid] = row
        return self

    def read(self, *paths: str | Path, check: Callable[[object], str | None] | None = None) -> LastOk:
        """Adds the rows of each runs.jsonl; corrupt lines, and rows ``check`` rejects, become
        ``file:line`` warnings."""
        for path in paths:
            self.add(read_rows(path, self.warnings, check), path)
        return self

    def never_ok(self) -> list[dict]:
        """The last row of each run_id without an ok row."""
        return [r for rid, r in self.failed.items() if rid not in self.ok]

    @property
    def n_superseded(self) -> int:  # rows replaced by a later row of the same run_id
        return self.n_rows - len(self.ok) - len(self.never_ok())
