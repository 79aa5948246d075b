"""Hydra structured-config schemas and the checks that run before any model is built.

The root schema types every group except ``method`` and ``data``: those two are open dicts whose
keys are checked against the plugin's own ``Config`` dataclass (``validate_config``), so that a
method can carry its own options without editing this file.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dfq_bench.results import ADDED_DEFAULTS

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "dataset", "method", "protocol", "data", "logger", "experiment")
NATURAL_KEYS = ("views", "scales", "view_seed")  # DatasetConfig keys only dataset=natural_images reads
MIN_BITS, MAX_BITS = 2, 16
MAX_SEED = 2**32 - 1  # numpy's and torch's seeding both take 0..2**32-1
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


class Granularity(str, Enum):
    per_tensor = "per_tensor"
    per_channel = "per_channel"


class AGranularity(str, Enum):
    """Activation ranges (``core.modules.ActQuant``): static per tensor or per channel, or dynamic."""

    per_tensor = "per_tensor"
    per_channel = "per_channel"  # one static range per channel (minmax rule)
    dynamic = "dynamic"  # per (sample, channel) min/max over H x W at every call, test time too (GranQ's)


class APlacement(str, Enum):
    """Where activation quantizers sit (``core.modules.install_act_quants``)."""

    layer_input = "layer_input"  # at the input of every quantized Conv/Linear (the image excepted)
    after_relu = "after_relu"  # after every nn.ReLU/ReLU6 module (GDFQ's family, ZeroQ); layer inputs float


class WRange(str, Enum):
    """The range an asymmetric weight grid covers (``core.grid.weight_grid``)."""

    include_zero = "include_zero"  # [min(min, 0), max(max, 0)]: 0.0 is a level (what integer kernels want)
    minmax = "minmax"  # the channel's [min, max] as is (SQuant's reference), zero-point may leave the grid


@dataclass
class ModelConfig:
    name: str = MISSING  # registry key; with source=timm|torchvision, the library's architecture name
    source: str = "zoo"  # zoo | timm | torchvision
    weights: str | None = None  # library pretrained tag, or a local state-dict path
    sha256: str | None = None  # expected sha256 of a local weights file
    bn_reestimate: int = 0  # > 0: re-estimate BN statistics on this many dataset images (random init)


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str | None = None
    limit: int | None = None  # evaluate `limit` images spread evenly over the split (recorded in the row)
    batch_size: int = 256
    num_workers: int = 0
    num_samples: int = 512  # synthetic `fake` dataset only
    images: str = "gaussian"  # `fake` only: gaussian (N(0, 1) inputs) | pixel (uniform pixels, normalized)
    calib_seed: int = 0  # seed of the train-split subset used by the `real` calibration control
    views: int = 4  # natural_images only: views per image (data/natural.py)
    scales: list[float] = field(default_factory=lambda: [1.0, 0.75])  # natural_images: crop scale of each view
    view_seed: int = 0  # natural_images: the seed of the crop positions (not the run's seed)
    cache_dir: str | None = None  # natural_images: where its views are cached (not in the run_id)


@dataclass
class ProtocolConfig:
    """Every quantization choice that moves accuracy and that papers make differently."""

    name: str = "common"
    w_granularity: Granularity = Granularity.per_channel
    w_symmetric: bool = False
    w_range: WRange = WRange.include_zero  # asymmetric weights only; squant_paper: minmax
    a_granularity: AGranularity = AGranularity.per_tensor  # per_tensor | per_channel | dynamic
    a_placement: APlacement = APlacement.layer_input  # layer_input | after_relu (zsqat_paper)
    a_symmetric: bool = False
    fold_bn: bool = True
    quantize_first_input: bool = False  # quantize the network input (first layer's input)?
    first_wbits: int | None = 8  # null = wbits
    last_wbits: int | None = 8  # null = wbits
    last_abits: int | None = 8  # null = abits
    act_range: str | None = None  # null = the method's own rule
    percentile: float = 99.99  # for act_range=percentile


@dataclass
class LoggerConfig:
    """Where rows are mirrored besides runs.jsonl (``logger=wandb``); never part of the run_id."""

    name: str = "none"  # none | wandb
    project: str = "dfq_bench"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None  # online | offline | disabled; null = wandb's default (WANDB_MODE)


MP_ALLOCATORS = ("none", "dp", "greedy", "random", "uniform")


@dataclass
class MpConfig:
    """Mixed precision (core/mixed.py): per-layer weight bits under a size budget. ``allocator: none``
    (the default) is the protocol's bits, as before the key existed (not part of the run_id)."""

    allocator: str = "none"  # none | dp (exact, from sensitivities) | greedy | random | uniform
    avg_wbits: float | None = None  # budget: mean weight bits of the allocated layers (null and no size_mb: wbits)
    size_mb: float | None = None  # budget: MB of every quantized layer's weights at their bits + scales
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 8])  # candidate bits of an allocated layer
    bin_bits: int | None = None  # dp's size bin in bits; null: the exact bin (see core/mixed.py)
    seed: int = 0  # allocator=random only
    cache: bool = True  # sensitivities cached on disk (not part of the run_id)
    cache_dir: str | None = None  # null: $DFQ_BENCH_CACHE or ~/.cache/dfq_bench (files in mp/)


