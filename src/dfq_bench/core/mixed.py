"""Mixed precision: per-layer weight bits under a size budget, from data-free sensitivities.

ZeroQ (Cai et al., CVPR 2020, section 3.3) chooses per-layer bits from sensitivities measured on its
distilled data and reports the accuracy/size Pareto frontier; that code was never released (ZeroQ
issues #3, #10, #12). ``MixedPrecision`` is that search as a planner of the staged core (the ``plan``
stage, core/planner.py), for any method and any calibration source. Reimplemented from the paper's
description (shared/docs/methods.md); nothing is taken from any code.

Layers. The protocol's plan comes first (``plan_layers``): a first or last layer that the protocol
fixes (``first_wbits`` / ``last_wbits`` not null) keeps its bits; every other Conv/Linear is an
*allocated* layer and takes one of ``bits``. Activation bits stay the protocol's (per-layer
activation bits are a later step).

Sensitivity. S[l, k] = mean over the calibration images of KL(p(x) || p_lk(x)), p the softmax output
of the model the plan stage sees (BN folded, the method's float rewrites applied) and p_lk the same
model with only layer l's weights quantized to k bits by the run's method: its own ``grid`` and
``round`` stages run on that one layer (SQuant's flips, DFQ's kept errors, PowerQuant's power grid
count). A method whose rounding is learned in a later stage (GENIE's AdaRound) is probed with its
grid and round-to-nearest. Activations stay float in this pass. One forward over the calibration
set per (layer, bits), of the part downstream of the layer only where torch.fx traces the model (the
float values upstream are computed once per chunk of images and reused: the same numbers, about half
the work); an untraceable model runs whole forwards. The batches must exist before the weights are
quantized: a callable source
(``calib=`` a function of the state) is refused. Cached on disk (``cache``, ``cache_dir``; files in
``<root>/mp/``), keyed by a digest of the prepared model's weights and buffers, the method (name,
version, keys), the protocol's weight-grid keys, the allocated layers, ``bits`` and a digest of the
batches themselves; the activation bits are not in the key, so A8 and A4 runs share one pass. An
unreadable entry is recomputed and an unwritable cache is one warning, as calib/cache.py's.

Size, exactly what is counted. A layer with n weights, c output channels (per-tensor grid: c = 1) at
k bits stores n k bits of levels, c float32 scales and, on an asymmetric grid, c zero-points of k
bits: n k + c (32 + k) bits (symmetric: n k + 32 c). ``size_mb`` is that sum over every quantized
layer (fixed ones too) / 8 / 2^20. Biases and float layers are not counted.

Budget (one of two). ``avg_wbits = b``: sum n_l k_l <= b sum n_l over the allocated layers, i.e. no
more weight bits than the uniform b-bit model under the same protocol (ZeroQ's "MP-b"; scales
aside). The row's ``avg_wbits`` (= ``eff_wbits``) counts every quantized layer, fixed ones at their
bits, so it is slightly above b (resnet20_fmnist at b = 4: 4.01). ``size_mb = M``: the plan's
``size_mb`` <= M. Neither given: ``avg_wbits = wbits``.

Allocators, all on the same budget:
- ``dp``: minimises sum_l S[l, k_l] subject to the budget, by dynamic programming over size bins.
  Each layer's sizes are taken relative to its smallest choice; the default bin is the gcd of all
  those relative sizes, so the DP is exact (every plan's size is a multiple of the bin, and a size
  fits iff its bin count fits). ``bin_bits = B`` rounds the relative sizes up to multiples of B and
  the remaining capacity down: every plan it returns still fits, and it is optimal among the plans
  of that binned problem (exact when B divides every relative size). The exact bin is coarsened
  when it would need more than ``MAX_BINS`` bins (``mp_budget.exact`` false in the row).
- ``greedy``: from every allocated layer at its largest choice, lowers one layer by one choice at a
  time, the one with the lowest sensitivity increase per bit saved, until the plan fits.
- ``random``: from every allocated layer at its smallest choice, raises a random layer (among those
  that still fit, drawn with ``seed``) by one choice until none fits: a random plan of about the
  same size as the others at this budget.
- ``uniform``: every allocated layer at the largest k of ``bits`` whose uniform plan fits. At an
  integer ``avg_wbits`` in ``bits`` that is the uniform model of that width; between widths (2.5,
  or 5 with bits {4, 6}) it is the width below.
``greedy`` and ``dp`` need the sensitivities (and so calibration batches); ``random`` and ``uniform``
do not compute them (``mp_sensitivity`` and ``mp_objective`` are null in their rows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from dfq_bench.config import ConfigError, MpConfig, UnsupportedError, check_mp
from dfq_bench.core.planner import LayerPlan, plan_layers

log = logging.getLogger(__name__)
ALLOCATORS = ("dp", "greedy", "random", "uniform")
MAX_BINS = 1 << 20  # the exact DP's bins at most (L x MAX_BINS int8 choices are kept for the backtrack)
FORMAT = 1  # of the sensitivity cache files
MB = 8 * 2**20  # bits per MB (MiB)


# --- sizes ----------------------------------------------------------------------------------------


def layer_bits(n: int, c: int, k: int, asymmetric: bool) -> int:
    """Stored bits of one layer: n k bits of levels, c float32 scales, c k-bit zero-points if asymmetric."""
    return n * k + c * (32 + (k if asymmetric else 0))


def _shape(plan: LayerPlan, protocol) -> tuple[int, int]:
    w = plan.module.weight
    return w.numel(), (w.shape[0] if protocol.w_granularity == "per_channel" else 1)


def _asymmetric(protocol) -> bool:
    return not protocol.w_symmetric


def size_mb(plans: list[LayerPlan], protocol) -> float:
    """MB of every quantized layer's weights at their bits plus scales and zero-points (module docstring)."""
    total = sum(layer_bits(*_shape(p, protocol), p.w_bits, _asymmetric(protocol)) for p in plans if p.w_bits)
    return total / MB


