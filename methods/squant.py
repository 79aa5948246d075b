"""SQuant: data-free quantization by diverse and sparse flipping of rounded weights.

Paper: Guo et al., "SQuant: On-the-Fly Data-Free Quantization via Diagonal Hessian Approximation",
ICLR 2022. Reference code: https://github.com/clevercool/SQuant (GPL-3.0). This file is a
reimplementation from the description in shared/docs/methods.md; no reference code is copied.

Weights (``flip_levels``). On the grid's scaled weights x (``Grid.scaled``), rn = round(x) and the
rounding error e = rn - x. A *flip* moves an element one step against its rounding (rn + 1 if e < 0,
rn - 1 if e > 0), allowed only inside the grid; its priority is |e|. Stages, in the reference order:

- E: round to nearest (``squant-e`` stops here and equals RTN exactly).
- K, per kernel (oc, ic) of a k x k conv (skipped where k*k == 1: 1x1 convs, Linear): s = sum of e;
  flip round(|s|) elements in the direction that shrinks |s| (up if s < 0, else down), highest
  priority first. Each kernel then hands ONE candidate to stage C: if it over-flipped
  (round(|s|) >= |s|), its last flipped element as an un-flip (priority = its new |e|); otherwise the
  next element in its priority order (priority = its |e|). All other priorities become 0.
- C, per output channel: S = sum of the (post-K) errors of the channel; flip round(|S|) elements in
  the direction that shrinks |S|, highest priority first, among the K candidates (all elements when
  K is off). A flipped element takes the level "rn + 1" / "rn - 1" computed from its ORIGINAL
  rounding (so an un-flip returns to rn), or keeps rn where that move is not allowed.
- Clamp to [qmin, qmax].

Reference bookkeeping reproduced on purpose (so the levels equal the reference algorithm's):
(1) a kernel whose error sum is exactly 0 takes the "down" branch with zero flips and counts as
over-flipped, so the LAST element of its down order becomes its candidate, in the up direction, with
priority |e|; (2) when round(|s|) exceeds the number of elements that may move in that direction,
the priority order also hands out elements that cannot move: their level stays but their recorded
error becomes 0 (this changes the channel sum stage C sees). The same happens in stage C, where a
handed-out zero-priority element takes its original-based neighbour level.

Ties, made deterministic (the reference's torch.sort is not stable): every priority order is
(priority descending, flat index ascending), within the kernel for K and within the output channel
(index over (ic, kh, kw)) for C. Exact .5 ties of x round half to even (torch.round, as in RTN and
the reference's PyTorch path); round(|s|) is half-to-even too (|s| = 0.5 gives 0 flips).

Activations (``SquantRange``, the released code's rule): one seeded uniform-noise batch (the ``data``
group; 256 images by default) through the weight-quantized model; each Conv/Linear input quantizer is
set and switched on as the pass reaches it. Non-negative input: alpha = k * std(positive entries),
range [0, alpha]; signed: alpha = k * std / 1.25, range [-alpha, alpha]; below 6 bits alpha is capped
at the observed maximum (x.max(), as the reference). k = 12 / 14 / 25 for 4 / 6 / 8 bits
(``method.k``); other bit-widths use ``method.k_other`` or fail with a one-line error.

Deviations from the reference, all recorded here:
- Grid: the protocol's weight grid. ``protocol=squant_paper`` sets ``w_range=minmax``: the channel's
  own [min, max], as the reference (tested against an independent reference of its quantizer, also on
  channels whose weights all share one sign). Other protocols widen the range to include 0 (differs
  from the reference only on such channels). We compute x = w / scale + zp where the reference
  multiplies by 1 / scale (can differ in the last float bit).
- Error sums (kernel and channel) and post-flip errors are computed in float64 from the exact float32
  errors; the reference sums in float32 in an unspecified order. Decisions can differ only where a
  float32 sum lands within float32 rounding of a .5 boundary or an integer.
- Equal priorities: broken by index (above). Seeded noise: the reference sets no seed.
- Activation std of fewer than two entries (e.g. an all-zero input) is undefined (NaN in the
  reference); we fall back to alpha = max |x| there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dfq_bench.config import MAX_BITS, MIN_BITS, ConfigError
from dfq_bench.core.grid import Grid
from dfq_bench.core.method import Method, QuantState
from dfq_bench.core.planner import LayerPlan

MODES = {  # mode -> (kernel stage, channel stage)
    "squant": (True, True),
    "squant-e": (False, False),
    "squant-k": (True, False),
    "squant-c": (False, True),
}
DEFAULT_K = {"4": 12.0, "6": 14.0, "8": 25.0}
CHUNK_ELEMS = 1 << 16  # weights per block of output channels: bounds temporaries, stays in cache


# ---------------------------------------------------------------------------------------------
# Weight flipping, vectorized over all kernels and channels of a block of output channels.
# Layouts: stage K works kernel-major, (k, R) with one column per kernel, so that per-kernel
# reductions and the sorting network are elementwise ops on long vectors; stage C alone works on
# (o, n) rows. torch.where on large tensors is slow on CPU, so the hot path uses arithmetic.
# ---------------------------------------------------------------------------------------------


def flip_levels(
    x: Tensor, qmin: int, qmax: int, kernel: bool = True, channel: bool = True, stats: dict | None = None
) -> Tensor:
    """SQuant's integer levels of the scaled weights ``x`` (see the module docstring).

    Args:
        x: scaled weights (``Grid.scaled(w)``), shape (out, in/groups, *kernel) or (out, in).
        qmin, qmax: the integer grid.
        kernel, channel: run stage K / stage C (K is skipped anyway when a kernel has one element).
        stats: if given, ``stats["changed"]`` is increased by the number of levels that differ
            from round-to-nearest.

    Returns:
        Levels as a tensor of x's dtype and shape, clamped to [qmin, qmax].
    """
    shape, out = x.shape, x.shape[0]
    x3 = x.detach().reshape(out, shape[1] if x.dim() > 1 else 1, -1)
    if x3.dtype not in (torch.float32, torch.float64):
        x3 = x3.float()
    levels = torch.empty_like(x3)
    step = max(1, CHUNK_ELEMS // max(x3[0].numel(), 1))
    changed = 0
    for lo in range(0, out, step):  # blocks of many channels; all work inside is vectorized
        xb = x3[lo : lo + step]
        block = _flip_block(xb, qmin, qmax, kernel, channel).clamp_(qmin, qmax)
        levels[lo : lo + step] = block
        if stats is not None:
            changed += int((block != torch.round(xb).clamp_(qmin, qmax)).sum())
    if stats is not None:
        stats["changed"] = stats.get("changed", 0) + changed
    return levels.reshape(shape).to(x.dtype)


def _flip_block(x: Tensor, qmin: int, qmax: int, do_k: bool, do_c: bool) -> Tensor:
    o, n_in, k = x.shape
    if do_k and k > 1:
        return _kernel_then_channel(x, qmin, qmax, do_c)
    rn = torch.round(x)
    if not do_c:
        return rn
    return _channel_only(x.reshape(o, -1), rn.reshape(o, -1), qmin, qmax).view(o, n_in, k)


def _direction(total: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Branch (up where the error sum < 0, else down), flip count round(|sum|), over-flipped flag."""
    up = total < 0
    a = total.abs()
    count = torch.round(a)
    return up, count.to(torch.int64), count >= a


