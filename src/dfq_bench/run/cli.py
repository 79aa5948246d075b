"""Command line: ``python -m dfq_bench [group=option ...] [key=value ...]`` (Hydra overrides).

Before Hydra composes anything, group choices are checked against conf/ and the registries so that
a typo gives one line ("unknown method 'squnat'; did you mean 'squant'? available: ...") and exit
code 2. A method that a third-party package registers through the ``dfq_bench.methods`` entry
point but that has no YAML in conf/method/ is selected with ``method=<name>`` too.

A run whose run_id already has an ok row in ``${results_dir}/runs.jsonl`` is skipped
(``skip_done=false`` reruns it), so rerunning a sweep resumes it. In a multirun (``-m``) a failed
job writes its failed row and raises ``JobFailed``: Hydra's launchers record it and go on with the
other jobs, then print the first failure in one line and exit 1. Before the first job of a multirun
starts, every job of the sweep is composed and validated here (``sweep_error``), so a bad value
anywhere in a list (``wbits=4,1``, ``method=rtn,squnat``) is the single run's line and exit code 2.
"""

from __future__ import annotations

import logging
import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from dfq_bench.config import CONF_DIR, GROUPS, ConfigError, UnsupportedError, register_configs, validate_config
from dfq_bench.registry import METHODS, UnknownNameError, unknown_name_message
from dfq_bench.results import ResultsDirError, check_writable
from dfq_bench.run.sweep import claim, finished_row, mark_sweep_parent, watch_sweep_parent

