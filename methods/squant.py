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
- Grid: the shared per-channel asymmetric grid (range widened to include 0, x = w / scale + zp). The
  reference uses the channel's [min, max] without widening (differs only for channels whose weights
  all share one sign) and multiplies by 1 / scale (can differ in the last float bit).
- Error sums (kernel and channel) and post-flip errors are computed in float64 from the exact float32
  errors; the reference sums in float32 in an unspecified order. Decisions can differ only where a
  float32 sum lands within float32 rounding of a .5 boundary or an integer.
- Equal priorities: broken by index (above). Seeded noise: the reference sets no seed.
- Activation std of fewer than two entries (e.g. an all-zero input) is undefined (NaN in the
  reference); we fall back to alpha = max |x| there.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dfq_bench.config import MAX_BITS, MIN_BITS, ConfigError
from dfq_bench.method import Method, QuantContext
from dfq_bench.quant import Grid, LayerPlan

MODES = {  # mode -> (kernel stage, channel stage)
    "squant": (True, True),
    "squant-e": (False, False),
    "squant-k": (True, False),
    "squant-c": (False, True),
}
DEFAULT_K = {"4": 12.0, "6": 14.0, "8": 25.0}
CHUNK_ELEMS = 1 << 18  # x elements per block of output channels: bounds temporaries, stays in cache


# ---------------------------------------------------------------------------------------------
# Weight flipping, vectorized over all kernels and channels of a block of output channels
# ---------------------------------------------------------------------------------------------


