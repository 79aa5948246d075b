"""The base of the calibration sources made from a model's BatchNorm statistics (``zeroq``,
``genie``): validation, the cache (calib/cache.py), batching over ``num_samples`` from one seeded
``torch.Generator``, hooks on the BN inputs, the optimisation loop and the info for the row. A
subclass supplies ``source`` (its registry name), ``min_batch``, the BNs it matches (``bn_layers``)
and one batch (``distill_batch``: initial images or generator, loss, optimisers, run by ``optimize``).
The teacher is a split copy of the model (``graph.canonical``) in eval mode: the caller's is untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dfq_bench.calib.cache import cached_generate
from dfq_bench.checkpoint import Checkpoint
from dfq_bench.config import UnsupportedError
from dfq_bench.core.modules import NonFiniteError
from dfq_bench.graph import BATCHNORM, canonical

log = logging.getLogger(__name__)


def require_bn(model: nn.Module, source: str, label: str | None = None) -> None:
    """A BN-statistics generator refuses a model without BatchNorm up front (``UnsupportedError``)."""
    if not any(isinstance(m, BATCHNORM) for m in model.modules()):
        raise UnsupportedError(f"data={source} cannot run on {label or type(model).__name__}: it matches "
                               "BatchNorm statistics and the model has no BatchNorm layer (use data=noise or real)")


class InputStats:
    """Forward pre-hooks recording the input of each given module during a pass."""

    def __init__(self, modules: list[nn.Module], names: list[str] | None = None):
        self.modules = modules
        self.inputs: list[Tensor | None] = [None] * len(modules)
        self.names = names or [type(m).__name__ for m in modules]
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(modules)]

    def check_finite(self, loss: Tensor, what: str) -> None:
        """Raises ``NonFiniteError`` naming the first module whose input is not finite (or the
        loss, if every input is finite) when ``loss`` is NaN or Inf."""
        if bool(torch.isfinite(loss)):
            return
        for name, x in zip(self.names, self.inputs, strict=True):
            if x is not None and not bool(torch.isfinite(x).all()):
                raise NonFiniteError(f"{what}: non-finite activation (NaN or Inf) at the input of {name}")
        raise NonFiniteError(f"{what}: the loss is {float(loss)} with finite inputs at every BN")

    def _hook(self, i: int):
        def hook(module, args):
            self.inputs[i] = args[0]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.enable_grad()
def optimize(model: nn.Module, hooks: InputStats, steps: int, what: str, images: Callable[[], Tensor],
             loss_fn: Callable, params: list[Tensor], update: Callable[[int, float], None]
             ) -> tuple[Tensor, float, float]:
    """``steps`` times: ``x = images()``, the teacher's forward, ``loss_fn(x, bns, bn_inputs)``, the
    gradients of ``params`` set as their ``.grad`` (the teacher accumulates none), ``update(step,
    loss)``. Returns (the last ``x``, detached; first loss; last loss). An ``x`` that is itself the
    optimized tensor comes back updated by the last step."""
    first = last = float("nan")
    for step in range(steps):
        x = images()
        model(x)
        loss = loss_fn(x, hooks.modules, hooks.inputs)
        hooks.check_finite(loss, f"{what} step {step}")
        for p, gr in zip(params, torch.autograd.grad(loss, params), strict=True):
            p.grad = gr
        last = float(loss.detach())
        update(step, last)
        if step == 0:
            first = last
    return x.detach(), first, last


class BNStatsData:
    """A calibration source made from the teacher's BN statistics (see the module docstring)."""

    source = ""  # the registry name, in messages
    min_batch = 1  # the smallest batch its loss is defined on

    @classmethod
    def check_model(cls, model: nn.Module, label: str | None = None) -> None:
        require_bn(model, cls.source, label)

    @staticmethod
    def bn_layers(model: nn.Module) -> list[nn.Module]:
        """The BNs whose inputs are matched (``model`` is split): every BN by default."""
        return [m for m in model.modules() if isinstance(m, BATCHNORM)]

    @staticmethod
    def distill_batch(cfg, model: nn.Module, hooks: InputStats, n: int, input_size, g: torch.Generator,
                      device) -> tuple[Tensor, float, float]:
        """One batch of ``n`` images, every random draw from ``g``: (images, first loss, last loss)."""
        raise NotImplementedError

    @classmethod
    def generate(cls, cfg, model: nn.Module, input_size, seed: int, device: str, dataset=None) -> list[Tensor]:
        k = cls.min_batch
        if cfg.num_samples < k or cfg.batch_size < k or cfg.steps < 1:
            why = " (batch statistics)" if k > 1 else ""
            raise ValueError(f"data.num_samples and data.batch_size must be >= {k}{why}, data.steps >= 1")
        return cached_generate(cfg, model, input_size, seed, device,
                               lambda progress: cls.make(cfg, model, input_size, seed, progress))

    @classmethod
    def make(cls, cfg, model: nn.Module, input_size, seed: int, progress: Checkpoint | None = None
             ) -> tuple[list[Tensor], dict]:
        """The batches and the info for the row; with ``progress`` (a partial file, dfq_bench/checkpoint.py), the
        finished batches are saved after each one, and a saved generation continues at its next batch."""
        model = canonical(model).eval()
        device = next(model.parameters()).device
        bns = cls.bn_layers(model)
        if not bns:
            raise ValueError(f"{type(model).__name__} has no BatchNorm layer: BN-statistics data cannot be made")
        names = {id(m): n for n, m in model.named_modules()}
        hooks = InputStats(bns, [names[id(m)] for m in bns])
        g = torch.Generator().manual_seed(seed)
        progress = progress or Checkpoint(None, {})
        saved, out, t_before = progress.load(device), [], 0.0  # out: (images, first loss, last loss) per batch
        if saved is not None:  # every draw comes from g: its state after the saved batches continues them
            out, t_before, n_saved = list(saved["out"]), saved["t_s"], len(saved["out"])
            g.set_state(saved["g_state"])
            log.info("%s: resuming after batch %d (%s)", cls.source, len(out), progress.path)
        t0 = time.perf_counter()
        try:
            while (done := sum(len(x) for x, _, _ in out)) < cfg.num_samples:
                n = max(cls.min_batch, min(cfg.batch_size, cfg.num_samples - done))
                out.append(cls.distill_batch(cfg, model, hooks, n, input_size, g, device))
                log.info("%s batch %d: loss %.4g -> %.4g", cls.source, len(out), *out[-1][1:])
                progress.save(out=out, g_state=g.get_state(), t_s=t_before + time.perf_counter() - t0)
        finally:
            hooks.remove()
        batches, firsts, lasts = zip(*out, strict=True)
        info = {"loss_start": sum(firsts) / len(firsts), "loss_end": sum(lasts) / len(lasts), "n_bn_terms": len(bns)}
        if saved is not None:
            info["resumed"] = {"batches_done": n_saved, "t_before_s": t_before}
        return list(batches), info


__all__ = ["BNStatsData", "InputStats", "optimize", "require_bn"]
