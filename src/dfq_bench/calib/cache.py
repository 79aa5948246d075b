"""On-disk cache of generated calibration sets, so that sweeps do not regenerate them.

The key is a hash of (generator name and config without its cache keys, a digest of the model's
weights and buffers, the input size, the seed, the device type): the digest is computed from the
tensors themselves, so it identifies the weights exactly whatever label the model carries. Files
are written atomically (temp file + rename); an unreadable or mismatching file is regenerated with
a warning, never fatal. A cache that cannot be written (read-only, a file in its place, a full disk)
gives one warning and ``info["cache_error"]`` instead of ``cache_file``; the run goes on. The
returned ``Batches`` carry ``info`` (cache hit/miss, the seconds the generation took when it was
made, generator losses), which the runner records as ``data_info``.

Location: ``cfg.cache_dir``, else ``$DFQ_BENCH_CACHE``, else ``~/.cache/dfq_bench``; files go to
its ``synth/`` subdirectory. ``cache: false`` turns the cache off.
A generation in progress keeps its finished batches in ``<entry>.partial.pt`` (dfq_bench/checkpoint.py): a
stopped run's rerun continues at the next batch, with the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from dfq_bench.checkpoint import Checkpoint
from dfq_bench.results import atomic_write
from dfq_bench.run.evalcache import weights_sha256

log = logging.getLogger(__name__)
FORMAT = 1
_NOT_IN_KEY = ("cache", "cache_dir")


class Batches(list):
    """A list of calibration batches with an ``info`` dict for the result row."""

    def __init__(self, batches, info: dict | None = None):
        super().__init__(batches)
        self.info = dict(info or {})


def cache_root(directory: str | Path | None = None) -> Path:
    """The cache root: ``directory``, else ``$DFQ_BENCH_CACHE``, else ``~/.cache/dfq_bench``; each cache
    has its subdirectory (``synth/`` here, ``mp/`` for core/mixed.py's sensitivities)."""
    return Path(directory or os.environ.get("DFQ_BENCH_CACHE") or Path.home() / ".cache" / "dfq_bench")


def cache_dir(cfg) -> Path:
    return cache_root(cfg.get("cache_dir")) / "synth"


def cache_key(cfg, model: nn.Module, input_size, seed: int, device: str) -> str:
    gen_cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    for k in _NOT_IN_KEY:
        gen_cfg.pop(k, None)
    blob = {"format": FORMAT, "generator": gen_cfg, "weights": weights_sha256(model),
            "input_size": list(input_size), "seed": int(seed), "device": torch.device(device).type}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _load(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        ok = (isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("batches"), list)
              and all(isinstance(b, Tensor) for b in entry["batches"]) and entry["batches"])
        if not ok:
            raise ValueError("unexpected contents")
        return entry
    except Exception as e:  # a torn or foreign file: regenerate
        log.warning("synthetic-data cache file %s is unreadable (%s); regenerating it", path, e)
        return None


def cached_generate(cfg, model: nn.Module, input_size, seed: int, device: str,
                    make: Callable[[Checkpoint], tuple[list[Tensor], dict]]) -> Batches:
    """Returns the cached batches for this key, or calls ``make(progress) -> (batches, info)`` and stores
    them. ``progress``: the generation's partial file (``<entry>.partial.pt``, dfq_bench/checkpoint.py; none when
    the cache is off), removed once the entry is written. ``info`` gains ``cache`` ("hit", "miss" or "off") and
    ``t_generate_s`` (with ``info["resumed"]["t_before_s"]``, the seconds of the earlier part, where it resumed)."""
    if not cfg.get("cache", True):
        t0 = time.perf_counter()
        batches, info = make(Checkpoint(None, {}))
        return Batches(batches, {**info, "cache": "off", "t_generate_s": time.perf_counter() - t0})
    key = cache_key(cfg, model, input_size, seed, device)
    path = cache_dir(cfg) / f"{cfg.name}-{key[:24]}.pt"
    entry = _load(path, key)
    if entry is not None:
        batches = [b.to(device) for b in entry["batches"]]
        return Batches(batches, {**entry["info"], "cache": "hit", "cache_file": str(path)})
    t0 = time.perf_counter()
    # the partial file sits beside the entry: an unwritable directory is one warning, the entry's (below)
    progress = Checkpoint(path.with_suffix(".partial.pt"), {"key": key}, warn_unwritable=False)
    batches, info = make(progress)
    info = {**info, "t_generate_s": time.perf_counter() - t0 + info.get("resumed", {}).get("t_before_s", 0.0)}
    entry = {"key": key, "batches": [b.detach().cpu() for b in batches], "info": info}
    try:
        atomic_write(path, lambda tmp: torch.save(entry, tmp))
    except Exception as e:  # OSError, or torch.save's RuntimeError for a file it cannot open
        reason = f"{type(e).__name__}: {e}"
        log.warning("cannot write synthetic-data cache %s (%s); the run goes on without it", path, reason)
        return Batches(batches, {**info, "cache": "miss", "cache_error": reason})
    try:
        progress.path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot remove the partial synthetic data %s (%s)", progress.path, e)
    return Batches(batches, {**info, "cache": "miss", "cache_file": str(path)})