@dataclass
class Config:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    method: Any = MISSING
    protocol: ProtocolConfig = MISSING
    data: Any = MISSING
    wbits: int = 4
    abits: int | None = 4  # null = weight-only
    seed: int = 0
    device: str = "cpu"
    results_dir: str = "results"
    progress: bool | None = None  # null = on when stderr is a TTY
    skip_done: bool = True  # skip a run whose run_id already has an ok row in results_dir
    eval_cache: str | None = None  # directory of cached FP32 logits (null = off); see run/evalcache.py
    checkpoint_dir: str | None = None  # long stages save progress here and a rerun resumes (dfq_bench/checkpoint.py)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paper: Any = None  # published numbers carried by an experiment= overlay, recorded in the row
    deploy: str | None = None  # onnxruntime: also run the integer model with ORT (deploy/); null = off
    mp: MpConfig = field(default_factory=MpConfig)  # mixed precision; allocator none = off


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the value and what is valid."""


class UnsupportedError(ConfigError):
    """A method that cannot run on this model (e.g. it needs the layer graph and the model cannot
    be traced); raised before any calibration data is made or any weight is changed, one line."""


def _check_bits(key: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_BITS <= value <= MAX_BITS:
        valid = f"an integer in {MIN_BITS}..{MAX_BITS}" + (" or null" if allow_none else "")
        raise ConfigError(f"{key}={value!r} is invalid; valid: {valid}")


def validate_config(cfg: DictConfig, overrides: Sequence[str] = (), device_here: bool = True) -> None:
    """Checks values that types cannot express, and the method's and generator's own keys.

    Args:
        cfg: the composed config.
        overrides: the command-line overrides it was composed from; a typed bool given a non-bool
            (``protocol.w_symmetric=2``, which OmegaConf would turn into true) is an error.
        device_here: whether the run executes on this machine, so that ``device=cuda:N`` must be a
            device torch sees here; False for a job that a remote launcher (SLURM) runs elsewhere.

    Raises:
        ConfigError: on the first bad value (one-line message).
        UnknownNameError: on an unknown method or generator name.
    """
    from dfq_bench import catalog  # noqa: F401  (fills the registries)
    from dfq_bench.registry import DATASETS, METHODS, MODELS, SYNTH

    _check_bool_overrides(overrides)
    _check_bits("wbits", cfg.wbits, allow_none=False)
    _check_bits("abits", cfg.abits, allow_none=True)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed={cfg.seed!r} is invalid; valid: an integer in 0..{MAX_SEED}")
    if not str(cfg.results_dir).strip():
        raise ConfigError(f"results_dir={cfg.results_dir!r} is invalid; valid: a directory path (default: results)")
    p = cfg.protocol
    for key in ("first_wbits", "last_wbits", "last_abits"):
        _check_bits(f"protocol.{key}", p[key], allow_none=True)
    if p.w_range == WRange.minmax and p.w_symmetric:
        raise ConfigError("protocol.w_range='minmax' is invalid with protocol.w_symmetric=true (a symmetric "
                          "grid is set by max|w|); valid: include_zero, or w_symmetric=false")
    if p.w_range == WRange.minmax and cfg.get("deploy") is not None:
        raise ConfigError(f"protocol.w_range='minmax' is invalid with deploy={cfg.deploy} (its weight "
                          "zero-points may not fit int8); valid: protocol.w_range=include_zero")
    if p.w_range == WRange.minmax:
        method_cls = METHODS.get(cfg.method.name)
        if "minmax" not in getattr(method_cls, "w_ranges", ("include_zero", "minmax")):
            raise ConfigError(f"protocol.w_range='minmax' is not supported by method {cfg.method.name} "
                              f"(it chooses its own weight range); valid: include_zero")
    if not 50.0 < p.percentile <= 100.0:
        raise ConfigError(f"protocol.percentile={p.percentile!r} is invalid; valid: (50, 100]")
    if cfg.get("deploy") is not None:
        # a method whose weights are not on one uniform integer grid (PowerQuant, REx) says why
        refusal = getattr(METHODS.get(cfg.method.name), "deploy_refusal", None)
        if refusal:
            raise ConfigError(f"method {cfg.method.name} cannot run with deploy={cfg.deploy}: {refusal}; "
                              "valid: deploy=null")
        _check_deploy(cfg.deploy)
    from dfq_bench.core.ranges import RANGE_RULES

    if p.act_range is not None:
        RANGE_RULES.get(p.act_range)  # raises the did-you-mean error
    _check_device(str(cfg.device), device_here)
    factory = MODELS.get(cfg.model.name if cfg.model.source == "zoo" else cfg.model.source)
    if not getattr(factory, "takes_weights", True):
        for key in ("weights", "sha256"):
            if cfg.model[key] is not None:
                raise ConfigError(f"model.{key}={cfg.model[key]!r} is invalid: model {cfg.model.name} takes no "
                                  "weights; valid: null")
    if cfg.model.source in ("timm", "torchvision"):
        if OmegaConf.is_missing(cfg.model, "name"):
            raise ConfigError(f"model.name is missing; valid: a {cfg.model.source} architecture "
                              "(model.name=resnet18)")
        from dfq_bench.models.torchvision_timm import check_arch

        check_arch(cfg.model.source, str(cfg.model.name))
    if not isinstance(cfg.model.bn_reestimate, int) or cfg.model.bn_reestimate < 0:
        raise ConfigError(f"model.bn_reestimate={cfg.model.bn_reestimate!r} is invalid; valid: an integer >= 0")
    DATASETS.get(cfg.dataset.name)
    limit, batch_size = cfg.dataset.limit, cfg.dataset.batch_size
    if limit is not None and limit <= 0:
        raise ConfigError(f"dataset.limit={limit!r} is invalid; valid: a positive integer or null")
    if batch_size <= 0:
        raise ConfigError(f"dataset.batch_size={batch_size!r} is invalid; valid: a positive integer")
    if cfg.dataset.views < 1:
        raise ConfigError(f"dataset.views={cfg.dataset.views!r} is invalid; valid: a positive integer")
    bad = [s for s in cfg.dataset.scales if not 0 < s <= 1]
    if bad or not cfg.dataset.scales:
        raise ConfigError(f"dataset.scales={list(cfg.dataset.scales)!r} is invalid; valid: a non-empty list of "
                          "crop scales in (0, 1]")
    method_cls = METHODS.get(cfg.method.name)
    method_cfg = plugin_config(method_cls, cfg.method, "method")
    if cfg.abits is not None:
        _check_a_granularity(method_cls(method_cfg), p, cfg.get("deploy"))
        _check_a_placement(method_cls(method_cfg), cfg)
    plugin_config(SYNTH.get(cfg.data.name), cfg.data, "data")
    if hasattr(method_cls, "check_data"):  # a method that trains on the run's calibration source names it
        method_cls(method_cfg).check_data(cfg.data.name)
    if cfg.get("mp") is not None:
        check_mp(cfg.mp, cfg.wbits, cfg.get("deploy"), METHODS.get(cfg.method.name))


def _check_a_granularity(method: Any, p: DictConfig, deploy: str | None) -> None:
    """The run's activation granularity (the protocol's, or the method's own quantizer's) is one the method
    and its range rule honour, and one the deployed-integer check can export (one static range per tensor)."""
    from dfq_bench.core.ranges import check_granularity

    gran = method.activation_granularity(p)
    key = "protocol.a_granularity" if gran == p.a_granularity.value else "method.a_granularity"
    if gran not in method.a_granularities:
        raise ConfigError(f"{key}={gran!r} is not supported by method {method.name} (its activation quantizers are "
                          f"its own); valid: {', '.join(method.a_granularities)}")
    check_granularity(p.act_range or method.default_act_range, gran)
    if deploy is not None and gran != AGranularity.per_tensor.value:
        why = ("dynamic activation ranges (min/max of every sample and channel, recomputed at every call, test time "
               "too) have no fixed integer scale" if gran == "dynamic" else
               "the exported activation QuantizeLinear takes one scale per tensor")
        raise ConfigError(f"{key}={gran!r} is invalid with deploy={deploy}: {why}; valid: {key}=per_tensor, or "
                          "deploy=null")


def _check_a_placement(method: Any, cfg: DictConfig) -> None:
    """``protocol.a_placement=after_relu``: the method places its quantizers through the core, with a range rule
    that needs no layer, one activation bit-width, and no deployed-integer check or mixed precision."""
    p = cfg.protocol
    if p.a_placement == APlacement.layer_input:
        return
    key, rule = f"protocol.a_placement={p.a_placement.value!r}", p.act_range or method.default_act_range
    if p.a_placement.value not in method.a_placements:
        raise ConfigError(f"{key} is not supported by method {method.name} (it places its activation quantizers "
                          f"itself); valid: {', '.join(method.a_placements)}")
    problem = next((why for bad, why in (
        (rule == "bn", "act_range rule 'bn' takes a layer's input range from the BN before it; valid: "
                       "protocol.act_range=minmax|percentile, or protocol.a_placement=layer_input"),
        (p.last_abits is not None and p.last_abits != cfg.abits,
         f"every ReLU output is quantized at abits={cfg.abits}, not protocol.last_abits={p.last_abits}; valid: "
         "protocol.last_abits=null"),
        (cfg.get("deploy") is not None, f"deploy={cfg.deploy} exports layer-input quantizers; valid: deploy=null"),
        (cfg.get("mp") is not None and cfg.mp.allocator != "none",
         "mixed precision plans bits per layer input; valid: mp.allocator=none"),
    ) if bad), None)
    if problem:
        raise ConfigError(f"{key} is invalid: {problem}")


def check_mp(mp, wbits: int, deploy: str | None = None, method_cls: Any = None) -> None:
    """The ``mp`` keys (core/mixed.py), one-line ``ConfigError``; the budget's reach on a given model
    (``mp.size_mb``) is checked when it is built (``MixedPrecision.check_model``)."""
    if mp.allocator not in MP_ALLOCATORS:
        raise ConfigError(f"mp.allocator={mp.allocator!r} is invalid; valid: {', '.join(MP_ALLOCATORS)}")
    if mp.allocator == "none":
        for key in ("avg_wbits", "size_mb", "bin_bits"):
            if mp[key] is not None:
                raise ConfigError(f"mp.{key}={mp[key]!r} is set but mp.allocator=none; valid: "
                                  f"mp.allocator={'|'.join(MP_ALLOCATORS[1:])}, or mp.{key}=null")
        return
    bits = list(mp.bits)
    if not bits:
        raise ConfigError("mp.bits=[] is invalid; valid: a list of distinct integers in "
                          f"{MIN_BITS}..{MAX_BITS} (default [2,3,4,6,8])")
    for b in bits:
        _check_bits("mp.bits", b, allow_none=False)
    if len(set(bits)) != len(bits):
        raise ConfigError(f"mp.bits={bits} is invalid; valid: distinct bit-widths")
    if mp.avg_wbits is not None and mp.size_mb is not None:
        raise ConfigError(f"mp.avg_wbits={mp.avg_wbits} and mp.size_mb={mp.size_mb} are both set; valid: one "
                          "budget (the other null)")
    if mp.size_mb is not None and not mp.size_mb > 0:
        raise ConfigError(f"mp.size_mb={mp.size_mb!r} is invalid; valid: a size in MB > 0")
    if mp.size_mb is None:
        avg, key = (mp.avg_wbits, "mp.avg_wbits") if mp.avg_wbits is not None else (wbits, "wbits (the budget)")
        if not min(bits) <= avg <= max(bits):
            side, k = ("below the smallest", min(bits)) if avg < min(bits) else ("above the largest", max(bits))
            raise ConfigError(f"{key}={avg!r} is {side} plan (every allocated layer at {k} bits); valid: "
                              f"{min(bits)}..{max(bits)} (the range of mp.bits={bits})")
    if mp.bin_bits is not None and (not isinstance(mp.bin_bits, int) or mp.bin_bits < 1):
        raise ConfigError(f"mp.bin_bits={mp.bin_bits!r} is invalid; valid: an integer >= 1, or null (exact)")
    if not 0 <= mp.seed <= MAX_SEED:
        raise ConfigError(f"mp.seed={mp.seed!r} is invalid; valid: an integer in 0..{MAX_SEED}")
    if deploy is not None and max(bits) > 8:
        raise ConfigError(f"mp.bits={bits} is invalid with deploy={deploy} (integer kernels take at most 8 "
                          "weight bits); valid: bit-widths <= 8")
    refusal = getattr(method_cls, "mp_refusal", None)
    if refusal:
        raise ConfigError(f"method {method_cls.name} cannot run with mp.allocator={mp.allocator}: {refusal}; "
                          "valid: mp.allocator=none")


def _check_device(device: str, here: bool) -> None:
    if not DEVICE.fullmatch(device):
        raise ConfigError(f"device={device!r} is invalid; valid: cpu, cuda, cuda:N")
    if device == "cpu" or not here:
        return
    import torch

    # device_count, not is_available: it asks NVML and so does not initialise CUDA in a process
    # that a launcher may fork afterwards
    n = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    if index < n:
        return
    seen = "no CUDA device" if n == 0 else f"{n} CUDA device" + ("s" if n > 1 else "")
    valid = "cpu" if n == 0 else "cpu, cuda, " + ("cuda:0" if n == 1 else f"cuda:0..cuda:{n - 1}")
    raise ConfigError(f"device={device!r} is invalid (torch sees {seen}); valid: {valid}")


def _bool_type(tp: Any) -> tuple[bool, bool]:
    """(is it bool or bool | None, may it be None) for a dataclass field's type."""
    if tp is bool:
        return True, False
    args = set(typing.get_args(tp))
    return (args == {bool, type(None)}), True


