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
- Device: the flips run on the CPU whatever the model's device (their per-kernel bookkeeping is numpy);
  weights on a GPU are copied there and the levels back. The reference flips on the GPU.
- Activation std of fewer than two entries (e.g. an all-zero input) is undefined (NaN in the
  reference); we fall back to alpha = max |x| there.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
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
CHUNK_ELEMS = 1 << 18  # weights per block of the elementwise passes: bounds temporaries, stays in cache


# ---------------------------------------------------------------------------------------------
# Weight flipping, vectorized over all kernels and channels of a layer.
#
# Fast path and exact fallback. The outcome of most kernels and channels follows from a few
# order statistics, without a full priority order: a kernel's K flips and C candidate from its
# one or two highest-priority elements (two max-reductions over priority keys), a channel's flips
# from its count-th largest priority (a threshold from numpy's partition, which is several times
# faster than torch.topk on CPU). A kernel or channel is "regular" where these decide exactly: the
# ranks that matter hold positive priorities and no tie crosses a selection boundary, and (stage K)
# at most the first two elements matter. The others (zero error sums, handed-out non-movers, ties
# at a boundary, three or more flips) go through the general code, which builds the full priority
# order. Both give the same levels; tests/test_squant.py checks them against a loop reference.
#
# Layouts: per-kernel reductions run kernel-major, (k, R) with one column per kernel, where they
# are fast reductions over dim 0; levels are written in the weight's own layout, moves as sparse
# scatters. torch.where, nonzero and boolean masks are slow on CPU, so the hot path avoids them;
# per-kernel and per-channel bookkeeping is in numpy. Blocks of the elementwise passes run on
# torch.get_num_threads() Python threads (``_map_blocks``); the layer-wide steps (general code,
# stage C) run once per layer.
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
    x3 = x.detach().cpu().reshape(out, shape[1] if x.dim() > 1 else 1, -1)  # numpy bookkeeping: on the CPU
    if x3.dtype not in (torch.float32, torch.float64):
        x3 = x3.float()
    levels = torch.empty_like(x3)
    if kernel and x3.shape[2] > 1:
        changed = _kernel_then_channel(x3, qmin, qmax, channel, levels)
    else:
        changed = _channel_stage(x3.reshape(out, -1), qmin, qmax, channel, levels.view(out, -1))
    if stats is not None:
        stats["changed"] = stats.get("changed", 0) + int(changed)
    return levels.reshape(shape).to(x.device, x.dtype)


