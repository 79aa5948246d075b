"""Times mixed precision's sensitivity pass and its solver (core/mixed.py) on an embedded model.

    python scripts/bench_mp.py [--model resnet20_fmnist] [--methods rtn,squant] [--repeats 3] [--abits 8]
                               [--threads N] [key=value ...]

Each repeat is one run's plan stage as the runner does it (the same config composition, model,
calibration set and ``MixedPrecision``), with the sensitivity cache off so that every repeat makes
the full pass: one forward over the calibration set (``data=``, 256 noise images by default) per
allocated layer and candidate bit-width (``mp.bits``, default 2, 3, 4, 6, 8), each layer's weights
rounded by the method (SQuant's flips included). Printed per method: the median over ``--repeats``
of the pass (``t_sensitivity_s``), of the DP solver (``t_plan_s``) and of their sum, after one
warm-up repeat. Extra ``key=value`` arguments are Hydra overrides of the run (``mp.avg_wbits=3``,
``data=zeroq``). ``--threads``: torch's intra-op threads (default: torch's own, one per core).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dfq_bench import api
from dfq_bench.config import CONF_DIR, plugin_config, register_configs, validate_config
from dfq_bench.core.method import QuantContext
from dfq_bench.core.mixed import from_config
from dfq_bench.registry import DATASETS, METHODS, SYNTH
from dfq_bench.run.runner import build_model


def one_plan(cfg, built, bundle) -> dict:
    """The run's plan stage (and the rest of quantize) with the sensitivity cache off; its info."""
    method_cls = METHODS.get(cfg.method.name)
    method = method_cls(plugin_config(method_cls, cfg.method, "method"))
    example = torch.zeros((2, *built.input_size))
    gen = SYNTH.get(cfg.data.name)
    gen_cfg = plugin_config(gen, cfg.data, "data")
    if hasattr(gen, "resolve"):
        gen_cfg = gen.resolve(gen_cfg, method.act_range(QuantContext(
            cfg.wbits, cfg.abits, cfg.protocol, cfg.seed, "cpu", example)) if cfg.abits is not None else None)
    keys = {k: v for k, v in OmegaConf.to_container(gen_cfg).items() if k != "name"}
    calib = api.make_calib(gen_cfg.name, built.model, input_size=built.input_size, seed=cfg.seed, dataset=bundle,
                           device="cpu", **keys)
    planner = from_config(cfg.mp, data=cfg.data.name)
    _, info = api.quantize(built.model, method, wbits=cfg.wbits, abits=cfg.abits, example_input=example,
                           calib=calib, protocol=cfg.protocol, seed=cfg.seed, planner=planner)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20_fmnist")
    ap.add_argument("--methods", default="rtn,squant")
    ap.add_argument("--abits", default="8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args, overrides = ap.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_configs()
    print(f"{args.model}, {torch.get_num_threads()} torch thread(s), median of {args.repeats} after a warm-up; "
          "sensitivity cache off")
    for name in args.methods.split(","):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                f"model={args.model}", f"method={name}", f"abits={args.abits}", "mp.allocator=dp",
                "mp.avg_wbits=4", *overrides, "mp.cache=false"])
        validate_config(cfg)
        built = build_model(cfg)
        built.model.eval()
        bundle = DATASETS.get(cfg.dataset.name)(cfg.dataset, built)
        sens, solve = [], []
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            info = one_plan(cfg, built, bundle)
            if i:  # the first is the warm-up
                sens.append(info["t_sensitivity_s"])
                solve.append(info["t_plan_s"])
            print(f"  {name} repeat {i}{' (warm-up)' if not i else ''}: sensitivity {info['t_sensitivity_s']:.2f} s, "
                  f"solve {info['t_plan_s'] * 1e3:.1f} ms, quantize {time.perf_counter() - t0:.2f} s; "
                  f"{len(info['mp_bits'])} layers, bits {info['mp_bits']}", flush=True)
        total = [a + b for a, b in zip(sens, solve, strict=True)]
        print(f"{name}: sensitivity pass {statistics.median(sens):.2f} s, solver {statistics.median(solve) * 1e3:.1f} "
              f"ms, pass + solve {statistics.median(total):.2f} s (median of {args.repeats}; "
              f"{info['mp_sensitivity']['n_samples']} images x {len(info['mp_sensitivity']['bits'])} bit-widths)")


if __name__ == "__main__":
    main()