def _field_type(schema: Any, path: str) -> Any:
    """The annotated type of the dotted ``path`` in a dataclass schema, or None where the path
    leaves the typed schema (an open ``method``/``data`` node, a key the schema does not have)."""
    tp = schema
    for part in path.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _bool_message(key: str, value: Any, optional: bool) -> str:
    return f"{key}={value!r} is invalid; valid: true" + (", false or null" if optional else " or false")


def _check_bool_overrides(overrides: Sequence[str]) -> None:
    """A bool key of the typed groups given anything but true/false (or null where allowed).

    The composed config cannot tell: OmegaConf turns 2, "yes" or "on" into true while merging, so
    the override's own value is checked. The open method and data nodes keep their raw values and
    are checked in ``plugin_config``.
    """
    if not overrides:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_delete() or o.is_sweep_override() or o.is_hydra_override() or o.package is not None:
            continue
        is_bool, optional = _bool_type(_field_type(Config, o.key_or_group))
        value = o.value()
        if not is_bool or isinstance(value, bool) or (value is None and optional):
            continue
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: its target is checked where it is set
        raise ConfigError(_bool_message(o.key_or_group, value, optional))


DEPLOY_TARGETS = ("onnxruntime",)


def _check_deploy(value: Any) -> None:
    if value not in DEPLOY_TARGETS:
        raise ConfigError(f"deploy={value!r} is invalid; valid: {', '.join(DEPLOY_TARGETS)} or null")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError("deploy=onnxruntime needs onnx and onnxruntime: pip install -e '.[deploy]'") from None


