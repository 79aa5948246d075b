"""The Python API: every method, calibration source and protocol without Hydra.

    import dfq_bench
    calib = dfq_bench.make_calib("noise", model, example_input=x, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    qmodel, info = dfq_bench.quantize(model, "squant", wbits=4, abits=4, example_input=x, calib=calib)
    metrics = dfq_bench.evaluate(model, qmodel, loader)

A method is named (a ``conf/method`` option such as ``squant`` or ``genie_cpu``, or any registered
method), given as its ``Config`` dataclass (``DFQ.Config(name="dfq", cle=False)``) or as a ``Method``
instance; ``**method_keys`` are merged on the named method's defaults and checked like the CLI's
``method.<key>=`` overrides. A protocol is a ``conf/protocol`` name (``common``, ``squant_paper``,
``dfq_paper``) plus keyword overrides (``protocol_keys``), or a ``ProtocolConfig``. The CLI runner
(run/runner.py) calls exactly these functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dfq_bench import catalog  # noqa: F401  (fills the registries)
from dfq_bench.config import CONF_DIR, ConfigError, ProtocolConfig, plugin_config
from dfq_bench.core.method import Method, QuantContext
from dfq_bench.data import DataBundle
from dfq_bench.registry import METHODS, SYNTH


def _option(group: str, name: str) -> dict:
    """A ``conf/<group>/<name>.yaml`` option as a dict (without its defaults list), or {}."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        return {}
    node = OmegaConf.to_container(OmegaConf.load(path))
    node.pop("defaults", None)
    return node


def build_method(method: str | Any, **method_keys) -> Method:
    """A ``Method`` from a name, a method ``Config`` dataclass instance or a ``Method`` (returned as is)."""
    if isinstance(method, Method):
        if method_keys:
            raise TypeError("method keys go with a method name or Config, not with a Method instance")
        return method
    if dataclasses.is_dataclass(method) and not isinstance(method, type):
        cls = next((METHODS.get(n) for n in METHODS.names() if METHODS.get(n).Config is type(method)), None)
        if cls is None:
            raise ConfigError(f"{type(method).__qualname__} is not the Config of a registered method")
        node = {**OmegaConf.to_container(OmegaConf.structured(method)), **method_keys}
    else:
        node = {**_option("method", str(method)), **method_keys}
        node.setdefault("name", str(method))
        cls = METHODS.get(node["name"])  # raises the did-you-mean error
    return cls(plugin_config(cls, OmegaConf.create(node), "method"))


def protocol_config(protocol: str | Any = "common", **protocol_keys) -> DictConfig:
    """The protocol node the methods read: a ``conf/protocol`` preset (or a ``ProtocolConfig``) with
    ``protocol_keys`` merged on it, type-checked like the CLI's ``protocol.<key>=`` overrides."""
    if isinstance(protocol, DictConfig):
        base = OmegaConf.to_container(protocol, enum_to_str=True)
    elif isinstance(protocol, str):
        base = _option("protocol", protocol)
        if not base:
            names = sorted(p.stem for p in (CONF_DIR / "protocol").glob("*.yaml"))
            raise ConfigError(f"protocol {protocol!r} is unknown; valid: {', '.join(names)}")
    else:
        base = OmegaConf.to_container(OmegaConf.structured(protocol))
    try:
        return OmegaConf.merge(OmegaConf.structured(ProtocolConfig), base, protocol_keys)
    except Exception as e:
        raise ConfigError(f"protocol: {str(e).splitlines()[0]}") from None