def _priority(x: Tensor, e: Tensor, up: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """|e| where an element may move in its row's direction (up: e < 0 and x < qmax; down: e > 0
    and x > qmin), else 0; ``up`` broadcasts against x. Also returns the move (+1 up / -1 down).

    Exact: a movable element has |e| <= 0.5 <= its distance to the grid edge, so the minimum below
    returns |e| itself."""
    step = torch.where(up, 1.0, -1.0).to(x.dtype)
    edge = torch.where(up, float(qmax), float(-qmin)).to(x.dtype)
    away = (e * -step).clamp_(min=0)  # |e| if rounded against the move, else 0
    room = torch.addcmul(edge, x, -step).clamp_(min=0)  # qmax - x (up) or x - qmin (down)
    return torch.minimum(away, room), step


def _network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sorting network for n inputs (comparators (i, j), i < j)."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def _order_kernels(prio: Tensor, count: Tensor, cand_rank: Tensor) -> tuple[Tensor, Tensor]:
    """For each column of ``prio`` (k, R), in (priority desc, row asc) order: the mask of the first
    ``count`` elements, and the row of the element at ``cand_rank`` (shape (1, R)).

    float32: each priority's bits with its reversed row index appended form a unique int64 key, so
    a sorting network of elementwise max/min sorts every kernel at once, ties broken by index."""
    k = prio.shape[0]
    if prio.dtype != torch.float32:  # generic path (float64 tests): pairwise ranks
        rank = _ranks(prio)
        at = (rank == cand_rank).to(torch.uint8) * torch.arange(k, dtype=torch.uint8)[:, None]
        return rank < count, at.sum(0, dtype=torch.int64)[None]
    shift = max(1, (k - 1).bit_length())
    keys = (prio.view(torch.int32).long() << shift) | (k - 1 - torch.arange(k))[:, None]
    rows = list(keys.unbind(0))
    for i, j in _network(k):  # descending
        rows[i], rows[j] = torch.maximum(rows[i], rows[j]), torch.minimum(rows[i], rows[j])
    ordered = torch.stack(rows)
    last_in = ordered.gather(0, (count - 1).clamp(min=0)[None])
    last_in.masked_fill_((count == 0)[None], torch.iinfo(torch.int64).max)
    cand = (k - 1) - (ordered.gather(0, cand_rank[None]) & ((1 << shift) - 1))
    return keys >= last_in, cand


def _ranks(prio: Tensor) -> Tensor:
    """Rank of every element of each column of ``prio`` (k, R) in (priority desc, row asc) order."""
    k = prio.shape[0]
    rank = torch.zeros(prio.shape, dtype=torch.int32)
    for i in range(k - 1):
        behind = prio[i + 1 :] <= prio[i]  # rows after i that i precedes (ties: lower index first)
        rank[i + 1 :] += behind
        rank[i] += (~behind).sum(0, dtype=rank.dtype)
    return rank


def _kernel_then_channel(x: Tensor, qmin: int, qmax: int, do_c: bool) -> Tensor:
    """Stage K on a (o, n_in, k) block, in the kernel-major layout; then stage C if asked."""
    o, n_in, k = x.shape
    xt = x.permute(2, 0, 1).reshape(k, o * n_in)
    rn = torch.round(xt)
    e = rn - xt  # exact in float32 (|e| <= 0.5 next to an integer)
    s = e.sum(0, dtype=torch.float64)
    up, count, over = _direction(s)
    prio, step = _priority(xt, e, up, qmin, qmax)
    # The candidate for stage C: the last flipped element if over-flipped (rank k-1 when count == 0:
    # edge case 1), else the next one; an over-flipped kernel offers an un-flip (other direction).
    cand_rank = torch.where(over, torch.where(count > 0, count - 1, k - 1), count)
    flip, cand_k = _order_kernels(prio, count, cand_rank)
    moved = flip & (prio > 0)
    num = torch.addcmul(rn, moved.to(xt.dtype), step)
    if not do_c:
        return num.view(k, o, n_in).permute(1, 2, 0)
    # Each kernel's error sum after K, in float64: every move adds +-1; a handed-out element that
    # cannot move records error 0 instead of e (edge case 2).
    s_after = s + step.double() * moved.sum(0, dtype=torch.int32)
    handed = flip & ~moved
    if bool(handed.any()):
        s_after -= (e * handed).sum(0, dtype=torch.float64)
    e_c = e.gather(0, cand_k)[0]
    cand_moved = moved.gather(0, cand_k)[0]
    err_c = torch.where(cand_rank < count, cand_moved * step.double(), 0.0) + e_c.double()
    err_c = torch.where((cand_rank < count) & ~cand_moved, 0.0, err_c)
    cand_pr = err_c.abs().view(o, n_in)
    cand_up = (up ^ over).view(o, n_in)

    up_c, count_c, _ = _direction(s_after.view(o, n_in).sum(1))
    prio_c = torch.where(cand_up == up_c[:, None], cand_pr, 0.0)
    # One candidate per kernel, so kernel order is flat-index order among candidates.
    chosen = _first_k(prio_c, count_c)
    short = count_c > (prio_c > 0).sum(1)  # the order also hands out zero-priority elements
    chosen &= ~short[:, None]
    x_c, rn_c = xt.gather(0, cand_k)[0], rn.gather(0, cand_k)[0]
    up_ck = up_c.repeat_interleave(n_in)
    pr_c, step_c = _priority(x_c, rn_c - x_c, up_ck, qmin, qmax)
    target = rn_c + step_c * (pr_c > 0)  # the original-based neighbour, or rn if it cannot move
    num.scatter_(0, cand_k, torch.where(chosen.view(-1), target, num.gather(0, cand_k)[0])[None])
    levels = num.view(k, o, n_in).permute(1, 2, 0).contiguous()
    if bool(short.any()):  # rare: the first zero-priority elements by flat index also flip
        full = torch.zeros(int(short.sum()), n_in, k, dtype=prio_c.dtype)
        full.scatter_(2, cand_k[0].view(o, n_in)[short][..., None], prio_c[short][..., None])
        sel = _first_k(full.view(len(full), -1), count_c[short]).view(-1, n_in, k)
        xs = x[short]
        rns = torch.round(xs)
        pr_s, step_s = _priority(xs, rns - xs, up_c[short][:, None, None], qmin, qmax)
        levels[short] = torch.where(sel, rns + step_s * (pr_s > 0), levels[short])
    return levels


def _channel_only(x: Tensor, rn: Tensor, qmin: int, qmax: int) -> Tensor:
    """Stage C over all elements of each channel (K off, or 1-element kernels). Shapes (o, n)."""
    e = rn - x
    up, count, _ = _direction(e.sum(1, dtype=torch.float64))
    prio, step = _priority(x, e, up[:, None], qmin, qmax)
    return torch.addcmul(rn, (_first_k(prio, count) & (prio > 0)).to(x.dtype), step)


def _first_k(prio: Tensor, count: Tensor) -> Tensor:
    """Mask of the first ``count[r]`` elements of each row in (priority desc, index asc) order.

    Exact without sorting every row: the count-th largest value is the threshold; all larger
    elements are in, and the equal ones are taken in index order."""
    count = count.clamp(max=prio.shape[1])
    kmax = int(count.max()) if count.numel() else 0
    if kmax == 0:
        return torch.zeros_like(prio, dtype=torch.bool)
    top = prio.topk(kmax, dim=1, sorted=True).values
    thr = top.gather(1, (count - 1).clamp(min=0)[:, None])
    above = prio > thr
    tied = prio == thr
    if bool(tied.sum(1).le(1).all()):  # no tie at any threshold (the usual case)
        return (above | tied) & (count > 0)[:, None]
    need = count[:, None] - above.sum(1, keepdim=True)
    return (above | (tied & (tied.cumsum(1) <= need))) & (count > 0)[:, None]


# ---------------------------------------------------------------------------------------------
# Activation range rule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KTable:
    """k (in standard deviations) per activation bit-width, plus an optional value for the rest."""

    k: dict = field(default_factory=lambda: dict(DEFAULT_K))
    other: float | None = None

    def for_bits(self, bits: int) -> float:
        if str(bits) in self.k:
            return float(self.k[str(bits)])
        if self.other is not None:
            return float(self.other)
        raise ValueError(
            f"act_range 'squant' has no k for {bits}-bit activations; valid: bits "
            f"{', '.join(sorted(self.k, key=int))}, or set +method.k.{bits}=<k> or method.k_other=<k>"
        )


class SquantRange:
    """SQuant's activation range from the first batch (sequential: set during the pass)."""

    sequential = True

    def __init__(self, bits: int, protocol=None, k_table: KTable | None = None):
        self.bits = bits
        self.k = (k_table or KTable()).for_bits(bits)  # the method's table, or the defaults
        self.lo: float | None = None
        self.hi: float | None = None

    def update(self, x: Tensor) -> None:
        if self.hi is not None:  # the reference initializes once, from the first batch
            return
        x = x.detach()
        xmax = float(x.max())
        signed = bool(x.min() < 0)
        # std of all entries (signed) or of the positive ones, unbiased like torch.std, from float64
        # sums: no masked or float64 copy of a possibly huge activation batch.
        n = x.numel() if signed else int(torch.count_nonzero(x))
        s1 = float(x.sum(dtype=torch.float64))
        s2 = float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
        std = math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1)) if n > 1 else float("nan")
        alpha = self.k * std / 1.25 if signed else self.k * std
        if self.bits < 6:
            alpha = min(alpha, xmax)
        if not alpha > 0:  # NaN std (fewer than 2 entries) or a non-positive cap
            alpha = float(x.abs().max())
        self.lo, self.hi = (-alpha if signed else 0.0), alpha

    def range(self) -> tuple[float, float]:
        if self.hi is None:
            return float("inf"), float("-inf")
        return self.lo, self.hi


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class Squant(Method):
    name = "squant"
    version = "1"
    default_act_range = "squant"

    @dataclass
    class Config:
        name: str = "squant"
        mode: str = "squant"  # squant (K+C) | squant-e (= RTN) | squant-k | squant-c
        k: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_K))  # act bits -> k
        k_other: float | None = None  # k for activation bit-widths not in `k`

    @staticmethod
    def check_config(cfg) -> None:
        """Values the types cannot express; one-line ``ConfigError``."""
        if cfg.mode not in MODES:
            raise ConfigError(f"method.mode={cfg.mode!r} is invalid; valid: {', '.join(MODES)}")
        for bits, k in cfg.k.items():
            if not str(bits).isdigit() or not MIN_BITS <= int(bits) <= MAX_BITS or not k > 0:
                raise ConfigError(
                    f"method.k.{bits}={k!r} is invalid; valid: integer bits in {MIN_BITS}..{MAX_BITS} "
                    "mapped to k > 0"
                )
        if cfg.k_other is not None and not cfg.k_other > 0:
            raise ConfigError(f"method.k_other={cfg.k_other!r} is invalid; valid: a number > 0 or null")

    def __init__(self, cfg=None):
        super().__init__(cfg)  # checks it (check_config)
        cfg = self.cfg
        self.mode = cfg.mode
        self.kernel, self.channel = MODES[cfg.mode]
        self.k_table = KTable({str(b): float(v) for b, v in cfg.k.items()}, cfg.k_other)

    def prepare(self, state: QuantState) -> None:
        ctx = state.ctx
        if ctx.abits is not None and self.act_range(ctx) == "squant":  # fail before any work
            last = ctx.protocol.last_abits if ctx.protocol.last_abits is not None else ctx.abits
            for bits in {ctx.abits, last}:
                self.k_table.for_bits(bits)
        super().prepare(state)

    def round(self, state: QuantState) -> None:
        state.scratch["flips"] = {}
        super().round(state)
        stats = state.scratch["flips"]
        state.info["squant_flip_frac"] = stats.get("changed", 0) / max(stats.get("total", 0), 1)

    def round_weights(self, w: Tensor, grid: Grid, plan: LayerPlan | None, state: QuantState | None = None) -> Tensor:
        stats = state.scratch["flips"] if state is not None else {}
        levels = flip_levels(grid.scaled(w.detach()), grid.qmin, grid.qmax, self.kernel, self.channel, stats)
        stats["total"] = stats.get("total", 0) + levels.numel()
        return levels

    def rule_options(self, rule: str, state: QuantState) -> dict:
        return {"k_table": self.k_table} if rule == "squant" else {}