def plugin_config(plugin: Any, node: DictConfig, group: str) -> DictConfig:
    """Merges a group node onto the plugin's ``Config`` dataclass: unknown keys and bad types fail."""
    schema = OmegaConf.structured(plugin.Config)
    try:
        merged = OmegaConf.merge(schema, node)
    except Exception as e:  # omegaconf's errors are multi-line; keep the first line
        first = str(e).splitlines()[0]
        raise ConfigError(f"{group}.{node.get('name')}: {first}") from None
    for key, tp in typing.get_type_hints(plugin.Config).items():
        is_bool, optional = _bool_type(tp)
        if is_bool and key in node:  # the raw node: the merge above has already turned 2 into true
            value = node[key]
            if not isinstance(value, bool) and not (value is None and optional):
                raise ConfigError(_bool_message(f"{group}.{key}", value, optional))
    if hasattr(plugin, "check_config"):  # values types cannot express (raises ConfigError)
        plugin.check_config(merged)
    return merged


def identity_config(cfg: DictConfig) -> dict:
    """The part of the resolved config that identifies a result (hashed into run_id)."""
    d = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in ("results_dir", "progress", "hydra", "skip_done", "eval_cache", "checkpoint_dir", "logger"):
        d.pop(key, None)
    for key, default in ADDED_DEFAULTS["protocol"].items():
        if d.get("protocol", {}).get(key) == default:  # every run before the key existed
            d["protocol"].pop(key)
    dfq = d.get("method") or {}  # DFQ's pairwise-only CLE (every run before the key existed), or no CLE
    if dfq.get("name") == "dfq" and (dfq.get("cle_triplets") is False or dfq.get("cle") is False):
        dfq.pop("cle_triplets", None)
    _drop_identity_defaults(dfq)
    if d.get("paper") is None:  # keeps the run_ids of runs without an overlay unchanged
        d.pop("paper", None)
    if d.get("deploy") is None:  # likewise for runs without the deployed-integer check
        d.pop("deploy", None)
    mp = _mp_identity(d.get("mp"), d.get("wbits"))
    if mp is None:  # likewise for runs with the protocol's bits (mixed precision off)
        d.pop("mp", None)
    else:
        d["mp"] = mp
    if not d.get("model", {}).get("bn_reestimate"):  # likewise for models without BN re-estimation
        d.get("model", {}).pop("bn_reestimate", None)
    if d.get("dataset", {}).get("images") == "gaussian":  # and for the fake dataset's default images
        d["dataset"].pop("images")
    dataset = d.get("dataset") or {}
    dataset.pop("cache_dir", None)  # where the views are cached is not the result
    if dataset.get("name") == "natural_images":  # the images depend on the source packages installed
        from dfq_bench.data.natural import source_versions

        dataset["sources"] = source_versions()
    else:  # natural_images' own keys: every other dataset's run_id stays as before they existed
        for key in NATURAL_KEYS:
            dataset.pop(key, None)
    model = d.get("model") or {}
    if model.get("weights") is not None:  # a local weights file is identified by its content
        from dfq_bench.models.torchvision_timm import WeightsError, local_weights_path, sha256_file

        try:
            path = local_weights_path(str(model["weights"]))
        except WeightsError:
            path = None  # not a file: the run reports it
        if path is not None:
            model["weights"] = f"sha256:{sha256_file(path)}"  # not its path: a retrained file is a new run
            model.pop("sha256", None)  # a check of that content, in any case or as a prefix
    data = d.get("data") or {}
    if data.get("cache_dir") is not None:  # where the synthetic-data cache lives is not the result (hashed as
        data["cache_dir"] = None  # the default, null, that every earlier row holds: their run_ids stay)
    if data.get("name") == "noise" and _noise_space(d) in (None, "raw"):
        data.pop("space", None)  # the noise every run used before the key existed, or noise never used
    return d


