"""Helpers shared by the test files: ``from helpers import compose_cfg, protocol, cli, ...``.

pytest puts tests/ on sys.path when it imports a test file (its default "prepend" import mode, tests/
having no __init__.py), so this module imports by name from every test file, from the repo root or
anywhere else. Fixtures shared by the files (the one intra-op thread) are in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from dfq_bench.config import CONF_DIR, ProtocolConfig, register_configs
from dfq_bench.core.method import QuantContext
from dfq_bench.results import read_rows

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def compose_cfg(overrides, hydra_cfg=False):
    """The Hydra composition of conf/config.yaml with ``overrides``, as the CLI composes it."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_cfg)


def protocol(**kw):
    """A ProtocolConfig with its defaults, ``kw`` overriding them."""
    return OmegaConf.merge(OmegaConf.structured(ProtocolConfig), kw)


def quant_ctx(wbits, abits, example, calib=None, **proto):
    """A QuantContext on the CPU, seed 0, with ``protocol(**proto)``."""
    return QuantContext(wbits, abits, protocol(**proto), 0, "cpu", example, calib=calib)


def make_method(name, **kw):
    """The registered method ``name`` built from its Config dataclass's defaults and ``kw``."""
    from dfq_bench import catalog  # noqa: F401  (registers the methods)
    from dfq_bench.registry import METHODS

    cls = METHODS.get(name)
    return cls(OmegaConf.merge(OmegaConf.structured(cls.Config), {"name": name, **kw}))


def randomize_bn(model, seed=0, mean_std=0.2, bias_std=0.3, kinds=(nn.BatchNorm2d,)):
    """Seeded BN statistics and affine parameters on every ``kinds`` module, so folding and range
    rules see non-trivial values: mean ~ N(0, mean_std), var ~ U(0.5, 1.5), gamma ~ U(0.5, 1.5),
    beta ~ N(0, bias_std). Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, kinds):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * mean_std)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * bias_std)
    return model.eval()


def cli(args, cwd, env=None, timeout=600):
    """``python -m dfq_bench *args`` in a subprocess, as a user runs it; ``env`` is added to ours."""
    return subprocess.run([sys.executable, "-m", "dfq_bench", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def rows_in(results_dir: Path, errors: list | None = None) -> list:
    """The rows of ``results_dir/runs.jsonl`` ([] when there is none); corrupt lines go to ``errors``."""
    path = Path(results_dir) / "runs.jsonl"
    return list(read_rows(path, errors)) if path.exists() else []
