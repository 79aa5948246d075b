"""The reference sweep: every method x {W2, W3, W4, W6, W8 weight-only; W4A4, W4A8, W6A6, W8A8} x the
embedded Fashion-MNIST models, then the reporter. Resumable: run it again after an interruption and
only the missing results run (each run_id that has an ok row is skipped).

    python scripts/reference_sweep.py                      # -> results/reference/
    python scripts/reference_sweep.py --dry-run            # the plan and the commands, nothing runs
    python scripts/reference_sweep.py --launcher local --jobs 2   # joblib workers

Seeds: a (method, bits) setting gets ``--seeds`` seeds when its result depends on the seed (the
method asks for calibration data, which is generated or drawn from the seed), otherwise one.
GENIE runs W4A4 and W8A8 only, one seed, with its CPU preset (method=genie_cpu, data=genie_cpu);
ZeroQ runs with its CPU data preset (data=zeroq_cpu). Both presets are recorded in every row.
Reuse across the sweep: synthetic sets are cached by the generators (keyed by weights, generator
config and seed, not by bit-width: one set serves all nine bit-widths), and the FP32 logits of each
(weights, evaluation set) pair by the runner's eval cache (``--eval-cache``), so each FP32 forward
pass over the test set happens once per model. The tables and plots are made from the rows alone:
``python -m dfq_bench.report results/reference/runs.jsonl --out results/reference``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("resnet20_fmnist", "mobilenetv2_fmnist", "vgg_fmnist")
WEIGHT_ONLY = (2, 3, 4, 6, 8)
WEIGHT_ACT = ((4, 4), (4, 8), (6, 6), (8, 8))
# method -> (its config overrides, the bit-widths it runs: None = all, seeds: None = by the rule)
SPECIAL = {
    "genie": (["method=genie_cpu", "data=genie_cpu"], [(4, 4), (8, 8)], 1),
    "zeroq": (["method=zeroq", "data=zeroq_cpu"], None, None),
}
SKIP_METHODS = ("dummy",)  # a harness control, not a quantizer


@dataclass
class Step:
    method: str
    overrides: list[str]  # one Hydra multirun
    n_runs: int


def all_methods() -> list[str]:
    from dfq_bench.catalog import METHOD_MODULES

    return sorted(m for m in METHOD_MODULES if m not in SKIP_METHODS)


def seeded(method_overrides: list[str], wbits: int, abits: int | None, common: list[str]) -> bool:
    """Whether the result depends on the seed: the method asks the runner for calibration batches."""
    import torch
    from hydra import compose, initialize_config_dir

    from dfq_bench import catalog  # noqa: F401  (fills the registries)
    from dfq_bench.config import CONF_DIR, plugin_config, register_configs
    from dfq_bench.core.method import QuantContext
    from dfq_bench.registry import METHODS

    register_configs()
    overrides = [*method_overrides, f"wbits={wbits}", f"abits={'null' if abits is None else abits}", *common]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cls = METHODS.get(cfg.method.name)
    ctx = QuantContext(wbits, abits, cfg.protocol, 0, "cpu", torch.zeros(1))
    return bool(cls(plugin_config(cls, cfg.method, "method")).wants_data(ctx))


def plan(methods: list[str], models: list[str], seeds: int, common: list[str]) -> list[Step]:
    """One Hydra multirun per (method, wbits, seed count): models and abits are swept inside it."""
    steps = []
    for method in methods:
        method_args, bits, n_seeds = SPECIAL.get(method, ([f"method={method}"], None, None))
        pairs = bits or [(w, None) for w in WEIGHT_ONLY] + list(WEIGHT_ACT)
        groups: dict[tuple, list] = {}
        for wbits, abits in pairs:
            k = n_seeds or (seeds if seeded(method_args, wbits, abits, common) else 1)
            weight_only = abits is None
            # weight-only runs share one multirun; W/A runs are grouped by wbits (abits swept)
            groups.setdefault((weight_only, None if weight_only else wbits, k), []).append((wbits, abits))
        for (_, _, k), members in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1] or 0)):
            wb = sorted({w for w, _ in members})
            ab = sorted({"null" if a is None else str(a) for _, a in members})
            overrides = [*method_args, f"model={','.join(models)}", f"wbits={','.join(map(str, wb))}",
                         f"abits={','.join(ab)}", f"seed={','.join(map(str, range(k)))}", *common]
            steps.append(Step(method, overrides, len(models) * len(wb) * len(ab) * k))
    return steps


def repo_relative(path: str | Path) -> str:
    """``path`` (from the working directory) relative to the repository root when it lies inside it,
    else absolute: the commands run from the root, and SWEEP.md holds no path of this machine."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/reference", help="results_dir: rows, tables and plots")
    ap.add_argument("--methods", default=None, help="comma list (default: every method but dummy)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the seeded settings")
    ap.add_argument("--eval-cache", default=".cache/eval", help="FP32 logits cache directory ('' = off)")
    ap.add_argument("--launcher", choices=("basic", "local"), default="basic",
                    help="basic: one job after another; local: joblib workers (--jobs)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--sweep-dir", default="multirun/reference", help="Hydra's job folders (not results)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands only")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("extra", nargs="*", help="more overrides for every run, e.g. dataset.limit=1000")
    return ap.parse_args(argv)