log = logging.getLogger("dfq_bench")
EXIT_BAD_CONFIG, EXIT_RUN_FAILED = 2, 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class JobFailed(CompactHydraException):
    """A failed multirun job; Hydra prints it as one line (no traceback) after the whole batch."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def unknown_option(key: str, value: str) -> UnknownNameError:
    extra = METHODS.names() if key == "method" else []
    return UnknownNameError(unknown_name_message(key, value, sorted(set(group_options(key) + extra))))


def check_group_overrides(argv: list[str]) -> list[str]:
    """Returns argv with plugin methods rewritten; raises UnknownNameError on unknown options.

    A list of options (a sweep) is left to ``sweep_error``, which checks each of its values."""
    from dfq_bench import catalog  # noqa: F401

    out = []
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if eq and key in GROUPS and "," not in value and not value.startswith(("choice(", "range(", "glob(")):
            if value not in group_options(key):
                if key == "method" and value in METHODS:
                    out += ["method=_plugin", f"method.name={value}"]
                    continue
                raise unknown_option(key, value)
        out.append(arg)
    return out


register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def task(cfg: DictConfig):
    from dfq_bench.run.runner import run_id

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:
        watch_sweep_parent()  # a local launcher's worker stops (no row) once the sweep's process is killed
    try:
        validate_config(cfg, HydraConfig.get().overrides.task)
        check_writable(cfg.results_dir)
    except (ConfigError, UnknownNameError, ResultsDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            raise JobFailed(f"error: {e}") from None
        sys.exit(EXIT_BAD_CONFIG)
    rid = run_id(cfg)
    with claim(cfg.results_dir, rid) as owner:
        if owner is not None:  # the same config, started at the same time
            print(f"skipped: run_id {rid} is being run by process {owner}; its row goes to "
                  f"{cfg.results_dir}/runs.jsonl")
            return None
        if cfg.skip_done:
            done = finished_row(cfg.results_dir, rid)
            if done is not None:
                print(f"skipped: run_id {done['run_id']} already has an ok row in {cfg.results_dir}/runs.jsonl "
                      "(skip_done=false reruns it)")
                return done.get("top1")
        return _run(cfg, multirun)


def _run(cfg: DictConfig, multirun: bool):
    from dfq_bench.run.runner import run, summary

    try:
        row = run(cfg, run_dir=HydraConfig.get().runtime.output_dir, choices=dict(HydraConfig.get().runtime.choices))
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
        return _first_line(e)
    return None


def _first_line(e: Exception) -> str:
    """A composition error as one line; OmegaConf's and Hydra's messages span several."""
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"{key}: {first}" if key else first


MULTIRUN_FLAGS = ("-m", "--multirun")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
LOCAL_LAUNCHERS = (  # their jobs run on this machine, so device=cuda:N must exist here
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
)


def sweep_error(argv: list[str]) -> str | None:
    """The first bad job of a multirun as the line a single run would print, or None.

    Expands the sweep as Hydra's basic sweeper will (its ``params``, e.g. an experiment's, then the
    command line), then checks each job's group choices (the did-you-mean line), composition and
    ``validate_config``, before any job starts. A job that a remote launcher (SLURM) runs is not held
    to the devices of this machine; it checks its device itself when it starts. Another sweeper
    chooses its jobs as it goes and is left to check each job when it runs.
    """
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        try:
            master = loader.load_configuration(config_name="config", overrides=overrides, run_mode=RunMode.MULTIRUN)
            if master.hydra.sweeper._target_ != BASIC_SWEEPER:
                return None
            params = [f"{k}={v}" for k, v in (master.hydra.sweeper.params or {}).items()]
            parsed = OverridesParser.create(config_loader=loader).parse_overrides(
                params + list(master.hydra.overrides.task))
            (jobs,) = BasicSweeper.split_arguments(parsed, None)
        except Exception as e:
            return _first_line(e) + _swept_group_hint(e, overrides)
        here = master.hydra.launcher._target_ in LOCAL_LAUNCHERS
        for job in jobs:
            try:
                _check_job_options(job)
                cfg = loader.load_sweep_config(master, list(job))
            except (ConfigError, UnknownNameError) as e:
                return str(e)
            except Exception as e:
                return _first_line(e)
            try:
                validate_config(cfg, job, device_here=here)
            except (ConfigError, UnknownNameError) as e:
                return str(e)
            except Exception:  # e.g. an interpolation only the running job can resolve: it checks itself
                log.debug("job %s not checked before the sweep", job, exc_info=True)
    return None


def _swept_group_hint(e: Exception, overrides: list[str]) -> str:
    """Where a multirun sweeps a group (``method=gdfq_cpu,adadfq_cpu``) and sets a key its default option lacks
    (``method.iters_per_epoch=2``): Hydra applies the fixed overrides to the config of the group's default
    first, so the key is 'not in struct' there; ``++key=value`` sets it in every job."""
    key = getattr(e.__cause__ or e, "full_key", None)
    group = str(key).partition(".")[0] if key else ""
    swept = any(o.partition("=")[0].lstrip("+~") == group and "," in o.partition("=")[2] for o in overrides)
    given = next((o for o in overrides if o.partition("=")[0] == key), None)
    if not (swept and given and "not in struct" in str(e.__cause__ or e)):
        return ""
    return (f" (a multirun over {group}= applies {given} to the default {group} first, which lacks the key; "
            f"write ++{given} to set it in every job)")


def _check_job_options(job: list[str]) -> None:
    for arg in job:
        key, eq, value = arg.lstrip("+~").partition("=")
        if eq and key in GROUPS and value != "_plugin" and value not in group_options(key):
            if key == "method" and value in METHODS:  # the _plugin rewrite needs a value of its own
                raise ConfigError(f"method={value} has no conf/method/{value}.yaml and cannot be one value of "
                                  f"a multirun list; valid: method={value} alone, or add the YAML")
            raise unknown_option(key, value)


LAUNCHER_EXTRAS = {"joblib": "joblib", "submitit": "slurm"}  # Hydra launcher plugin -> our extra


def launcher_hint(err: str) -> str:
    """Where a launcher's plugin could not be loaded, the extra that installs it."""
    m = re.search(r"Could not load 'hydra/launcher/(\w+?)(?:_local|_slurm)?'", err)
    if m and m.group(1) in LAUNCHER_EXTRAS:
        return f"; its plugin is not installed: pip install -e '.[{LAUNCHER_EXTRAS[m.group(1)]}]'"
    return ""


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in ("list", "describe"):  # what can be run (run/discover.py); no Hydra
        from dfq_bench.run.discover import main as discover

        sys.exit(discover(argv))
    try:
        argv = check_group_overrides(argv)
    except UnknownNameError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    flags = {a for a in argv if a.startswith("-")}
    if not flags:  # a single run
        err = composition_error(argv)
    else:  # a multirun is checked job by job; other Hydra flags (--cfg, --info, ...) are Hydra's
        err = sweep_error(argv) if flags <= set(MULTIRUN_FLAGS) else None
    if err:
        print(f"error: {err.rstrip('.')}{launcher_hint(err)}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    sys.argv[1:] = argv
    if flags & set(MULTIRUN_FLAGS):
        mark_sweep_parent()
    try:
        task()
    except KeyboardInterrupt:  # the runner has written the run's "interrupted" row, if it had started
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
