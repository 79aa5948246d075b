"""Optional experiment trackers that mirror result rows (``logger=wandb``) and reports.

``runs.jsonl`` stays the record: a tracker gets a copy, and a tracker failure (not installed, no
network, bad credentials) is logged as a warning and never fails the run whose row is already
written. One wandb run per result row, named by its run_id, with the row's identity as the wandb
config and every field (nested dicts flattened with dots) in its summary; failed rows are logged
too, with their error. ``log_report`` logs the reporter's summary table and plots as one wandb run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dfq_bench.results import fields

log = logging.getLogger(__name__)
IDENTITY = fields("identity")  # the wandb run's config


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"protocol": {"fold_bn": True}}`` -> ``{"protocol.fold_bn": True}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _wandb_init(lcfg, **kw):
    import wandb

    return wandb.init(project=lcfg.get("project") or "dfq_bench", entity=lcfg.get("entity"),
                      group=lcfg.get("group"), tags=list(lcfg.get("tags") or []) or None,
                      mode=lcfg.get("mode"), reinit=True, **kw)


def log_row(lcfg, row: dict) -> None:
    """Sends ``row`` to the logger named by ``lcfg.name`` (``none``: nothing)."""
    if lcfg is None or lcfg.get("name", "none") == "none":
        return
    if lcfg.get("name") != "wandb":
        log.warning("logger.name=%r is unknown; valid: none, wandb (row not mirrored)", lcfg.get("name"))
        return
    try:
        bits = f"W{row['wbits']}A{row['abits'] if row['abits'] is not None else 32}"
        run = _wandb_init(lcfg, name=f"{row['method']}-{row['model']}-{bits}-s{row['seed']}-{row['run_id']}",
                          config=flatten({k: row.get(k) for k in IDENTITY}), job_type="run")
        fields = {k: v for k, v in flatten(row).items() if v is None or isinstance(v, (bool, int, float, str))}
        run.summary.update(fields)
        run.finish(exit_code=0 if row.get("status") == "ok" else 1)
    except Exception as e:  # the row is in runs.jsonl already; a tracker must not fail the run
        log.warning("wandb logging failed (%s: %s); the row is in runs.jsonl", type(e).__name__, e)


def log_report(out_dir: str | Path, project: str = "dfq_bench", mode: str | None = None) -> None:
    """Logs ``summary.csv`` as a wandb Table and every PNG plot of a report directory as images."""
    import csv

    import wandb

    out_dir = Path(out_dir)
    run = _wandb_init({"project": project, "mode": mode}, name=f"report-{out_dir.name}", job_type="report")
    try:
        with open(out_dir / "summary.csv", newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            run.log({"summary": wandb.Table(columns=rows[0], data=rows[1:])})
        for png in sorted(out_dir.glob("*.png")):
            run.log({f"plots/{png.stem}": wandb.Image(str(png))})
    finally:
        run.finish()