def sweep_commands(args: argparse.Namespace) -> tuple[list[Step], list[list[str]]]:
    """The plan and one command per multirun, run from the repository root (paths relative to it)."""
    methods = args.methods.split(",") if args.methods else all_methods()
    common = [f"dataset={args.dataset}", f"results_dir={repo_relative(args.out)}", *args.extra]
    if args.eval_cache:
        common.append(f"eval_cache={repo_relative(args.eval_cache)}")
    stamp = "${now:%Y-%m-%d_%H-%M-%S}"
    hydra_args = [f"hydra.sweep.dir={repo_relative(args.sweep_dir)}/{stamp}"]
    if args.launcher == "local":
        hydra_args += ["hydra/launcher=local", f"hydra.launcher.n_jobs={args.jobs}"]
    steps = plan(methods, args.models.split(","), args.seeds, common)
    return steps, [[sys.executable, "-m", "dfq_bench", "-m", *s.overrides, *hydra_args] for s in steps]


def sweep_md(argv: list[str], started: str, minutes: float, total: int, commands: list[list[str]],
             out: str) -> str:
    """SWEEP.md: how the results were made. The commands hold repository-relative paths already; a
    path inside the repository typed in ``argv`` is shown relative to the root the same way."""
    typed = shlex.join(a.replace(f"{REPO}/", "") for a in argv)
    return (
        "# How these results were made\n\n"
        f"`python scripts/reference_sweep.py {typed}`"
        f" (started {started}, {minutes:.1f} min, {total} runs planned), which ran:\n\n"
        + "".join(f"    {shlex.join(['python', *c[1:]])}\n" for c in commands)
        + "\nthen `python -m dfq_bench.report "
        f"{out}/runs.jsonl --out {out}` (tables.md, tables.tex, summary.csv, failed.csv, plots).\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, rel_out = Path(args.out).resolve(), repo_relative(args.out)
    steps, commands = sweep_commands(args)
    total = sum(s.n_runs for s in steps)
    print(f"{total} runs in {len(steps)} multiruns -> {rel_out}/runs.jsonl")
    for s, cmd in zip(steps, commands, strict=True):
        print(f"  [{s.method}: {s.n_runs} runs] {shlex.join(['python', *cmd[1:]])}")
    if args.dry_run:
        return 0

    out.mkdir(parents=True, exist_ok=True)
    t0, failed = time.time(), []
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for s, cmd in zip(steps, commands, strict=True):
        res = subprocess.run(cmd, cwd=REPO)
        if res.returncode != 0:  # failed jobs wrote failed rows; the other jobs of that multirun ran
            failed.append(s.method)
    minutes = (time.time() - t0) / 60
    (out / "SWEEP.md").write_text(
        sweep_md(argv if argv is not None else sys.argv[1:], started, minutes, total, commands, rel_out))
    if not args.no_report:
        subprocess.run([sys.executable, "-m", "dfq_bench.report", f"{rel_out}/runs.jsonl", "--out", rel_out],
                       cwd=REPO, check=True)
    print(f"done in {minutes:.1f} min" + (f"; multiruns with failed jobs: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