def flip_levels(x: Tensor, qmin: int, qmax: int, kernel: bool = True, channel: bool = True) -> Tensor:
    """SQuant's integer levels of the scaled weights ``x`` (see the module docstring).

    Args:
        x: scaled weights (``Grid.scaled(w)``), shape (out, in/groups, *kernel) or (out, in).
        qmin, qmax: the integer grid.
        kernel, channel: run stage K / stage C (K is skipped anyway when a kernel has one element).

    Returns:
        Levels as a tensor of x's dtype and shape, clamped to [qmin, qmax].
    """
    shape = x.shape
    out = x.shape[0]
    x3 = x.detach().reshape(out, shape[1] if x.dim() > 1 else 1, -1)
    if x3.dtype not in (torch.float32, torch.float64):
        x3 = x3.float()
    levels = torch.empty_like(x3)
    per_channel = x3[0].numel()
    step = max(1, CHUNK_ELEMS // max(per_channel, 1))
    for lo in range(0, out, step):  # blocks of many channels; all work inside is vectorized
        levels[lo : lo + step] = _flip_block(x3[lo : lo + step], qmin, qmax, kernel, channel)
    return levels.clamp_(qmin, qmax).reshape(shape).to(x.dtype)


def _flip_block(x: Tensor, qmin: int, qmax: int, do_k: bool, do_c: bool) -> Tensor:
    o, n_in, k = x.shape
    rn = torch.round(x)
    e = rn - x  # exact in float32 (|e| <= 0.5 next to an integer)
    up_ok = (e < 0) & (x < qmax)  # may move to rn + 1
    dn_ok = (e > 0) & (x > qmin)  # may move to rn - 1
    if not do_c and not (do_k and k > 1):
        return rn
    if do_k and k > 1:
        num, err, cand_k, cand_pr, cand_up = _kernel_stage(
            rn.view(-1, k), e.view(-1, k), up_ok.view(-1, k), dn_ok.view(-1, k)
        )
        if not do_c:
            return num.view(o, n_in, k)
        return _channel_stage_after_k(
            rn, up_ok, dn_ok, num.view(o, n_in, k), err.view(o, n_in, k),
            cand_k.view(o, n_in), cand_pr.view(o, n_in), cand_up.view(o, n_in),
        )
    return _channel_stage(rn.view(o, -1), e.view(o, -1), up_ok.view(o, -1), dn_ok.view(o, -1)).view(
        o, n_in, k
    )


def _direction(total: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Branch (up where the error sum < 0, else down), flip count round(|sum|), over-flipped flag."""
    up = total < 0
    a = total.abs()
    count = torch.round(a)
    return up, count.to(torch.int64), count >= a


def _kernel_stage(rn: Tensor, e: Tensor, up_ok: Tensor, dn_ok: Tensor):
    """Stage K on rows = kernels (R, k). Returns the levels, float64 errors after K, and each
    kernel's candidate for stage C: position in the kernel, priority, and whether it is an up flip."""
    k = e.shape[1]
    up, count, over = _direction(e.sum(1, dtype=torch.float64))
    ok = torch.where(up[:, None], up_ok, dn_ok)
    prio = e.abs() * ok  # > 0 exactly where the element may move in the kernel's direction
    order = torch.sort(prio, dim=1, descending=True, stable=True).indices  # ties: index ascending
    in_top = torch.arange(k)[None, :] < count[:, None]  # rank space
    flip = torch.zeros_like(ok).scatter_(1, order, in_top)
    sign = torch.where(up, 1.0, -1.0)[:, None]
    num = rn + (flip & ok) * sign
    e64 = e.double()
    err = torch.where(flip, torch.where(ok, e64 + sign, 0.0), e64)  # a handed-out non-mover: 0
    # The candidate's rank: the last flipped one if over-flipped (rank k-1 when count == 0, edge
    # case 1), else the next one.
    cand_rank = torch.where(over, (count - 1) % k, count)
    cand_k = order.gather(1, cand_rank[:, None])
    cand_pr = err.gather(1, cand_k).abs().squeeze(1)
    return num, err, cand_k.squeeze(1), cand_pr, up ^ over  # over-flipped: other direction


def _channel_stage_after_k(rn, up_ok, dn_ok, num, err, cand_k, cand_pr, cand_up) -> Tensor:
    """Stage C with one candidate per kernel. Shapes (o, n_in, k) and (o, n_in)."""
    o, n_in, k = num.shape
    up, count, _ = _direction(err.view(o, -1).sum(1))
    prio = torch.where(cand_up == up[:, None], cand_pr, 0.0)  # (o, n_in)
    # One candidate per kernel, so kernel order is flat-index order among candidates.
    chosen = _first_k(prio, count.clamp(max=n_in))
    sel = torch.zeros_like(up_ok).scatter_(2, cand_k[..., None], chosen[..., None])
    short = count > (prio > 0).sum(1)
    if bool(short.any()):  # the order hands out zero-priority elements: first ones by flat index
        full = torch.zeros(int(short.sum()), n_in, k, dtype=prio.dtype)
        full.scatter_(2, cand_k[short][..., None], prio[short][..., None])
        sel[short] = _first_k(full.view(len(full), -1), count[short]).view(-1, n_in, k)
    return _apply(rn, num, sel, up[:, None, None], up_ok, dn_ok)


def _channel_stage(rn: Tensor, e: Tensor, up_ok: Tensor, dn_ok: Tensor) -> Tensor:
    """Stage C over all elements of each channel (K off). Shapes (o, n)."""
    up, count, _ = _direction(e.sum(1, dtype=torch.float64))
    prio = e.abs() * torch.where(up[:, None], up_ok, dn_ok)
    return _apply(rn, rn, _first_k(prio, count), up[:, None], up_ok, dn_ok)


def _apply(rn, num, sel, up, up_ok, dn_ok) -> Tensor:
    """Selected elements take their original-based neighbour level in direction ``up`` (or rn)."""
    target = torch.where(up, rn + up_ok, rn - dn_ok.to(rn.dtype))
    return torch.where(sel, target, num)


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


# The method's table, visible to the rule only while that method quantizes (a context variable, so
# nothing leaks into later runs); another method using act_range=squant gets the defaults.
_K_TABLE: ContextVar[KTable | None] = ContextVar("squant_k_table", default=None)


class SquantRange:
    """SQuant's activation range from the first batch (sequential: set during the pass)."""

    sequential = True

    def __init__(self, bits: int, protocol=None):
        self.bits = bits
        self.k = (_K_TABLE.get() or KTable()).for_bits(bits)
        self.lo: float | None = None
        self.hi: float | None = None

    def update(self, x: Tensor) -> None:
        if self.hi is not None:  # the reference initializes once, from the first batch
            return
        x = x.detach().double()
        xmax = float(x.max())
        signed = bool(x.min() < 0)
        entries = x if signed else x[x > 0]
        std = float(entries.std()) if entries.numel() > 1 else float("nan")
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
        super().__init__(cfg)
        cfg = cfg if cfg is not None else self.Config()
        self.check_config(cfg)
        self.mode = cfg.mode
        self.kernel, self.channel = MODES[cfg.mode]
        self.k_table = KTable({str(b): float(v) for b, v in cfg.k.items()}, cfg.k_other)
        self._changed = self._total = 0

    def quantize(self, model: nn.Module, ctx: QuantContext) -> nn.Module:
        if ctx.abits is not None and self.act_range(ctx) == "squant":  # fail before any work
            last = ctx.protocol.last_abits if ctx.protocol.last_abits is not None else ctx.abits
            for bits in {ctx.abits, last}:
                self.k_table.for_bits(bits)
        self._changed = self._total = 0
        token = _K_TABLE.set(self.k_table)
        try:
            qmodel = super().quantize(model, ctx)
        finally:
            _K_TABLE.reset(token)
        ctx.info["squant_flip_frac"] = self._changed / max(self._total, 1)
        return qmodel

    def round_weights(self, w: Tensor, grid: Grid, plan: LayerPlan) -> Tensor:
        x = grid.scaled(w.detach())
        levels = flip_levels(x, grid.qmin, grid.qmax, self.kernel, self.channel)
        self._changed += int((levels != torch.clamp(torch.round(x), grid.qmin, grid.qmax)).sum())
        self._total += levels.numel()
        return levels