def quantize(model: nn.Module, method: str | Any = "rtn", *, wbits: int = 4, abits: int | None = 4,
             example_input: Tensor, calib: list[Tensor] | None = None, protocol: str | Any = "common",
             protocol_keys: dict | None = None, seed: int = 0, device: str | None = None,
             progress: Callable | None = None, planner: Any = None, eval_data: Iterable | None = None,
             checkpoint: str | None = None, **method_keys) -> tuple[nn.Module, dict]:
    """Quantizes ``model`` (left untouched) and returns (the fake-quantized copy, info for a row).

    Args:
        example_input: one input batch of the model's shape (two images are enough).
        calib: calibration batches (``make_calib``), needed when activations are quantized or the
            method itself uses data; or a callable taking the ``core.method.QuantState``, called once after
            the weights are quantized (a source that sees the student).
        planner: a ``core.planner.PLANNERS`` name or a planner callable (per-layer bits); default: the
            protocol's first/last-layer rules.
        eval_data: (images, labels) batches for a method that monitors accuracy while it trains
            (``needs_eval``: gdfq's per-epoch curve); it never selects the returned model.
        checkpoint: a file where a long training stage saves its progress after each finished unit, and
            from which a rerun continues (GENIE-M's blocks; dfq_bench/checkpoint.py); None: off.
    Raises:
        UnsupportedError: the method cannot run on this model (e.g. it needs the layer graph and
            the model cannot be traced), before any work.
    """
    m = build_method(method, **method_keys)
    proto = protocol_config(protocol, **(protocol_keys or {}))
    dev = device or str(example_input.device)
    ctx = QuantContext(wbits, abits, proto, seed, dev, example_input, calib=calib,
                       progress=progress or (lambda it, **kw: it), planner=planner, eval_data=eval_data,
                       checkpoint=None if checkpoint is None else str(checkpoint))
    if m.wants_data(ctx) and not calib:
        raise ValueError(f"method {m.name} needs calibration batches here; pass calib=dfq_bench.make_calib(...)")
    qmodel = m.quantize(model, ctx)  # refuses first (UnsupportedError) if the model does not fit
    return qmodel, ctx.info


def make_calib(source: str, model: nn.Module, *, example_input: Tensor | None = None,
               input_size: tuple | None = None, n: int | None = None, seed: int = 0,
               dataset: DataBundle | None = None, mean: Iterable[float] | None = None,
               std: Iterable[float] | None = None, act_range: str | None = None,
               device: str | None = None, **keys) -> list[Tensor]:
    """Calibration batches from a source: ``noise``, ``real`` (needs ``dataset``), ``zeroq``,
    ``zeroq_cpu``, ``genie``, ``genie_cpu`` (``conf/data`` options) or a registered generator name;
    ``keys`` are its config keys (``n`` sets ``num_samples``).

    Args:
        example_input / input_size: the model's input shape (C, H, W) comes from either.
        mean, std: the model's input normalization (for pixel-space noise) when no ``dataset`` is given.
        act_range: the activation range rule the batches are for (noise's ``space: auto``).
    """
    node = {**(_option("data", str(source)) or {"name": str(source)}), **keys}
    if n is not None:
        node["num_samples"] = int(n)
    gen = SYNTH.get(node["name"])
    cfg = plugin_config(gen, OmegaConf.create(node), "data")
    if hasattr(gen, "check_model"):
        gen.check_model(model)
    if hasattr(gen, "resolve"):
        cfg = gen.resolve(cfg, act_range)
    if input_size is None:
        if example_input is None:
            raise TypeError("make_calib needs example_input or input_size")
        input_size = tuple(example_input.shape[1:])
    if dataset is None and mean is not None and std is not None:
        dataset = DataBundle([], 0, 0, None, {"preprocess": {"mean": list(mean), "std": list(std)}})
    dev = device or (str(example_input.device) if example_input is not None else
                     str(next(model.parameters()).device))
    return gen.generate(cfg, model, tuple(input_size), seed, dev, dataset)


def evaluate(model: nn.Module, qmodel: nn.Module, loader, device: str = "cpu", progress: bool = False) -> dict:
    """Top-1/top-5 of both models, their agreement and KL, in one pass over ``loader`` ((x, y) batches)."""
    from dfq_bench.run.runner import evaluate as run_eval
    from dfq_bench.run.runner import progress_bar

    return run_eval(model.to(device).eval(), qmodel.to(device).eval(), loader, device, progress_bar(progress))


__all__ = ["quantize", "make_calib", "evaluate", "build_method", "protocol_config"]
