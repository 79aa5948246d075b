"""One run: build the model, make calibration data, quantize, evaluate FP32 and quantized models in
one pass over the data, and write one result row (also when the method fails)."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import platform
import random
import resource
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dfq_bench import api, catalog  # noqa: F401  (catalog fills the registries)
from dfq_bench.config import UnsupportedError, identity_config, mp_identity, plugin_config
from dfq_bench.core.method import QuantContext
from dfq_bench.core.mixed import from_config
from dfq_bench.core.modules import NonFiniteError, first_nonfinite
from dfq_bench.data import UNLABELLED, DatasetError
from dfq_bench.models import BuiltModel, reestimate_bn
from dfq_bench.registry import DATASETS, METHODS, MODELS, SYNTH
from dfq_bench.results import IN_EVERY_ROW, append_row, check_writable, write_json
from dfq_bench.run.command import command_line
from dfq_bench.run.evalcache import EvalCache, FP32Outputs
from dfq_bench.run.loggers import log_row

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]
_PACKAGES = ("dfq_bench", "torch", "torchvision", "timm", "hydra-core", "omegaconf", "numpy")


def run_id(cfg: DictConfig) -> str:
    """Hash of the resolved config minus keys that do not change the result."""
    blob = json.dumps(identity_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def progress_bar(enabled: bool):
    from tqdm import tqdm

    def bar(iterable, **kw):
        return tqdm(iterable, disable=not enabled, leave=False, **kw)

    return bar


def build_model(cfg) -> BuiltModel:
    return MODELS.get(cfg.model.name if cfg.model.source == "zoo" else cfg.model.source)(cfg.model)


def bn_images(bundle, n: int) -> tuple[torch.Tensor, str]:
    """``n`` images for ``model.bn_reestimate``: the dataset's train split (seed 0) when it has one,
    else its first evaluation images (a random-init check, never an accuracy claim)."""
    if bundle.calib is not None:
        return bundle.calib(n, 0), "train"
    xs, k = [], 0
    for x, _ in bundle.loader:
        xs.append(x[: n - k])
        k += len(xs[-1])
        if k >= n:
            break
    return torch.cat(xs), "eval"


def model_label(cfg) -> str:
    return cfg.model.name if cfg.model.source == "zoo" else f"{cfg.model.source}:{cfg.model.name}"


@torch.inference_mode()
def evaluate(fp_model: nn.Module, q_model: nn.Module, loader, device: str, bar,
             fp32: FP32Outputs | None = None, record: list | None = None) -> dict:
    """Feeds each batch once to both models. Top-k in percent; agreement of the two top-1
    predictions; mean KL(p_fp32 || p_quant) of the softmax outputs; forward time of each model.
    Top-k counts only images with a label (``UNLABELLED`` ones: natural_images), None when none has;
    agreement and KL count every image.
    A model may be any callable from images to logits (deploy/check.py passes an ONNX Runtime session).

    ``fp32``: cached FP32 logits of this loader (run/evalcache.py): the FP32 forward is skipped and
    its logits are read from the cache. ``record``: a list that receives (FP32 logits, labels) of
    every batch on CPU, to make a cache entry.
    """
    n = n_lab = top1 = top5 = top1_fp = top5_fp = agree = 0
    kl_sum, t_q, t_fp = 0.0, 0.0, 0.0
    for x, y in bar(loader, desc="eval"):
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        if fp32 is None:
            logits_fp = fp_model(x)
        else:
            logits_fp = fp32.logits[n:n + len(y)].to(device)
            if len(logits_fp) != len(y) or not torch.equal(fp32.labels[n:n + len(y)].to(device), y):
                raise RuntimeError(f"eval cache does not match this loader at image {n}; delete the entry")
        t1 = time.perf_counter()
        if record is not None:
            record.append((logits_fp.float().cpu(), y.cpu()))
        logits_q = q_model(x)
        t_q += time.perf_counter() - t1
        for what, net, logits in (("quantized", q_model, logits_q), ("FP32", fp_model, logits_fp)):
            if not bool(torch.isfinite(logits).all()):
                hookable = isinstance(net, nn.Module) and (net is not fp_model or fp32 is None)  # ran on x
                where = first_nonfinite(net, x) if hookable else None
                raise NonFiniteError(f"the {what} model's output holds NaN or Inf at evaluation image {n}"
                                     + (f"; first non-finite module: {where}" if where else ""))
        t_fp += t1 - t0
        if len(y) and (int(y.min()) < UNLABELLED or int(y.max()) >= logits_fp.shape[1]):  # never a lower accuracy
            bad = int(y.max()) if int(y.max()) >= logits_fp.shape[1] else int(y.min())
            raise DatasetError(f"label {bad} in evaluation images {n}..{n + len(y) - 1} is outside the model's "
                               f"{logits_fp.shape[1]} classes (valid: 0..{logits_fp.shape[1] - 1}, "
                               f"or {UNLABELLED}: no label)")
        k = min(5, logits_fp.shape[1])
        pred_fp, pred_q = logits_fp.topk(k, 1).indices, logits_q.topk(k, 1).indices
        top1_fp += int((pred_fp[:, 0] == y).sum())  # an UNLABELLED view matches no class
        top1 += int((pred_q[:, 0] == y).sum())
        top5_fp += int((pred_fp == y[:, None]).any(1).sum())
        top5 += int((pred_q == y[:, None]).any(1).sum())
        n_lab += int((y != UNLABELLED).sum())
        agree += int((pred_fp[:, 0] == pred_q[:, 0]).sum())
        logp_fp, logp_q = F.log_softmax(logits_fp.float(), 1), F.log_softmax(logits_q.float(), 1)
        kl_sum += float((logp_fp.exp() * (logp_fp - logp_q)).sum())
        n += len(y)
    if n == 0:
        raise RuntimeError("the evaluation set is empty")
    if fp32 is not None:
        if n != len(fp32.labels):
            raise RuntimeError(f"eval cache holds {len(fp32.labels)} images, this loader {n}; delete the entry")
        t_fp = fp32.t_eval_fp32_s
    pct = lambda c: 100.0 * c / n_lab if n_lab else None  # noqa: E731  (top-k over labelled images only)
    return {
        "top1": pct(top1), "top5": pct(top5), "top1_fp32": pct(top1_fp), "top5_fp32": pct(top5_fp),
        "agree_fp32": 100.0 * agree / n, "kl_fp32": kl_sum / n, "n_eval": n,
        "t_eval_s": t_q, "t_eval_fp32_s": t_fp,
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(cfg: DictConfig) -> dict:
    """``git_dirty``: tracked files differ from HEAD, not counting the run's own results directory (a sweep
    appending to a committed runs.jsonl changes no code)."""
    exclude = []
    results = Path(str(cfg.get("results_dir") or "results")).resolve()
    if results.is_relative_to(REPO) and results != REPO:
        exclude = ["--", ".", f":(exclude){results.relative_to(REPO)}"]
    status = _git("status", "--porcelain", "--untracked-files=no", *exclude)
    return {
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "versions": _versions(),
        "device_name": device_name(cfg.device),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def run(cfg: DictConfig, run_dir: str | Path | None = None, progress: bool | None = None,
        choices: dict | None = None) -> dict:
    """Runs one configuration (already validated) and returns its row.

    ``choices``: the group choices it was composed with (Hydra's ``runtime.choices``; the CLI passes
    them), for the row's ``command``; without them they are inferred from ``cfg`` (run/command.py).

    The row is appended to ``${results_dir}/runs.jsonl`` (and written to ``run_dir/result.json``)
    whether the run succeeds or fails; a failure is re-raised after the row is written (Ctrl-C too:
    its row's error is "interrupted"). A cache that cannot be written never fails the run. A refusal
    (``UnsupportedError``: the method cannot run on this model) is raised before any calibration
    data is made, and writes no row.
    """
    results_dir = check_writable(cfg.results_dir)
    if progress is None:
        progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    bar = progress_bar(progress)
    method_cls = METHODS.get(cfg.method.name)
    method_cfg = plugin_config(method_cls, cfg.method, "method")
    row = {
        **dict.fromkeys(IN_EVERY_ROW),  # None until measured
        "run_id": run_id(cfg), "status": "failed",
        "method": cfg.method.name, "method_version": method_cls.version,
        "model": model_label(cfg), "dataset": cfg.dataset.name,
        "wbits": cfg.wbits, "abits": cfg.abits, "seed": cfg.seed, "mp": mp_identity(cfg), "device": str(cfg.device),
        "protocol": OmegaConf.to_container(cfg.protocol, enum_to_str=True),
        "method_cfg": OmegaConf.to_container(method_cfg, enum_to_str=True),
        "t_synth_s": 0.0, **provenance(cfg),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "command": command_line(cfg, choices),  # reproduces this row from a clone's root (run/command.py)
    }
    if cfg.get("paper") is not None:
        row["paper"] = OmegaConf.to_container(cfg.paper, resolve=True)
    t_start = time.perf_counter()
    checkpoint = (Path(cfg.checkpoint_dir).expanduser() / f"{row['run_id']}.pt") if cfg.get("checkpoint_dir") else None
    try:
        seed_everything(cfg.seed)
        built = build_model(cfg)
        row["weights"] = built.weights
        model = built.model.to(cfg.device).eval()
        bundle = DATASETS.get(cfg.dataset.name)(cfg.dataset, built)
        row["dataset_info"] = bundle.info
        if cfg.dataset.limit is not None and cfg.dataset.limit > bundle.n_eval:  # said, not silently capped
            bundle.info["limit_above_split"] = bundle.n_eval
            log.warning("dataset.limit=%d is above the %d images of %s: evaluating all %d", cfg.dataset.limit,
                        bundle.n_eval, cfg.dataset.name, bundle.n_eval)
        if cfg.model.get("bn_reestimate"):
            reestimate_bn(built, *bn_images(bundle, cfg.model.bn_reestimate))
            row["weights"] = built.weights
        example = torch.zeros((2, *built.input_size), device=cfg.device)
        ctx = QuantContext(cfg.wbits, cfg.abits, cfg.protocol, cfg.seed, cfg.device, example,
                           progress=bar, planner=from_config(cfg.get("mp"), data=cfg.data.name))  # None: mp off
        method = api.build_method(method_cls(method_cfg))
        method.check_model(model, ctx, model_label(cfg))  # a refusal: one line, no row, before any work
        if ctx.planner is not None:  # a size budget out of this model's reach: likewise
            ctx.planner.check_model(model, ctx, model_label(cfg))
        if method.wants_data(ctx):
            gen = SYNTH.get(cfg.data.name)
            if hasattr(gen, "check_model"):  # e.g. BN-statistics data on a model without BN: refused
                gen.check_model(model, model_label(cfg))
            gen_cfg = plugin_config(gen, cfg.data, "data")
            if hasattr(gen, "resolve"):  # e.g. noise's space: auto -> pixel | raw for this rule
                gen_cfg = gen.resolve(gen_cfg, method.act_range(ctx) if cfg.abits is not None else None)
            row["data"] = OmegaConf.to_container(gen_cfg, enum_to_str=True)
            t0 = time.perf_counter()
            ctx.calib = api.make_calib(gen_cfg.name, model, input_size=built.input_size, seed=cfg.seed,
                                       dataset=bundle, device=cfg.device, **{k: v for k, v in row["data"].items()
                                                                             if k != "name"})
            row["t_synth_s"] = time.perf_counter() - t0
            row["data_info"] = getattr(ctx.calib, "info", None)  # e.g. cache hit, generation time
            if (row["data_info"] or {}).get("cache") == "miss":  # made here: its earlier part too, if resumed
                row["t_synth_s"] += row["data_info"].get("resumed", {}).get("t_before_s", 0.0)
        t0 = time.perf_counter()
        qmodel, info = api.quantize(model, method, wbits=cfg.wbits, abits=cfg.abits, example_input=example,
                                    calib=ctx.calib, protocol=cfg.protocol, seed=cfg.seed, device=cfg.device,
                                    progress=bar, planner=ctx.planner, checkpoint=checkpoint,
                                    eval_data=bundle.loader if getattr(method, "needs_eval", False) else None)
        ctx.info = info
        row["t_quant_s"] = time.perf_counter() - t0 + (info.get("resumed") or {}).get("t_before_s", 0.0)
        clash = set(ctx.info) & set(row)
        if clash:
            raise RuntimeError(f"method info would overwrite row fields {sorted(clash)}")
        row.update(ctx.info)
        cache = fp32 = record = None
        if cfg.get("eval_cache"):
            cache = EvalCache.for_run(cfg.eval_cache, model_label(cfg), built,
                                      OmegaConf.to_container(cfg.dataset), bundle.info, cfg.device)
            fp32 = cache.load()
            record = [] if fp32 is None else None
            row["eval_cache"] = "miss" if fp32 is None else "hit"
        row.update(evaluate(model, qmodel.to(cfg.device).eval(), bundle.loader, cfg.device, bar,
                            fp32=fp32, record=record))
        if record:  # never raises: an unwritable cache is a warning, the result stands
            cache.save(FP32Outputs(torch.cat([r[0] for r in record]), torch.cat([r[1] for r in record]),
                                   row["t_eval_fp32_s"]))
        row["delta_top1"] = None if row["top1"] is None else row["top1"] - row["top1_fp32"]  # no labels: None
        if cfg.get("deploy"):  # deployed-integer check (deploy/); an export error fails the row
            from dfq_bench.deploy import deployed_check

            row.update(deployed_check(model, qmodel, bundle.loader, example,
                                      None if run_dir is None else Path(run_dir) / "deploy"))
        row["status"] = "ok"
    except UnsupportedError:
        raise  # refused before any work: no row, like a bad config value
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        _write_row(cfg, results_dir, run_dir, row, t_start)
        raise
    except KeyboardInterrupt:  # Ctrl-C: a failed row that says so (a resumed sweep reruns it)
        row["error"] = "interrupted"
        _write_row(cfg, results_dir, run_dir, row, t_start)
        raise
    _write_row(cfg, results_dir, run_dir, row, t_start)
    if checkpoint is not None:  # the row holds the result now (a stopped run resumes from the file)
        try:
            checkpoint.unlink(missing_ok=True)
        except OSError as e:
            log.warning("checkpoint %s cannot be removed (%s)", checkpoint, e)
    return row


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies inside it, ``~/...`` under the home
    directory (caches, site-packages of a user install), else as given: committed rows hold no
    absolute path of the machine that made them (a path elsewhere is the user's own)."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(REPO):
        return str(resolved.relative_to(REPO))
    home = Path.home().resolve()
    return f"~/{resolved.relative_to(home)}" if resolved.is_relative_to(home) and resolved != home else str(path)


# the row's path fields: top-level keys, and (field, key) of its dicts
_PATH_KEYS = ("run_dir", "deploy_dir")
_NESTED_PATH_KEYS = (("data", "cache_dir"), ("data_info", "cache_file"), ("dataset_info", "root"),
                     ("dataset_info", "train_root"), ("mp_sensitivity", "cache_file"))


def _relative_paths(row: dict) -> None:
    for key in _PATH_KEYS:
        if row.get(key) is not None:
            row[key] = repo_relative(row[key])
    for field, key in _NESTED_PATH_KEYS:
        info = row.get(field)
        if isinstance(info, dict) and info.get(key) is not None:
            row[field] = {**info, key: repo_relative(info[key])}  # a copy: the dict may be the source's own
    weights, in_repo = row.get("weights"), f"file:{REPO}/"  # a local file's identity: "file:<path> sha256:..."
    if isinstance(weights, str) and in_repo in weights:
        row["weights"] = weights.replace(in_repo, "file:")


def _write_row(cfg, results_dir: Path, run_dir, row: dict, t_start: float) -> None:
    row["t_total_s"] = time.perf_counter() - t_start
    row["peak_rss_mb"] = peak_rss_mb()
    _relative_paths(row)
    append_row(results_dir, row)
    if run_dir is not None:
        write_json(Path(run_dir) / "result.json", row)
    log_row(cfg.get("logger"), row)


def summary(row: dict) -> str:
    """A short human table for the end of a CLI run."""
    f = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    bits = f"W{row['wbits']}A{row['abits'] if row['abits'] is not None else 32}"
    mp = row.get("mp")
    if mp and row.get("avg_wbits") is not None:  # mixed precision: the budget and the plan's mean bits
        budget = f"avg_wbits={mp['avg_wbits']:g}" if mp.get("avg_wbits") is not None else f"size_mb={mp['size_mb']:g}"
        bits = f"W mixed ({mp['allocator']}, {budget}: {row['avg_wbits']:.2f} b) A{row['abits'] or 32}"
    lines = [
        f"{row['method']} on {row['model']} / {row['dataset']}  {bits}  seed {row['seed']}  "
        f"run_id {row['run_id']}",
        f"  {'':10s}{'top-1':>8s}{'top-5':>8s}",
        f"  {'FP32':10s}{f(row['top1_fp32']):>8s}{f(row['top5_fp32']):>8s}",
        f"  {'quantized':10s}{f(row['top1']):>8s}{f(row['top5']):>8s}",
        f"  {'delta':10s}{f(row['delta_top1'], '+.2f'):>8s}",
        f"  agreement {f(row['agree_fp32'])}%  KL {f(row['kl_fp32'], '.4g')}  n_eval {row['n_eval']}"
        + (f" (top-k on {labelled} labelled)" if (labelled := (row.get("dataset_info") or {}).get("n_labelled"))
           is not None else ""),
        f"  time: synth {f(row['t_synth_s'], '.3f')}s  quant {f(row['t_quant_s'], '.3f')}s  "
        f"eval {f(row['t_eval_s'], '.3f')}s (fp32 {f(row['t_eval_fp32_s'], '.3f')}s)  "
        f"peak RSS {f(row['peak_rss_mb'], '.0f')} MB",
    ]
    return "\n".join(lines)