def is_fixed(plan: LayerPlan, protocol) -> bool:
    """A first or last layer whose bits the protocol sets (first_wbits / last_wbits not null)."""
    return (plan.is_first and protocol.first_wbits is not None) or (plan.is_last and protocol.last_wbits is not None)


@dataclasses.dataclass
class Problem:
    """The allocation problem: the allocated layers' item sizes (bits) per choice and the capacity."""

    alloc: list[int]  # indices of the allocated layers in the plan list
    weight: np.ndarray  # (L, K) int64: size counted against the budget of layer l at bits[k]
    capacity: int  # bits the allocated layers may use
    fixed_bits: int  # size_mb bits of the fixed layers (counted in size_mb, not in an avg_wbits budget)


# --- solvers (cost: (L, K) float, weight: (L, K) int, sizes increasing in k) -----------------------


class InfeasibleError(ConfigError):
    """No plan fits the budget."""


def solve_dp(cost: np.ndarray, weight: np.ndarray, capacity: int, bin_bits: int | None = None,
             max_bins: int = MAX_BINS) -> tuple[list[int], dict]:
    """The choice per layer minimising sum cost[l, k_l] subject to sum weight[l, k_l] <= capacity.

    Returns (choices, info): info holds ``bin_bits`` (the bin used) and ``exact`` (whether that bin
    divides every relative size, so that the result is the exact optimum). Ties go to the first
    minimum found (the smaller choice of the last layers)."""
    cost, weight = np.asarray(cost, dtype=np.float64), np.asarray(weight, dtype=np.int64)
    n_layers = len(weight)
    base = weight.min(axis=1)
    rel = weight - base[:, None]
    room = int(capacity) - int(base.sum())
    if room < 0:
        raise InfeasibleError(f"no plan fits: the smallest needs {int(base.sum())} bits, the budget is {capacity}")
    g = math.gcd(*map(int, rel.ravel())) or 1
    if bin_bits is None:
        bin_bits = g if room // g <= max_bins else -(-room // max_bins)
    exact = all(int(r) % bin_bits == 0 for r in rel.ravel())
    wb = -(-rel // bin_bits)  # ceil: a binned plan that fits also fits in bits
    cap = room // bin_bits
    f = np.zeros(cap + 1)  # f[c]: least cost of the layers so far using at most c bins
    choice = np.zeros((n_layers, cap + 1), dtype=np.int8)
    for layer in range(n_layers):
        best = np.full(cap + 1, np.inf)
        arg = choice[layer]
        for k in range(weight.shape[1]):
            w = int(wb[layer, k])
            if w > cap or not np.isfinite(cost[layer, k]):
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = f[: cap + 1 - w] + cost[layer, k]
            better = cand < best
            best[better] = cand[better]
            arg[better] = k
        f = best
    if not np.isfinite(f[cap]):
        raise InfeasibleError("no plan fits the budget")
    out, c = [0] * n_layers, cap
    for layer in reversed(range(n_layers)):
        k = int(choice[layer, c])
        out[layer] = k
        c -= int(wb[layer, k])
    return out, {"bin_bits": int(bin_bits), "exact": bool(exact)}


def solve_greedy(cost: np.ndarray, weight: np.ndarray, capacity: int) -> list[int]:
    """From the largest choices, lowers the layer with the least cost increase per bit saved (ties: the
    first layer) by one choice until the plan fits."""
    n_layers, n_choices = weight.shape
    cur = [n_choices - 1] * n_layers
    total = int(sum(weight[layer, -1] for layer in range(n_layers)))
    while total > capacity:
        best, pick = math.inf, None
        for layer in range(n_layers):
            k = cur[layer]
            if k == 0:
                continue
            ratio = (cost[layer, k - 1] - cost[layer, k]) / max(int(weight[layer, k] - weight[layer, k - 1]), 1)
            if ratio < best:
                best, pick = ratio, layer
        if pick is None:
            raise InfeasibleError("no plan fits the budget")
        total -= int(weight[pick, cur[pick]] - weight[pick, cur[pick] - 1])
        cur[pick] -= 1
    return cur


def solve_random(weight: np.ndarray, capacity: int, seed: int) -> list[int]:
    """From the smallest choices, raises a random layer that still fits by one choice until none does."""
    n_layers, n_choices = weight.shape
    rng = np.random.default_rng(seed)
    cur = [0] * n_layers
    total = int(weight[:, 0].sum())
    if total > capacity:
        raise InfeasibleError("no plan fits the budget")
    while True:
        up = [layer for layer in range(n_layers) if cur[layer] < n_choices - 1
              and total + int(weight[layer, cur[layer] + 1] - weight[layer, cur[layer]]) <= capacity]
        if not up:
            return cur
        layer = up[int(rng.integers(len(up)))]
        total += int(weight[layer, cur[layer] + 1] - weight[layer, cur[layer]])
        cur[layer] += 1


def solve_uniform(weight: np.ndarray, capacity: int) -> list[int]:
    """Every layer at the largest choice whose uniform plan fits."""
    fits = [k for k in range(weight.shape[1]) if int(weight[:, k].sum()) <= capacity]
    if not fits:
        raise InfeasibleError("no plan fits the budget")
    return [fits[-1]] * len(weight)


# --- sensitivities --------------------------------------------------------------------------------


def _probe_scratch(scratch: dict) -> defaultdict:
    """A copy of the method's per-run values for one probe (its dicts copied, so nothing leaks back)."""
    return defaultdict(dict, {k: (dict(v) if isinstance(v, dict) else v) for k, v in scratch.items()})


def quantized_weight(method, state, plan: LayerPlan, bits: int) -> Tensor:
    """Layer ``plan``'s weight quantized to ``bits`` by ``method``'s grid and round stages alone."""
    from dfq_bench.core.method import QuantState

    one = dataclasses.replace(plan, w_bits=bits)
    probe = QuantState(state.float_model, dataclasses.replace(state.ctx, info={}), model=state.model, plans=[one],
                       teacher=state.teacher, scratch=_probe_scratch(state.scratch))
    method.grid(probe)
    method.round(probe)
    grid = probe.grids[plan.name]
    levels = probe.levels.get(plan.name)
    if levels is None:  # rounding learned later (GENIE): round to nearest on the method's grid
        levels = method.round_weights(plan.module.weight.detach(), grid, one, probe)
    return grid.dequant(levels).to(plan.module.weight.dtype)


class _Replay:
    """The model as a torch.fx graph (a traced copy, ``graph.trace``) that re-runs only what lies
    downstream of one layer: the other nodes keep their float values, computed once per chunk of
    images (torch.fx partial evaluation: ``Interpreter.run(initial_env=...)``)."""

    def __init__(self, model):
        from dfq_bench.graph import trace

        self.gm = trace(model)  # raises TraceError: the caller then runs whole forwards

    def downstream(self, name: str) -> set:
        down: set = set()
        for node in self.gm.graph.nodes:
            if (node.op == "call_module" and node.target == name) or any(a in down for a in node.all_input_nodes):
                down.add(node)
        return down

    def float_pass(self, x: Tensor) -> tuple[dict, Tensor]:
        interp = torch.fx.Interpreter(self.gm, garbage_collect_values=False)
        out = interp.run(x)
        return interp.env, out

    def rerun(self, env: dict, down: set, x: Tensor) -> Tensor:
        return torch.fx.Interpreter(self.gm).run(x, initial_env={n: v for n, v in env.items() if n not in down})


def _nbytes(env: dict) -> int:
    return sum(v.nbytes for v in env.values() if isinstance(v, Tensor))


def _kl_sum(lp: Tensor, logits: Tensor) -> float:
    lq = F.log_softmax(logits.double(), dim=1)
    return float((lp.exp() * (lp - lq)).sum())


@torch.no_grad()
def sensitivities(method, state, plans: list[LayerPlan], bits: list[int], batches: list[Tensor],
                  progress=lambda it, **kw: it, replay: bool = True, max_env_bytes: int = 1 << 29) -> Tensor:
    """(len(plans), len(bits)) float64: mean KL(p_fp || p) over the batches' images, p the output with
    only that layer quantized to those bits (module docstring). ``state.model`` is left as it was.

    ``replay`` (a traceable model): per (layer, bits) only the graph downstream of the layer is run
    again, on the float values of everything upstream, in chunks of images whose float values take
    at most ``max_env_bytes``; otherwise (or ``replay=False``) one whole forward per (layer, bits).
    Both compute the same numbers (the same operations on the same values)."""
    from dfq_bench.graph import TraceError

    pairs = [(i, j) for i in range(len(plans)) for j in range(len(bits))]
    n = sum(len(x) for x in batches)
    out = torch.zeros(len(plans), len(bits), dtype=torch.float64)
    try:
        rep = _Replay(state.model) if replay else None
    except TraceError:
        rep = None
    if rep is None:
        model = state.model
        ref = [F.log_softmax(model(x).double(), dim=1) for x in batches]
        for i, j in progress(pairs, desc="mp sensitivity"):
            weight = plans[i].module.weight
            orig = weight.data
            try:
                weight.data = quantized_weight(method, state, plans[i], bits[j])
                out[i, j] = sum(_kl_sum(lp, model(x)) for x, lp in zip(batches, ref, strict=True)) / n
            finally:
                weight.data = orig
        return out
    levels = {(i, j): quantized_weight(method, state, plans[i], bits[j]) for i, j in pairs}
    down = {i: rep.downstream(p.name) for i, p in enumerate(plans)}
    weights = [rep.gm.get_submodule(p.name).weight for p in plans]
    env, _ = rep.float_pass(batches[0][:1])
    per_image = max(_nbytes(env), 1)
    chunks = [c for x in batches for c in torch.split(x, max(1, max_env_bytes // per_image))]
    for c, x in enumerate(chunks):
        env, logits = rep.float_pass(x)
        lp = F.log_softmax(logits.double(), dim=1)
        for i, j in progress(pairs, desc=f"mp sensitivity {c + 1}/{len(chunks)}"):
            orig = weights[i].data
            try:
                weights[i].data = levels[i, j]
                out[i, j] += _kl_sum(lp, rep.rerun(env, down[i], x))
            finally:
                weights[i].data = orig
        del env
    return out / n


def _digest_batches(batches: list[Tensor]) -> str:
    h = hashlib.sha256()
    for x in batches:
        t = x.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sensitivity_key(method, state, plans: list[LayerPlan], bits: list[int], batches: list[Tensor]) -> str:
    from dfq_bench.run.evalcache import weights_sha256

    proto = state.protocol
    blob = {
        "format": FORMAT, "weights": weights_sha256(state.model),
        "method": {"name": method.name, "version": method.version,
                   "cfg": OmegaConf.to_container(method.cfg, resolve=True, enum_to_str=True)},
        "grid": {k: str(getattr(proto, k, None)) for k in ("w_granularity", "w_symmetric", "w_range")},
        "layers": [[p.name, list(p.module.weight.shape)] for p in plans], "bits": list(bits),
        "data": _digest_batches(batches), "device": torch.device(state.ctx.device).type,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _load(path: Path, key: str, shape: tuple[int, int]) -> dict | None:
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("kl"), Tensor)
                and tuple(entry["kl"].shape) == shape):
            raise ValueError("unexpected contents")
        return entry
    except Exception as e:  # a torn or foreign file: recompute
        log.warning("sensitivity cache file %s is unreadable (%s); recomputing it", path, e)
        return None


# --- the planner ----------------------------------------------------------------------------------


class MixedPrecision:
    """The mixed-precision planner (module docstring). Keys as ``config.MpConfig`` (``mp.*`` on the
    command line), checked like them; ``data`` labels the calibration source in the row.

        dfq_bench.quantize(model, "squant", wbits=4, abits=8, example_input=x, calib=calib,
                           planner=MixedPrecision(allocator="dp", avg_wbits=3.5))
    """

    def __init__(self, cfg=None, data: str = "calib", **keys):
        self.cfg = OmegaConf.merge(OmegaConf.structured(MpConfig), cfg or {}, keys)
        if self.cfg.allocator == "none":
            raise ConfigError("mp.allocator=none is the protocol's plan; valid: " + ", ".join(ALLOCATORS))
        self.data = data
        self.bits = sorted(int(b) for b in self.cfg.bits)

    @property
    def needs_data(self) -> bool:
        return self.cfg.allocator in ("dp", "greedy")

    # ---- the problem -------------------------------------------------------------------------------

    def problem(self, plans: list[LayerPlan], protocol, wbits: int, label: str = "the model") -> Problem:
        """The allocated layers, their sizes per choice and the capacity; raises ``UnsupportedError``
        (one line) when the model has no layer to allocate or the budget is out of its reach."""
        check_mp(self.cfg, wbits)
        cfg, asym = self.cfg, _asymmetric(protocol)
        alloc = [i for i, p in enumerate(plans) if p.w_bits is not None and not is_fixed(p, protocol)]
        if not alloc:
            raise UnsupportedError(f"mp.allocator={cfg.allocator}: {label} has no layer to allocate (the protocol "
                                   "fixes the bits of every Conv/Linear)")
        shapes = [_shape(plans[i], protocol) for i in alloc]
        fixed = sum(layer_bits(*_shape(p, protocol), p.w_bits, asym) for i, p in enumerate(plans)
                    if p.w_bits is not None and i not in alloc)
        if cfg.size_mb is None:
            avg = cfg.avg_wbits if cfg.avg_wbits is not None else wbits
            weight = np.array([[n * k for k in self.bits] for n, _ in shapes], dtype=np.int64)
            capacity = math.floor(Fraction(repr(float(avg))) * sum(n for n, _ in shapes))
        else:
            weight = np.array([[layer_bits(n, c, k, asym) for k in self.bits] for n, c in shapes], dtype=np.int64)
            capacity = math.floor(Fraction(repr(float(cfg.size_mb))) * MB) - fixed
            lo, hi = ((fixed + int(weight[:, j].sum())) / MB for j in (0, -1))
            if not lo <= cfg.size_mb <= hi:
                side, k, mb = ("below the smallest", self.bits[0], lo) if cfg.size_mb < lo else \
                    ("above the largest", self.bits[-1], hi)
                raise UnsupportedError(f"mp.size_mb={cfg.size_mb} is {side} plan of {label} ({mb:.6g} MB: every "
                                       f"allocated layer at {k} bits); valid: {lo:.6g}..{hi:.6g}")
        return Problem(alloc, weight, int(capacity), int(fixed))

    def check_model(self, model, ctx, label: str | None = None) -> None:
        """The budget's reach on ``model`` before any work (the runner calls it beside the method's)."""
        plans = plan_layers(model, ctx.example_input, ctx.protocol, ctx.wbits, ctx.abits)
        self.problem(plans, ctx.protocol, ctx.wbits, label or type(model).__name__)

    # ---- the plan stage ---------------------------------------------------------------------------

    def plan_state(self, method, state) -> list[LayerPlan]:
        ctx, cfg = state.ctx, self.cfg
        plans = plan_layers(state.model, ctx.example_input, ctx.protocol, ctx.wbits, ctx.abits)
        prob = self.problem(plans, ctx.protocol, ctx.wbits)
        alloc = [plans[i] for i in prob.alloc]
        cost = sens = None
        t_sens = None
        if self.needs_data:
            t0 = time.perf_counter()
            cost, sens = self._sensitivities(method, state, alloc)
            t_sens = time.perf_counter() - t0
        t0 = time.perf_counter()
        solver = {}
        if cfg.allocator == "dp":
            choice, solver = solve_dp(cost.numpy(), prob.weight, prob.capacity, cfg.bin_bits)
        elif cfg.allocator == "greedy":
            choice = solve_greedy(cost.numpy(), prob.weight, prob.capacity)
        elif cfg.allocator == "random":
            choice = solve_random(prob.weight, prob.capacity, cfg.seed)
        else:
            choice = solve_uniform(prob.weight, prob.capacity)
        t_plan = time.perf_counter() - t0
        for p, k in zip(alloc, choice, strict=True):
            p.w_bits = self.bits[k]
        from dfq_bench.core.method import effective_wbits

        used = int(sum(prob.weight[j, k] for j, k in enumerate(choice)))
        state.info.update(
            mp_bits=[p.w_bits for p in plans], avg_wbits=effective_wbits(plans), size_mb=size_mb(plans, ctx.protocol),
            mp_budget={"capacity_bits": prob.capacity, "used_bits": used, **solver},
            mp_objective=None if cost is None else float(sum(cost[j, k] for j, k in enumerate(choice))),
            mp_sensitivity=sens, t_sensitivity_s=t_sens, t_plan_s=t_plan)
        return plans

    def _sensitivities(self, method, state, alloc: list[LayerPlan]) -> tuple[Tensor, dict]:
        calib = state.ctx.calib
        if calib is None or callable(calib):
            raise ValueError("mixed precision needs calibration batches before the weights are quantized "
                             "(a list, e.g. dfq_bench.make_calib(...)); a callable source is called only after")
        batches = list(calib)
        info = {"data": self.data, "n_samples": sum(len(x) for x in batches), "bits": self.bits}
        bar = state.ctx.progress
        if not self.cfg.cache:
            t0 = time.perf_counter()
            kl = sensitivities(method, state, alloc, self.bits, batches, bar)
            return kl, {**info, "cache": "off", "t_made_s": time.perf_counter() - t0}
        from dfq_bench.calib.cache import cache_root
        from dfq_bench.results import atomic_write

        key = sensitivity_key(method, state, alloc, self.bits, batches)
        path = cache_root(self.cfg.cache_dir) / "mp" / f"{method.name}-{key[:24]}.pt"
        entry = _load(path, key, (len(alloc), len(self.bits)))
        if entry is not None:
            return entry["kl"], {**info, "cache": "hit", "cache_file": str(path), "t_made_s": entry["t_made_s"]}
        t0 = time.perf_counter()
        kl = sensitivities(method, state, alloc, self.bits, batches, bar)
        made = time.perf_counter() - t0
        entry = {"key": key, "kl": kl, "layers": [p.name for p in alloc], "bits": self.bits, "t_made_s": made}
        try:
            atomic_write(path, lambda tmp: torch.save(entry, tmp))
        except Exception as e:  # OSError, or torch.save's RuntimeError for a file it cannot open
            reason = f"{type(e).__name__}: {e}"
            log.warning("cannot write sensitivity cache %s (%s); the run goes on without it", path, reason)
            return kl, {**info, "cache": "miss", "cache_error": reason, "t_made_s": made}
        return kl, {**info, "cache": "miss", "cache_file": str(path), "t_made_s": made}


def from_config(mp, data: str = "calib") -> MixedPrecision | None:
    """The planner of a run's ``mp`` node, or None when mixed precision is off (``allocator: none``)."""
    if mp is None or mp.allocator == "none":
        return None
    return MixedPrecision(mp, data=data)


MIXED = MixedPrecision(allocator="dp")  # PLANNERS["mixed"]: the exact DP at the size of the uniform wbits model