def _map_blocks(fn, n: int, size: int) -> list:
    """[fn(lo) for lo in range(0, n, size)], the blocks shared among torch.get_num_threads()
    Python threads, torch single-threaded meanwhile (restored after). The blocks are independent
    and write disjoint slices; torch ops and numpy's array loops release the GIL. One thread per
    block instead of torch's parallel ops inside a block: fewer, larger units of work, and no
    barrier per op (which stalls whenever another process holds a core)."""
    starts = range(0, n, size)
    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1:
        return [fn(lo) for lo in starts]
    pool = _POOLS.get(workers) or _POOLS.setdefault(workers, ThreadPoolExecutor(workers, "squant"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return list(pool.map(fn, starts))
    finally:
        torch.set_num_threads(threads)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _in_span(x: Tensor, qmin: int, qmax: int) -> bool:
    """All of x in (qmin - 0.5, qmax + 0.5), as Grid.scaled gives: every rounding is a level, and so
    is every allowed move, so a count of moves is a count of changed levels and nothing needs a clamp."""
    return bool(x.amin() > qmin - 0.5) and bool(x.amax() < qmax + 0.5)


def _direction(total: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Branch (up where the error sum < 0, else down), flip count round(|sum|) (half to even, as a
    float), and the over-flipped flag (round(|sum|) >= |sum|)."""
    a = np.abs(total)
    count = np.rint(a)
    return total < 0, count, count >= a


def _move_priority(x, e, step, qmin: int, qmax: int, inplace: bool = False):
    """|e| where an element may move by ``step`` (+1 up: e < 0 and x < qmax; -1 down: e > 0 and
    x > qmin), <= 0 where it may not; ``step`` broadcasts against x. Tensors (``inplace``: in e's
    memory) or numpy arrays.

    min(-step * e, room to the grid edge): a movable element has |e| <= 0.5 <= its room, so the
    minimum is |e| itself; the others get -|e|, 0 or a negative room."""
    edge = step * ((qmax + qmin) / 2) + (qmax - qmin) / 2  # qmax (up) or -qmin (down)
    if isinstance(x, np.ndarray):
        return np.minimum(e * -step, edge - step * x)
    q = e.mul_(-step) if inplace else e * -step
    return torch.minimum(q, torch.addcmul(edge, x, -step), out=q)


def _priority(x: Tensor, e: Tensor, up: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """The priority clipped at 0 (general code) for directions ``up``, and the move (+1 / -1)."""
    step = up.to(x.dtype) * 2 - 1
    return _move_priority(x, e, step, qmin, qmax).clamp_(min=0), step


# ---------------------------------------------------------------------------------------------
# Stage K (then C) on k x k kernels
# ---------------------------------------------------------------------------------------------


def _kernel_then_channel(x: Tensor, qmin: int, qmax: int, do_c: bool, out: Tensor) -> int:
    """Stage K on x (o, n_in, k), then stage C if asked; writes the levels into ``out``, returns
    the number of levels that differ from round-to-nearest.

    Fast path, per regular kernel (``_fast_kernels``): its K flips and its C candidate follow from
    its first and second elements; C then moves only the candidate (+step: flip, -step: un-flip).
    The element passes run in cache-sized blocks of kernels; the per-kernel bookkeeping is in
    numpy arrays over the layer (numpy's small-array ops cost a fraction of torch's)."""
    o, n_in, k = x.shape
    r = o * n_in
    x2, out2 = x.reshape(r, k), out.view(r, k)
    fast = x.dtype == torch.float32 and k <= 16  # the keys' low bits hold the row (float64: general code)
    kern = _KernelInfo(r, fast)
    cols = max(1, CHUNK_ELEMS // k)

    def block(lo: int) -> tuple[int, float, float]:
        xb, ob = x2[lo : lo + cols], out2[lo : lo + cols]
        torch.round(xb, out=ob)
        xt = _kernel_major(xb)
        e = torch.round(xt).sub_(xt)  # exact in float32 (|e| <= 0.5 next to an integer)
        s = kern.s[lo : lo + cols]
        s[:] = e.sum(0, dtype=torch.float64).numpy()
        if fast:  # (reuses e's memory)
            return _fast_kernels(xt, e, s, qmin, qmax, kern, lo, ob)
        up, _, over = _direction(s)
        kern.cand_up[lo : lo + cols] = up ^ over
        return 0, math.inf, -math.inf

    changes, lows, highs = zip(*_map_blocks(block, r, cols), strict=True)
    changed = sum(changes)
    exact_count = (min(lows) > qmin - 0.5 and max(highs) < qmax + 0.5) if fast else _in_span(x2, qmin, qmax)

    irr = np.flatnonzero(~kern.regular)
    if len(irr):
        xg = np.ascontiguousarray(x2.numpy()[irr].T)
        s_irr = kern.s[irr]
        g_num, kern.s_after[irr], kern.cand_pr[irr], cand_k, g_target = _kernels_general(
            xg, s_irr, *_direction(s_irr), qmin, qmax)
        kern.cand_row[irr] = cand_k

    short = None
    if do_c:
        up_c, count_c, _ = _direction(torch.from_numpy(kern.s_after).view(o, n_in).sum(1).numpy())
        prio_c = kern.cand_pr.reshape(o, n_in) * (kern.cand_up.reshape(o, n_in) == up_c[:, None])
        chosen, short = _choose(prio_c, count_c)
        chosen = chosen.reshape(-1)
        at = np.flatnonzero(chosen & kern.regular)  # there C moves the candidate: flip or un-flip
        up, _, over = _direction(kern.s[at])
        flip = ~over
        out2.view(-1).numpy()[at * k + kern.cand_row[at]] += np.where(flip ^ up, -1.0, 1.0)
        changed += int(2 * flip.sum()) - len(at)  # a flip adds a changed level, an un-flip removes one
    if len(irr):  # the others: their K levels, and stage C's level for a chosen candidate
        if do_c:
            pick = np.flatnonzero(chosen[irr])
            g_num[cand_k[pick], pick] = g_target[pick]
        np.clip(g_num, qmin, qmax, out=g_num)
        changed += int((g_num != np.clip(np.rint(xg), qmin, qmax)).sum())
        out2.numpy()[irr] = g_num.T
    if not exact_count:
        out2.clamp_(qmin, qmax)
    if short is not None and short.any():
        # rare: the channel order hands out zero-priority elements; there the first elements of the
        # whole channel by (priority desc, flat index asc) flip, from their original rounding
        sh = torch.from_numpy(np.flatnonzero(short))
        xs = x[sh]
        rns = torch.round(xs)
        before = int((out[sh] != rns.clamp(qmin, qmax)).sum())
        prio_s = torch.from_numpy(prio_c)[sh]
        full = torch.zeros(len(sh), n_in, k, dtype=prio_s.dtype)
        full.scatter_(2, torch.from_numpy(kern.cand_row.astype(np.int64).reshape(o, n_in, 1))[sh], prio_s[..., None])
        sel = _first_k(full.view(len(sh), -1), torch.from_numpy(count_c).long()[sh]).view(-1, n_in, k)
        pr_s, step_s = _priority(xs, rns - xs, torch.from_numpy(up_c)[sh][:, None, None], qmin, qmax)
        levels = torch.where(sel, rns + step_s * (pr_s > 0), out[sh]).clamp_(qmin, qmax)
        out[sh] = levels
        changed += int((levels != rns.clamp_(qmin, qmax)).sum()) - before
    if not exact_count:  # a move from an out-of-grid rounding may not change the clamped level
        changed = int((out2 != torch.round(x2).clamp_(qmin, qmax)).sum())
    return changed


class _KernelInfo:
    """Per-kernel results over a layer (numpy arrays of length R): the error sum s; regular (the
    fast path's); after stage K: the error sum, the candidate's priority, direction (up) and row."""

    def __init__(self, r: int, fast: bool):
        self.s = np.empty(r)
        self.regular = np.empty(r, dtype=bool) if fast else np.zeros(r, dtype=bool)
        self.s_after = np.empty(r)
        self.cand_pr = np.empty(r)
        self.cand_up = np.empty(r, dtype=bool)
        self.cand_row = np.empty(r, dtype=np.int32)


KEY_BASE = 111 << 23  # float32 bits of 2**-16: smaller priorities share the lowest key class
KEY_TOP = 126 << 23  # float32 bits of 0.5, the largest priority


def _fast_kernels(xt: Tensor, e: Tensor, s: np.ndarray, qmin: int, qmax: int, kern: _KernelInfo,
                  lo: int, out: Tensor) -> tuple[int, float, float]:
    """Stage K on a block of float32 kernels (k, m) in kernel-major layout: fills ``kern`` at
    [lo, lo + m) and applies the K moves of the regular kernels to their levels ``out`` (m, k).
    Returns the number of moves and the smallest and largest value of the block.

    A kernel is regular when its outcome depends on its first two elements only: s != 0, at most
    the first two ranks matter (count 0 or 1 under-flipped, count 1 or 2 over-flipped), those hold
    priority > 2**-16, and all its values lie in [qmin, qmax]. There the signed priority
    q = -step * e is the priority of every movable element, and <= 0 for the others (an element
    rounded toward the move; no element is beyond the grid edge). Keys: q's float bits (monotone
    for q > 0), offset and clipped at KEY_BASE, then the reversed row in the low bits: unique per
    kernel, ordered like (priority desc, row asc) above the clipped class. Two max-reductions, the
    first's element masked out in between, give the first two elements."""
    k, m = xt.shape
    shift = (k - 1).bit_length()
    low = (1 << shift) - 1
    up, count, over = _direction(s)
    step = up * np.float32(2) - 1  # +1 up, -1 down
    # The candidate's rank: the last flipped element if over-flipped, else the next one (-1: s == 0).
    rank = count.astype(np.int8) - over
    second = rank == 1
    keys = e.mul_(torch.from_numpy(-step)).view(torch.int32).clamp_(KEY_BASE, KEY_TOP).sub_(KEY_BASE)
    keys.bitwise_left_shift_(shift).bitwise_or_(torch.arange(k - 1, -1, -1, dtype=torch.int32)[:, None])
    first = keys.amax(0).numpy()
    row0 = (k - 1) - (first & low)
    need = np.flatnonzero(second)  # the second element matters there only
    keys.numpy().reshape(-1)[row0[need] * np.int64(m) + need] = -1
    nxt = keys.amax(0).numpy()  # the second element where needed
    row1 = (k - 1) - (nxt & low)
    cand_key = first + (nxt - first) * second
    col_lo, col_hi = xt.amin(0).numpy(), xt.amax(0).numpy()
    sl = slice(lo, lo + m)
    regular = kern.regular[sl]
    np.greater_equal(col_lo, qmin, out=regular)
    regular &= (col_hi <= qmax) & (rank >= 0) & (rank <= 1) & (cand_key > low)  # those ranks: priority > 0
    np.subtract(s, np.copysign(count, s), out=kern.s_after[sl])  # every flip moves
    # the candidate's priority: |e| (flip) or |e + step| = 1 - |e| in float64 (un-flip)
    pr = kern.cand_pr[sl]
    np.abs(np.subtract(over, ((cand_key >> shift) + KEY_BASE).view(np.float32), out=pr, dtype=np.float64), out=pr)
    np.logical_xor(up, over, out=kern.cand_up[sl])  # an over-flipped kernel offers an un-flip
    kern.cand_row[sl] = row0 + (row1 - row0) * second
    # K moves, as sparse adds: the first element where count >= 1, the second where count == 2
    one, two = np.flatnonzero(regular & (count >= 1)), np.flatnonzero(regular & (count >= 2))
    at = np.concatenate([one * k + row0[one], two * k + row1[two]])
    out.view(-1).scatter_add_(0, torch.from_numpy(at), torch.from_numpy(step[np.concatenate([one, two])]))
    return len(at), float(col_lo.min()), float(col_hi.max())


def _kernel_major(xb: Tensor) -> Tensor:
    """(m, k) -> contiguous (k, m); as a 4-d copy, which torch runs as a fast blocked transpose."""
    m, k = xb.shape
    xt = torch.empty((k, m), dtype=xb.dtype)
    xt.view(1, k, m, 1).copy_(xb.reshape(1, m, k, 1).permute(0, 2, 1, 3))
    return xt


def _reversed_rows(k: int) -> Tensor:
    """(k, 1) float64 column k-1, ..., 0: the low bits of a priority key (lower row, larger key)."""
    return torch.arange(k - 1, -1, -1, dtype=torch.float64)[:, None]


def _kernels_general(xt: np.ndarray, s: np.ndarray, up: np.ndarray, count: np.ndarray, over: np.ndarray,
                     qmin: int, qmax: int):
    """Stage K by the full priority order on kernels (k, m) that the fast path does not cover
    (numpy: these are few, and numpy's small-array ops cost a fraction of torch's).

    Returns the K levels (k, m), the error sums after K, the candidates' stage-C priorities and
    rows, and the level a candidate takes if stage C flips it."""
    k, m = xt.shape
    cols = np.arange(m)
    rn = np.rint(xt)  # half to even, as torch.round
    e = rn - xt
    step = up * xt.dtype.type(2) - 1
    prio = np.maximum(_move_priority(xt, e, step, qmin, qmax), 0)
    count = count.astype(np.int64)
    # The candidate for stage C: the last flipped element if over-flipped (rank k-1 when count == 0:
    # edge case 1), else the next one.
    cand_rank = np.where(over, np.where(count > 0, count - 1, k - 1), count)
    rank = _ranks(prio)
    flip = rank < count
    cand_k = ((rank == cand_rank) * np.arange(k)[:, None]).sum(0)
    moved = flip & (prio > 0)
    num = rn + moved * step
    # Each kernel's error sum after K, in float64: every move adds +-1; a handed-out element that
    # cannot move records error 0 instead of e (edge case 2).
    s_after = s + step.astype(np.float64) * moved.sum(0)
    handed = flip & ~moved
    if handed.any():
        s_after -= torch.from_numpy(e * handed).sum(0, dtype=torch.float64).numpy()
    e_c, cand_moved = e[cand_k, cols].astype(np.float64), moved[cand_k, cols]
    err_c = np.where(cand_rank < count, cand_moved * step.astype(np.float64), 0.0) + e_c
    err_c = np.where((cand_rank < count) & ~cand_moved, 0.0, err_c)
    # Stage C moves a candidate from its ORIGINAL rounding, in the candidate's direction (so an
    # un-flip returns to rn), or keeps rn where that move is not allowed.
    x_c, rn_c = xt[cand_k, cols], rn[cand_k, cols]
    step_c = (up ^ over) * xt.dtype.type(2) - 1
    target = rn_c + step_c * (_move_priority(x_c, rn_c - x_c, step_c, qmin, qmax) > 0)
    return num, s_after, np.abs(err_c), cand_k, target


def _ranks(prio: np.ndarray) -> np.ndarray:
    """Rank of every element of each column of ``prio`` (k, R) in (priority desc, row asc) order."""
    k = prio.shape[0]
    rank = np.zeros(prio.shape, dtype=np.int32)
    for i in range(k - 1):
        behind = prio[i + 1 :] <= prio[i]  # rows after i that i precedes (ties: lower index first)
        rank[i + 1 :] += behind
        rank[i] += (~behind).sum(0, dtype=np.int32)
    return rank


# ---------------------------------------------------------------------------------------------
# Stage C alone (K off, or one-element kernels), and the per-row selections
# ---------------------------------------------------------------------------------------------


def _channel_stage(x: Tensor, qmin: int, qmax: int, do_c: bool, out: Tensor) -> int:
    """Round (and stage C over all elements of each channel) on x (o, n), in blocks of channels;
    writes the levels into ``out`` and returns the number of levels that differ from rounding."""
    rows = max(1, CHUNK_ELEMS // max(x.shape[1], 1))

    def block(lo: int) -> int:
        xb, num = x[lo : lo + rows], out[lo : lo + rows]
        torch.round(xb, out=num)
        if do_c:
            return _channel_only(xb, num, qmin, qmax)
        num.clamp_(qmin, qmax)
        return 0

    return sum(_map_blocks(block, len(x), rows))


def _channel_only(x: Tensor, num: Tensor, qmin: int, qmax: int) -> int:
    """Stage C on a block x (o, n) whose rounding is in ``num``; moves ``num`` in place (clamped)
    and returns the number of changed levels.

    Fast path, per regular channel: the priorities' count-th largest value is a threshold (no tie
    across it, positive), the elements at or above it move."""
    o, n = x.shape
    e = num - x
    s = e.sum(1, dtype=torch.float64).numpy()
    up, count, _ = _direction(s)
    step = -np.sign(s).astype(np.float32)  # +1 up, -1 down; 0 where s == 0 (count 0: no move)
    q = _move_priority(x, e, torch.from_numpy(step)[:, None], qmin, qmax, inplace=True).numpy()
    thr, ok = _thresholds(q, count)
    at = np.flatnonzero(q >= thr[:, None])  # thr = inf: none
    flat = num.view(-1).numpy()
    rn = flat[at]
    flat[at] = rn + step[at // n]
    # A move is a changed level unless it starts from an out-of-grid rounding (then it ends on the
    # level the clamp gives that rounding).
    changed = len(at) - int(((rn < qmin) | (rn > qmax)).sum())
    bad = np.flatnonzero(~ok)
    if len(bad):  # the general code: the full order of each such channel
        rows = torch.from_numpy(bad)
        xs = x[rows]
        rns = torch.round(xs)
        prio, step_s = _priority(xs, rns - xs, torch.from_numpy(up[bad])[:, None], qmin, qmax)
        moved = _first_k(prio, torch.from_numpy(count[bad]).long()) & (prio > 0)
        levels = torch.addcmul(rns, moved.to(x.dtype), step_s).clamp_(qmin, qmax)
        num[rows] = levels
        changed += int((levels != rns.clamp_(qmin, qmax)).sum())
    num.clamp_(qmin, qmax)
    return changed


def _thresholds(prio: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``prio`` (o, n): the count-th largest value, and whether the first ``count``
    elements in (priority desc, index asc) order are exactly those at or above it with priority
    > 0 (count 0, or that value is positive and larger than the next). The threshold is +inf
    where count is 0 or the row is not exact. numpy's partition: several times faster than
    torch.topk on CPU."""
    o, n = prio.shape
    c = count.astype(np.int64)
    thr = np.full(o, np.inf, dtype=prio.dtype)
    cmax = int(c.max()) if o else 0
    if cmax == 0:
        return thr, np.ones(o, dtype=bool)
    m = min(cmax + 1, n)
    top = np.sort(np.partition(prio, n - m, axis=1)[:, n - m :], axis=1)  # the m largest, ascending
    rows = np.arange(o)
    last = top[rows, np.clip(m - c, 0, m - 1)]  # the c-th largest
    after = top[rows, np.clip(m - 1 - c, 0, None)]
    ok = (c == 0) | ((c <= n) & (last > 0) & ((c == n) | (last > after)))
    use = ok & (c > 0)
    thr[use] = last[use]
    return thr, ok


def _choose(prio: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stage C's flipped candidates (o, n) and the rows whose order also hands out zero-priority
    elements ("short": count > number of positive priorities; none chosen there)."""
    thr, ok = _thresholds(prio, count)
    chosen = prio >= thr[:, None]
    short = np.zeros(len(prio), dtype=bool)
    bad = np.flatnonzero(~ok)
    if len(bad):
        pb, cb = torch.from_numpy(prio[bad]), torch.from_numpy(count[bad]).long()
        sh = cb > (pb > 0).sum(1)
        chosen[bad] = (_first_k(pb, cb) & ~sh[:, None]).numpy()
        short[bad] = sh.numpy()
    return chosen, short


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
