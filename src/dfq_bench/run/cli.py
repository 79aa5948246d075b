"""Command line: ``python -m dfq_bench [group=option ...] [key=value ...]`` (Hydra overrides).

Before Hydra composes anything, group choices are checked against conf/ and the registries so that
a typo gives one line ("unknown method 'squnat'; did you mean 'squant'? available: ...") and exit
code 2. A method that a third-party package registers through the ``dfq_bench.methods`` entry
point but that has no YAML in conf/method/ is selected with ``method=<name>`` too.

A run whose run_id already has an ok row in ``${results_dir}/runs.jsonl`` is skipped
(``skip_done=false`` reruns it), so rerunning a sweep resumes it. In a multirun (``-m``) a failed
job writes its failed row and raises ``JobFailed``: Hydra's launchers record it and go on with the
other jobs, then print the first failure in one line and exit 1.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from dfq_bench.config import CONF_DIR, GROUPS, ConfigError, UnsupportedError, register_configs, validate_config
from dfq_bench.registry import METHODS, UnknownNameError, unknown_name_message
from dfq_bench.results import ResultsDirError, check_writable
from dfq_bench.run.sweep import finished_row

log = logging.getLogger("dfq_bench")
EXIT_BAD_CONFIG, EXIT_RUN_FAILED = 2, 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class JobFailed(CompactHydraException):
    """A failed multirun job; Hydra prints it as one line (no traceback) after the whole batch."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def check_group_overrides(argv: list[str]) -> list[str]:
    """Returns argv with plugin methods rewritten; raises UnknownNameError on unknown options."""
    from dfq_bench import catalog  # noqa: F401

    out = []
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if eq and key in GROUPS and "," not in value and not value.startswith(("choice(", "range(")):
            options = group_options(key)
            if value not in options:
                if key == "method" and value in METHODS:
                    out += ["method=_plugin", f"method.name={value}"]
                    continue
                extra = METHODS.names() if key == "method" else []
                raise UnknownNameError(unknown_name_message(key, value, sorted(set(options + extra))))
        out.append(arg)
    return out


register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def task(cfg: DictConfig):
    from dfq_bench.run.runner import run, run_id, summary

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        validate_config(cfg)
        check_writable(cfg.results_dir)
    except (ConfigError, UnknownNameError, ResultsDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            raise JobFailed(f"error: {e}") from None
        sys.exit(EXIT_BAD_CONFIG)
    if cfg.skip_done:
        done = finished_row(cfg.results_dir, run_id(cfg))
        if done is not None:
            print(f"skipped: run_id {done['run_id']} already has an ok row in {cfg.results_dir}/runs.jsonl "
                  "(skip_done=false reruns it)")
            return done.get("top1")
    try:
        row = run(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    except UnsupportedError as e:  # refused before any work: no row was written
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            raise JobFailed(f"error: {e}") from None
        sys.exit(EXIT_BAD_CONFIG)
    except Exception as e:
        message = f"error: run failed ({type(e).__name__}: {e}); a failed row was written"
        print(message, file=sys.stderr)
        if multirun:
            raise JobFailed(message) from None
        sys.exit(EXIT_RUN_FAILED)
    print(summary(row))
    print(f"  row appended to {cfg.results_dir}/runs.jsonl")
    return row["top1"]


def composition_error(overrides: list[str]) -> str | None:
    """Composes a plain command line (no Hydra flags, no sweeps) up front, so that a bad typed value
    gives one line ("protocol.w_granularity: Invalid value 'x', expected one of [...]")."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    except Exception as e:
        cause = e.__cause__ or e
        key = getattr(cause, "full_key", None)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        return f"{key}: {first}" if key else first
    return None


def main() -> None:
    argv = sys.argv[1:]
    try:
        argv = check_group_overrides(argv)
    except UnknownNameError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    if not any(a.startswith("-") for a in argv):
        err = composition_error(argv)
        if err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_BAD_CONFIG)
    sys.argv[1:] = argv
    try:
        task()
    except KeyboardInterrupt:  # the runner has written the run's "interrupted" row, if it had started
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