def _drop_identity_defaults(method: dict) -> None:
    """Drops the method keys a method lists in ``identity_defaults`` where they hold that default (keys added
    after its first rows: those rows keep their run_ids)."""
    from dfq_bench import catalog  # noqa: F401  (fills the registries)
    from dfq_bench.registry import METHODS

    try:
        defaults = getattr(METHODS.get(method.get("name")), "identity_defaults", {})
    except Exception:  # an unknown method: the run reports it
        return
    for key, value in defaults.items():
        if key in method and method[key] == value:
            method.pop(key)


def _mp_identity(mp: dict | None, wbits) -> dict | None:
    """The mixed-precision keys that decide the plan (``mp`` of the run_id and of the row), or None when
    it is off: no cache keys, the budget made explicit (none given: ``avg_wbits = wbits``), the seed only
    for ``random`` and the bin only for ``dp``."""
    if not mp or mp.get("allocator", "none") == "none":
        return None
    mp = {k: v for k, v in mp.items() if k not in ("cache", "cache_dir")}
    if mp.get("avg_wbits") is None and mp.get("size_mb") is None:
        mp["avg_wbits"] = wbits
    for key in ("avg_wbits", "size_mb"):
        if mp.get(key) is not None:
            mp[key] = float(mp[key])
    if mp["allocator"] != "random":
        mp.pop("seed", None)
    if mp["allocator"] != "dp":
        mp.pop("bin_bits", None)
    return mp


def mp_identity(cfg: DictConfig) -> dict | None:
    """``_mp_identity`` of a composed config (the row's ``mp`` field)."""
    mp = cfg.get("mp")
    return _mp_identity(None if mp is None else OmegaConf.to_container(mp, resolve=True), cfg.wbits)


def _mp_uses_data(d: dict) -> bool:
    return (d.get("mp") or {}).get("allocator") in ("dp", "greedy")  # sensitivities on the calibration set


def _noise_space(d: dict) -> str | None:
    """The noise space a run really uses (``space: auto`` resolved by its activation range rule), or
    None when it uses no calibration data (weight-only, and a method that needs none)."""
    from dfq_bench import catalog  # noqa: F401  (fills the registries)
    from dfq_bench.registry import METHODS

    cls = METHODS.get(d["method"]["name"])
    if d.get("abits") is None and not cls.needs_data:
        if not _mp_uses_data(d):
            return None
        space = d["data"].get("space", "raw")  # for the sensitivities only: auto is pixel (no range rule)
        return "pixel" if space == "auto" else space
    space = d["data"].get("space", "raw")
    if space == "auto":
        space = "raw" if ((d.get("protocol") or {}).get("act_range") or cls.default_act_range) == "squant" else "pixel"
    return space
