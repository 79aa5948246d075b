"""DFQ: data-free quantization through weight equalization and bias correction.

Paper: M. Nagel, M. van Baalen, T. Blankevoort, M. Welling, "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019. No official code; the method ships in Qualcomm's AIMET
(github.com/quic/aimet, BSD-3-Clause) and has a PyTorch reimplementation (github.com/jakc4103/DFQ,
MIT). Written from the equations in shared/docs/methods.md; no code was taken from either.

Steps (each a config key, all on by default), in this order:
1. ``relu6_to_relu``: every ReLU6 (module or ``F.relu6``) becomes ReLU, because equalization is not
   valid through a clip. This changes the float function; the row counts the sites
   (``n_relu6_to_relu``, ``n_relu6_kept``). Off: links through a ReLU6 are not equalized.
   ``relu6_scope=safe`` (not in the paper) replaces only the ReLU6 whose BN statistics keep the
   clipped input below 6 (beta + 6|gamma| <= 6 in every channel, at every call site of a shared
   module), i.e. where the replacement is exact to 6 sigma; the others stay and stop CLE.
2. BN folding (``core.bn.fold_bn``), always: DFQ needs it, so it folds even when
   ``protocol.fold_bn`` is false (the row says ``dfq_fold: method``). The BN statistics are kept:
   the folded conv's output channel c is N(beta_c, gamma_c^2) per DFQ's assumption.
3. ``cle``: cross-layer equalization on every link found by tracing (``graph.equalization_links``:
   conv/linear -> [ReLU, pooling, flatten] -> conv/linear, single users only) whose consumer kind is
   in ``cle_consumers`` (default conv and linear: the last conv is also linked through average pooling
   to the classifier, which AIMET does not; ``[conv]`` is AIMET's choice; the row counts links per
   kind in ``cle_links``; bias absorption uses the same links). Per shared channel i,
   s_i = sqrt(r1_i * r2_i) / r1_i; the producer's output channel i (and bias) is multiplied by s_i, the
   consumer's input channel i divided by it. Depthwise and grouped convs are handled per channel
   (a depthwise conv's input channel i is its kernel i). Links are swept in graph order until no
   scale moves by more than ``cle_tol`` (``cle_max_iter`` sweeps at most). ``cle_triplets`` (default
   true): two links through a depthwise conv, conv -> dw -> conv, are balanced in closed form in their
   place in each sweep, as AIMET's single pass does: the three ranges of channel i become
   m_i = cbrt(r1_i r2_i r3_i) (their product is invariant), s12_i = m_i / r1_i, s23_i = r3_i / m_i,
   which is the fixed point of the pairwise iteration on the triplet (for absmax and minmax alike:
   both ranges scale linearly with a positive channel scale). Links between triplets (projection ->
   expansion) still couple them, so the sweep continues to the same fixed point as the pairwise-only
   sweep (``cle_triplets=false``, every run before the key existed; its rows keep their run_ids), in
   fewer sweeps (trained mobilenetv2_fmnist: 32 instead of 40). True is the default because it is what
   AIMET does and moves the weights only within the stopping tolerance (about 1e-7 relative on
   mobilenet_v2); false is there to reproduce the committed rows. The row counts ``n_cle_triplets``
   (their links are among ``n_cle_pairs``). Computed in float64, written back once.
4. ``bias_absorption``: on ReLU links whose producer had a BN, c = max(0, beta - ``absorb_n_std``*gamma)
   (the BN statistics as CLE rescaled them) moves from the producer's bias into the consumer's bias
   (+ W2 summed over its spatial dims, times c). Exact wherever the absorbed channels are ReLU-active.
5. ``bias_correction``: for each quantized layer whose input comes from a BN (through an optional
   ReLU/ReLU6, average pooling, flatten), E[x] is the rectified (clipped for ReLU6) Gaussian mean of
   N(beta, gamma^2) and b <- b - (eps summed over spatial dims) @ E[x], eps = Q(W) - W on the layer's
   actual grid (its planned bit width and the protocol's granularity).
6. Activation ranges: the ``bn`` rule (beta +- 6|gamma| after ReLU, capped at 6 after ReLU6) fed
   with the statistics after CLE and absorption (``DFQ.bn_sources``, read by ``Method.calibrate``);
   inputs without a BN source (residual adds, concatenations) fall back to min/max on the
   calibration batches.

Deviations and choices:
- Channel range for CLE: ``cle_range=absmax`` (max |w| of the channel, as the paper's symmetric
  ranges and AIMET) by default; ``minmax`` (max - min, as torch.ao.quantization._equalize) optional.
- A dead channel (zero range on either side) keeps s = 1; in a triplet, a channel dead on one link
  keeps s = 1 there and has its other link balanced as a pair (what the pairwise sweep converges to).
- AIMET makes one pass; the sweep here iterates to the fixed point (``cle_max_iter=1``: one sweep,
  every triplet in closed form as in that pass; not compared with AIMET in this repository's tests).
- Absorption into a consumer with zero padding (3x3 depthwise) is inexact at the border pixels,
  as in the paper and its reimplementations; bias correction likewise ignores padding.
- Bias correction uses the float (equalized) weights' input statistics only: the shift that the
  upstream layers' own quantization causes is not propagated (as in the paper's analytic version).
- The reimplementation that hard-codes 8 bits in bias correction is not followed (the layer's own
  bits are used). Biases stay in float (the harness never quantizes biases).
- Steps that do not apply (no BN, no link) are skipped and counted as zero. A model torch.fx cannot
  trace is refused up front (``UnsupportedError``, one line, before any calibration data is made)
  unless every graph step is off.
- timm's fused ``BatchNormAct2d`` is split into BN + activation first (``graph.split_norm_act``), so
  links, bias correction and the ``bn`` rule see the activation (a SiLU or Hardswish stops a link
  and gives no BN source; a ReLU or ReLU6 is seen as such).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from types import SimpleNamespace

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from dfq_bench.config import ConfigError
from dfq_bench.core.bn import fold_bn
from dfq_bench.core.grid import Grid
from dfq_bench.core.method import Method, QuantContext, QuantState
from dfq_bench.core.planner import LayerPlan
from dfq_bench.graph import (
    Link,
    TraceError,
    canonical,
    conv_bn_pairs,
    equalization_links,
    input_sources,
    is_plain_bn,
    relu6_sites,
)
from dfq_bench.graph import relu6_to_relu as replace_relu6

log = logging.getLogger(__name__)


class CleRange(str, Enum):
    absmax = "absmax"
    minmax = "minmax"


class Relu6Scope(str, Enum):
    all = "all"  # every ReLU6 (the paper; AIMET's CLE did so only before aimet-torch 2.4)
    safe = "safe"  # only where the BN statistics keep the clipped input below 6 (beta + 6|gamma| <= 6)


SAFE_N_STD = 6.0  # the same 6 sigma as the `bn` range rule


# ---- per-channel views of a Conv/Linear weight ------------------------------------------------


def out_rows(w: Tensor) -> Tensor:
    """(out channels, everything else)."""
    return w.reshape(w.shape[0], -1)


def _groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


def in_rows(layer: nn.Module, w: Tensor, channels: int) -> Tensor:
    """(input channel, every weight that reads it). A Linear after a flatten reads ``k`` features
    per channel (channel-major), so its channel i owns columns i*k .. (i+1)*k - 1."""
    if isinstance(layer, nn.Linear):
        k = w.shape[1] // channels
        return w.reshape(w.shape[0], channels, k).transpose(0, 1).reshape(channels, -1)
    g, ipg = _groups(layer), w.shape[1]
    return w.reshape(g, w.shape[0] // g, ipg, -1).transpose(1, 2).reshape(g * ipg, -1)


def scale_in(layer: nn.Module, w: Tensor, s: Tensor) -> Tensor:
    """``w`` with every weight reading input channel i multiplied by s_i."""
    if isinstance(layer, nn.Linear):
        return w * s.repeat_interleave(w.shape[1] // s.numel())[None, :]
    g, ipg, out = _groups(layer), w.shape[1], w.shape[0]
    f = s.reshape(g, 1, ipg).expand(g, out // g, ipg).reshape(out, ipg, *([1] * (w.dim() - 2)))
    return w * f


def in_apply(layer: nn.Module, w: Tensor, v: Tensor) -> Tensor:
    """Output of the layer (without bias) for a constant input: v_i everywhere in channel i."""
    out = w.shape[0]
    if isinstance(layer, nn.Linear):
        return w.reshape(out, v.numel(), -1).sum(-1) @ v
    g, ipg = _groups(layer), w.shape[1]
    ws = w.reshape(out, ipg, -1).sum(-1)
    vg = v.reshape(g, ipg)[torch.arange(out, device=v.device) // (out // g)]
    return (ws * vg).sum(1)


def channel_range(rows: Tensor, mode) -> Tensor:
    if CleRange(mode) == CleRange.minmax:
        return rows.amax(1) - rows.amin(1)
    return rows.abs().amax(1)


def _bcast(v: Tensor, w: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (w.dim() - 1))


# ---- cross-layer equalization and high-bias absorption -----------------------------------------


@dataclass
class CleResult:
    iters: int
    converged: bool
    last_change: float  # max |s - 1| of the last sweep
    scales: dict  # producer name -> total per-channel scale of its outputs (float64)
    n_triplets: int = 0  # conv -> depthwise -> conv triplets balanced in closed form


class _ScaledLayer:
    """A layer's weight as W[o, i] * s_out[o] / s_in[i], with the per-(o, i) max (and min) over the
    remaining dims (kernel positions, or the k features of a channel after a flatten) computed once,
    so a sweep costs O(out x in) and the weights are rescaled only once at the end (in float64)."""

    def __init__(self, layer: nn.Module, n_in: int, mode):
        self.layer = layer
        w = layer.weight.detach().double()
        out = w.shape[0]
        if isinstance(layer, nn.Linear):
            self.g, w3 = 1, w.reshape(out, n_in, -1)
        else:
            self.g, w3 = layer.groups, w.reshape(out, w.shape[1], -1)
        self.ipg, self.opg = w3.shape[1], out // self.g
        if CleRange(mode) == CleRange.minmax:
            self.mx, self.mn = w3.amax(-1), w3.amin(-1)
        else:
            self.mx, self.mn = w3.abs().amax(-1), None
        self.row_group = torch.arange(out, device=w.device) // self.opg
        self.s_out = torch.ones(out, dtype=torch.float64, device=w.device)
        self.s_in = torch.ones(self.g * self.ipg, dtype=torch.float64, device=w.device)

    def out_range(self) -> Tensor:
        t = 1.0 / self.s_in.reshape(self.g, self.ipg)[self.row_group]
        r = (self.mx * t).amax(1)
        if self.mn is not None:
            r = r - (self.mn * t).amin(1)
        return r * self.s_out

    def in_range(self) -> Tensor:
        u = self.s_out[:, None]
        r = (self.mx * u).reshape(self.g, self.opg, self.ipg).amax(1).reshape(-1)
        if self.mn is not None:
            r = r - (self.mn * u).reshape(self.g, self.opg, self.ipg).amin(1).reshape(-1)
        return r / self.s_in

    def write_back(self) -> None:
        m = self.layer
        w = m.weight.detach().double()
        w = scale_in(m, w * _bcast(self.s_out, w), 1.0 / self.s_in)
        with torch.no_grad():
            m.weight.copy_(w.to(m.weight.dtype))
            if m.bias is not None:
                m.bias.copy_((m.bias.detach().double() * self.s_out).to(m.bias.dtype))


def is_depthwise(m: nn.Module) -> bool:
    """A conv whose output channel i reads input channel i only (groups = in = out channels)."""
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups == m.in_channels == m.out_channels


def cle_units(model: nn.Module, links: list[Link], triplets: bool = True) -> list[tuple[Link, ...]]:
    """``links`` grouped into the units of one sweep, in the order of each unit's first link: a
    conv -> depthwise -> conv triplet ``(a, b)`` where ``a``'s consumer is a depthwise conv and ``b``
    the link it produces (each layer feeds one link and reads one, so no other link touches those
    channels; a link joins one triplet at most), every other link alone, ``(link,)``."""
    if not triplets:
        return [(link,) for link in links]
    from_producer = {link.producer: k for k, link in enumerate(links)}
    used, units = set(), []
    for k, link in enumerate(links):
        if k in used:
            continue
        nxt = from_producer.get(link.consumer)
        if nxt is not None and nxt not in used and is_depthwise(model.get_submodule(link.consumer)):
            used.update((k, nxt))
            units.append((link, links[nxt]))
        else:
            used.add(k)
            units.append((link,))
    return units


def _pair_scale(r1: Tensor, r2: Tensor) -> Tensor:
    """s_i = sqrt(r2_i / r1_i) (1 for a dead channel): both ranges become sqrt(r1_i * r2_i)."""
    ok = (r1 > 0) & (r2 > 0)
    return torch.where(ok, torch.sqrt(r2 / torch.where(ok, r1, 1.0)), 1.0)


def _balance_pair(p: _ScaledLayer, c: _ScaledLayer) -> float:
    s = _pair_scale(p.out_range(), c.in_range())
    p.s_out *= s
    c.s_in *= s
    return float((s - 1).abs().max())


def _balance_triplet(p: _ScaledLayer, d: _ScaledLayer, c: _ScaledLayer) -> float:
    """Closed form for p -> depthwise d -> c, given the current scales of everything else: per
    channel the three ranges r1 (p's output), r2 (d's), r3 (c's input) become their geometric mean
    m = cbrt(r1 r2 r3), the product being invariant under both links' rescaling: s12 = m / r1 (p's
    output times it, d's input divided), then s23 = r3 / m (d's output times it, c's input divided).
    This is the fixed point of the pairwise sweep on the chain. A channel with a zero range gets what
    the pairwise sweep converges to: s = 1 on a dead link, the other link balanced as a pair."""
    r1, r2, r3 = p.out_range(), d.out_range(), c.in_range()
    ok = (r1 > 0) & (r2 > 0) & (r3 > 0)
    m = torch.where(ok, r1 * r2 * r3, 1.0) ** (1.0 / 3.0)
    s12 = torch.where(ok, m / torch.where(ok, r1, 1.0), _pair_scale(r1, r2))
    p.s_out *= s12
    d.s_in *= s12
    s23 = torch.where(ok, r3 / m, _pair_scale(d.out_range(), r3))
    d.s_out *= s23
    c.s_in *= s23
    return max(float((s12 - 1).abs().max()), float((s23 - 1).abs().max()))


def equalize(model: nn.Module, links: list[Link], tol: float = 1e-8, max_iter: int = 100,
             mode=CleRange.absmax, triplets: bool = False) -> CleResult:
    """Cross-layer equalization of ``links`` in place, swept in order until max |s - 1| < ``tol``.

    Per link and shared channel i: r1_i = range of the producer's output channel i, r2_i = range of
    the consumer's input channel i (all weights reading it), s_i = sqrt(r2_i / r1_i) (1 for a dead
    channel); the producer's channel i is multiplied by s_i, the consumer's input i divided by it.
    ``triplets``: each conv -> depthwise -> conv triplet (``cle_units``) is balanced in closed form
    in its place in the sweep (``_balance_triplet``) instead of as two pairs; same fixed point.
    """
    n_in = {link.consumer: _channels(model.get_submodule(link.producer)) for link in links}
    layers = {}
    for link in links:
        for name in (link.producer, link.consumer):
            if name not in layers:
                m = model.get_submodule(name)
                layers[name] = _ScaledLayer(m, n_in.get(name, m.weight.shape[1]), mode)
    units = cle_units(model, links, triplets)
    iters, change = 0, 0.0
    while links and iters < max_iter:
        iters, change = iters + 1, 0.0
        for unit in units:
            if len(unit) == 1:
                step = _balance_pair(layers[unit[0].producer], layers[unit[0].consumer])
            else:
                a, b = unit
                step = _balance_triplet(layers[a.producer], layers[a.consumer], layers[b.consumer])
            change = max(change, step)
        if change < tol:
            break
    for layer in layers.values():
        layer.write_back()
    scales = {link.producer: layers[link.producer].s_out for link in links}
    return CleResult(iters, not links or change < tol, change, scales, sum(len(u) == 2 for u in units))


def _channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _add_bias(layer: nn.Module, delta: Tensor) -> None:
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(delta.to(layer.weight.dtype).clone())
        else:
            layer.bias.add_(delta.to(layer.bias.dtype))


def absorb_high_bias(model: nn.Module, link: Link, mean: Tensor, std: Tensor, n_std: float) -> Tensor:
    """Moves c = max(0, mean - n_std * std) from the producer's bias into the consumer's; returns c."""
    prod, cons = model.get_submodule(link.producer), model.get_submodule(link.consumer)
    c = torch.clamp(mean - n_std * std, min=0.0)
    if prod.bias is None or not bool((c > 0).any()):
        return torch.zeros_like(c)
    _add_bias(prod, -c)
    _add_bias(cons, in_apply(cons, cons.weight.detach().double(), c))
    return c


# ---- bias correction ---------------------------------------------------------------------------


def clipped_gaussian_mean(mean: Tensor, std: Tensor, act: str | None) -> Tensor:
    """E[f(x)] for x ~ N(mean, std^2) and f = identity, ReLU or ReLU6 (clip to [0, 6])."""
    if act is None:
        return mean
    hi = 6.0 if act == "relu6" else math.inf
    sd = torch.clamp(std, min=1e-12)
    a = (0.0 - mean) / sd
    pdf = lambda z: torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf_a = torch.special.ndtr(a)
    if math.isinf(hi):
        return mean * (1 - cdf_a) + sd * pdf(a)
    bz = (hi - mean) / sd
    cdf_b = torch.special.ndtr(bz)
    return hi * (1 - cdf_b) + mean * (cdf_b - cdf_a) + sd * (pdf(a) - pdf(bz))


# ---- the method --------------------------------------------------------------------------------


@dataclass
class _FloatFacts:
    """What DFQ reads from the unfolded float model before anything changes."""

    bn_of: dict  # conv name -> name of the BN folded into it
    stats: dict  # BN name -> (mean, std) of its output, float64; rescaled by CLE/absorption
    range_src: dict  # layer -> graph.Source ending at a BN (the `bn` range rule's walk)
    mean_src: dict  # layer -> graph.Source ending at a BN (mean-keeping walk, for bias correction)
    relu6: dict  # graph.relu6_sites: site key -> modules feeding each call site
    traced: bool


def float_facts(model: nn.Module) -> _FloatFacts:
    """Read from a split copy of the float model (``graph.canonical``: fused norm-activation modules
    split, names as in the prepared working copy); ``model`` itself is never traced or changed."""
    ref = canonical(model)
    stats = {}
    for name, m in ref.named_modules():
        if is_plain_bn(m):
            n = m.num_features
            dev = m.running_mean.device if m.running_mean is not None else None
            gamma = m.weight.detach().double() if m.affine else torch.ones(n, dtype=torch.float64, device=dev)
            beta = m.bias.detach().double() if m.affine else torch.zeros(n, dtype=torch.float64, device=dev)
            stats[name] = (beta.clone(), gamma.abs().clone())
    try:
        bn_of = dict(conv_bn_pairs(ref))
        range_src = {k: s for k, s in input_sources(ref, "range").items() if s.name in stats}
        mean_src = {k: s for k, s in input_sources(ref, "mean").items() if s.name in stats}
        sites = relu6_sites(ref)
    except TraceError:  # only reached with every graph step off (check_model refuses otherwise)
        return _FloatFacts({}, stats, {}, {}, {}, False)
    return _FloatFacts(bn_of, stats, range_src, mean_src, sites, True)


def safe_relu6_sites(facts: _FloatFacts, n_std: float = SAFE_N_STD) -> set:
    """ReLU6 sites whose every call site clips a BN output with beta + n_std*|gamma| <= 6 in all
    channels: replacing them by ReLU changes nothing within n_std standard deviations."""
    def below_six(src):
        if src not in facts.stats:
            return False
        mean, std = facts.stats[src]
        return bool((mean + n_std * std <= 6.0).all())

    return {key for key, feeding in facts.relu6.items() if all(below_six(f) for f in feeding)}


class DFQ(Method):
    name = "dfq"
    version = "1"
    default_act_range = "bn"

    @dataclass
    class Config:
        name: str = MISSING
        relu6_to_relu: bool = True
        relu6_scope: Relu6Scope = Relu6Scope.all  # all (paper) | safe (only where exact to 6 sigma)
        cle: bool = True
        cle_tol: float = 1e-8  # stop when no scale moves by more than this in a sweep
        cle_max_iter: int = 100  # sweeps at most
        cle_range: CleRange = CleRange.absmax
        # conv -> depthwise -> conv triplets balanced in closed form in each sweep (AIMET's single pass
        # does so); false: the pairwise-only sweep of every run before the key existed (same fixed point)
        cle_triplets: bool = True
        cle_consumers: list[str] = field(default_factory=lambda: ["conv", "linear"])  # AIMET: [conv]
        bias_absorption: bool = True
        absorb_n_std: float = 3.0
        bias_correction: bool = True

    @staticmethod
    def check_config(c) -> None:
        """Values the types cannot express; one-line ``ConfigError`` (checked before any model is built)."""
        if not c.cle_consumers or any(k not in ("conv", "linear") for k in c.cle_consumers):
            raise ConfigError(f"method.cle_consumers={list(c.cle_consumers)!r} is invalid; valid: a non-empty "
                              "list of conv, linear")
        if not c.cle_tol > 0:
            raise ConfigError(f"method.cle_tol={c.cle_tol!r} is invalid; valid: a positive float")
        if c.cle_max_iter < 1:
            raise ConfigError(f"method.cle_max_iter={c.cle_max_iter!r} is invalid; valid: an integer >= 1")
        if not c.absorb_n_std >= 0:
            raise ConfigError(f"method.absorb_n_std={c.absorb_n_std!r} is invalid; valid: a float >= 0")


    def needs_graph(self, ctx: QuantContext) -> bool:
        c = self.cfg
        return c.relu6_to_relu or c.cle or c.bias_absorption or c.bias_correction or super().needs_graph(ctx)

    def prepare(self, state: QuantState) -> None:
        """Reads the float model's BN statistics and graph facts first (``float_facts``)."""
        state.scratch.update(facts=float_facts(state.float_model), eps={}, replaced=set())
        super().prepare(state)

    @staticmethod
    def _act(src, replaced: set) -> str | None:
        """The activation between a BN and a layer, after the ReLU6 replacement."""
        return "relu" if src.act == "relu6" and src.act_site in replaced else src.act

    def transform(self, state: QuantState) -> None:
        cfg, facts, info, ctx = self.cfg, state.scratch["facts"], state.info, state.ctx
        qmodel = state.model
        info["n_relu6_to_relu"] = 0
        if cfg.relu6_to_relu:
            safe = Relu6Scope(cfg.relu6_scope) == Relu6Scope.safe
            state.scratch["replaced"] = replaced = safe_relu6_sites(facts) if safe else set(facts.relu6)
            qmodel, info["n_relu6_to_relu"] = replace_relu6(qmodel, replaced if safe else None)
            state.model = qmodel
        info["n_relu6_kept"] = max(0, sum(len(v) for v in facts.relu6.values()) - info["n_relu6_to_relu"])
        n_fold = fold_bn(qmodel, info)  # 0 when the protocol already folded
        info["n_bn_folded"] = info.get("n_bn_folded", 0) + n_fold
        info["dfq_fold"] = "protocol" if ctx.protocol.fold_bn else "method"
        links = equalization_links(qmodel) if facts.traced else []
        kind = {link.consumer: "linear" if isinstance(qmodel.get_submodule(link.consumer), nn.Linear) else "conv"
                for link in links}
        links = [link for link in links if kind[link.consumer] in cfg.cle_consumers]
        info["cle_links"] = {k: sum(kind[link.consumer] == k for link in links) for k in ("conv", "linear")}
        info.update(n_cle_pairs=0, n_cle_triplets=0, cle_iters=0, cle_converged=None, n_absorbed=0,
                    n_absorbed_channels=0)
        if cfg.cle and links:
            res = equalize(qmodel, links, cfg.cle_tol, cfg.cle_max_iter, cfg.cle_range, cfg.cle_triplets)
            for prod, s in res.scales.items():
                bn = facts.bn_of.get(prod)
                if bn is not None:
                    mean, std = facts.stats[bn]
                    facts.stats[bn] = (mean * s, std * s)
            info.update(n_cle_pairs=len(links), n_cle_triplets=res.n_triplets, cle_iters=res.iters,
                        cle_converged=res.converged)
            if not res.converged:
                log.warning("DFQ: CLE stopped after %d sweeps (max |s-1| = %.3g)", res.iters, res.last_change)
        if cfg.bias_absorption:
            for link in links:
                bn = facts.bn_of.get(link.producer)
                if link.act != "relu" or bn is None:
                    continue
                mean, std = facts.stats[bn]
                c = absorb_high_bias(qmodel, link, mean, std, cfg.absorb_n_std)
                if bool((c > 0).any()):
                    facts.stats[bn] = (mean - c, std)
                    info["n_absorbed"] += 1
                    info["n_absorbed_channels"] += int((c > 0).sum())

    def round_weights(self, w: Tensor, grid: Grid, plan: LayerPlan | None, state: QuantState | None = None) -> Tensor:
        levels = grid.levels(w)
        if self.cfg.bias_correction and state is not None:
            state.scratch["eps"][plan.name] = (grid.dequant(levels) - w).detach().double()
        return levels

    def correct(self, state: QuantState) -> None:
        """Bias correction: b <- b - eps @ E[x], E[x] from the BN statistics (step 5)."""
        state.info["n_bias_corrected"] = 0
        if not self.cfg.bias_correction:
            return
        facts, eps = state.scratch["facts"], state.scratch["eps"]
        for p in state.plans:
            src = facts.mean_src.get(p.name)
            if src is None or p.name not in eps:
                continue
            mean, std = facts.stats[src.name]
            layer, n = p.module, mean.numel()
            fits = layer.in_features % n == 0 if isinstance(layer, nn.Linear) else layer.in_channels == n
            if not fits:
                continue
            ex = clipped_gaussian_mean(mean, std, self._act(src, state.scratch["replaced"]))
            _add_bias(layer, -in_apply(layer, eps[p.name], ex))
            state.info["n_bias_corrected"] += 1

    def bn_sources(self, state: QuantState) -> dict:
        """The `bn` range rule's inputs, with the statistics as CLE and absorption left them."""
        facts, replaced, out = state.scratch["facts"], state.scratch["replaced"], {}
        for layer, src in facts.range_src.items():
            mean, std = facts.stats[src.name]
            out[layer] = (SimpleNamespace(weight=std.float(), bias=mean.float()), self._act(src, replaced))
        return out
