"""SQuant: the vectorized flips against an independent loop-per-kernel reference written here from
shared/docs/methods.md, the paper's invariants, hand-worked edge cases, the activation rule, and
whole-model determinism."""

from __future__ import annotations

import math

import pytest
import torch
from dfq_bench.methods.rtn import RTN
from dfq_bench.methods.squant import KTable, Squant, SquantRange, flip_levels
from helpers import compose_cfg, protocol, quant_ctx
from omegaconf import OmegaConf
from torch import nn

from dfq_bench.config import ConfigError, validate_config
from dfq_bench.core.grid import weight_grid
from dfq_bench.core.method import QuantContext
from dfq_bench.core.modules import quant_layers
from dfq_bench.models.test_cnn import make_test_cnn
from dfq_bench.run.runner import run

MODES = {"squant": (True, True), "squant-e": (False, False), "squant-k": (True, False), "squant-c": (False, True)}


# ---------------------------------------------------------------------------------------------
# The oracle: one output channel at a time, one kernel at a time, plain Python floats and lists.
# ---------------------------------------------------------------------------------------------


def reference_levels(x, qmin, qmax, kernel=True, channel=True, stats=None):
    """SQuant's flips as methods.md describes them, with ties broken by (priority desc, index asc).

    ``stats`` (a dict) counts how often the edge cases fired, so tests can check they are covered.
    """
    n_out = x.shape[0]
    n_in = x.shape[1] if x.dim() > 1 else 1
    rows = x.detach().double().reshape(n_out, n_in, -1).tolist()
    k = len(rows[0][0])
    stats = stats if stats is not None else {}
    for key in ("k_zero_sum", "k_handout", "c_handout"):
        stats.setdefault(key, 0)
    out = []
    for oc in range(n_out):
        xs = [v for kern in rows[oc] for v in kern]
        n = len(xs)
        rn = [float(round(v)) for v in xs]  # Python rounds half to even, like torch.round
        e = [r - v for r, v in zip(rn, xs, strict=True)]
        can_up = [e[i] < 0 and xs[i] < qmax for i in range(n)]
        can_dn = [e[i] > 0 and xs[i] > qmin for i in range(n)]
        # Per direction: the level and error an element gets when the order hands it out, and its
        # priority. An element that cannot move keeps rn and records error 0.
        up = {"num": [rn[i] + 1 if can_up[i] else rn[i] for i in range(n)],
              "err": [e[i] + 1 if can_up[i] else 0.0 for i in range(n)],
              "pr": [abs(e[i]) if can_up[i] else 0.0 for i in range(n)]}
        dn = {"num": [rn[i] - 1 if can_dn[i] else rn[i] for i in range(n)],
              "err": [e[i] - 1 if can_dn[i] else 0.0 for i in range(n)],
              "pr": [abs(e[i]) if can_dn[i] else 0.0 for i in range(n)]}
        num, err = list(rn), list(e)
        if kernel and k > 1:
            cand_up, cand_dn = [0.0] * n, [0.0] * n  # stage C priorities: one candidate per kernel
            for ic in range(n_in):
                idx = list(range(ic * k, (ic + 1) * k))
                s = math.fsum(err[i] for i in idx)
                d, same, other = (up, cand_up, cand_dn) if s < 0 else (dn, cand_dn, cand_up)
                t = round(abs(s))
                over = t >= abs(s)
                order = sorted(idx, key=lambda i, d=d: (-d["pr"][i], i))
                for i in order[:t]:
                    if d["pr"][i] == 0.0:
                        stats["k_handout"] += 1
                    num[i], err[i] = d["num"][i], d["err"][i]
                if over:
                    if t == 0:
                        stats["k_zero_sum"] += 1
                    c = order[t - 1]  # t == 0: the last element of the order (edge case 1)
                    other[c] = abs(err[c])
                else:
                    c = order[t]
                    same[c] = abs(err[c])
            pr_up, pr_dn = cand_up, cand_dn
        else:
            pr_up, pr_dn = up["pr"], dn["pr"]
        if channel:
            s = math.fsum(err)
            d, pr = (up, pr_up) if s < 0 else (dn, pr_dn)
            t = round(abs(s))
            order = sorted(range(n), key=lambda i: (-pr[i], i))
            for i in order[:t]:
                if pr[i] == 0.0:
                    stats["c_handout"] += 1
                num[i] = d["num"][i]
        out.append([min(max(v, qmin), qmax) for v in num])
    return torch.tensor(out, dtype=x.dtype).reshape(x.shape)


def qrange(bits):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def tricky_x(shape, bits, seed):
    """Scaled weights full of the cases that matter: exact .5 ties, integers (zero-sum kernels),
    values just outside the grid (cannot move outward: reference edge case 2), and plain values."""
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange(bits)
    x = torch.rand(shape, generator=g) * (qmax - qmin + 1) + (qmin - 0.5)  # [qmin-.5, qmax+.5)
    r = torch.rand(shape, generator=g)
    halves = torch.randint(qmin, qmax, shape, generator=g) + 0.5
    ints = torch.randint(qmin, qmax + 1, shape, generator=g).float()
    quarters = torch.randint(4 * qmin, 4 * qmax + 1, shape, generator=g) / 4.0
    x = torch.where(r < 0.15, halves, x)
    x = torch.where((r >= 0.15) & (r < 0.25), ints, x)
    x = torch.where((r >= 0.25) & (r < 0.4), quarters, x)
    if len(shape) > 1:  # whole kernels of integers (sum exactly 0) and of out-of-grid values
        flat = x.reshape(shape[0], shape[1], -1)
        pick = torch.rand(shape[0], shape[1], generator=g)
        flat[pick < 0.1] = torch.randint(qmin, qmax + 1, flat[pick < 0.1].shape, generator=g).float()
        high = qmax + 0.125 + 0.25 * torch.rand(flat[pick > 0.93].shape, generator=g)
        flat[pick > 0.93] = high
        whole = torch.rand(shape[0], generator=g) < 0.2  # whole channels just above the grid
        flat[whole] = qmax + 0.125 + 0.25 * torch.rand(flat[whole].shape, generator=g)
    return x


SHAPES = {
    "3x3": (6, 5, 3, 3),
    "5x5": (4, 3, 5, 5),
    "7x7": (3, 3, 7, 7),
    "1x1": (7, 9, 1, 1),
    "linear": (6, 17),
    "depthwise": (8, 1, 3, 3),
    "1x3": (5, 4, 1, 3),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_vectorized_equals_loop_reference_on_tricky_values(shape, bits, mode):
    kernel, channel = MODES[mode]
    qmin, qmax = qrange(bits)
    for seed in range(2):
        x = tricky_x(SHAPES[shape], bits, seed=1000 * bits + seed)
        got = flip_levels(x, qmin, qmax, kernel, channel)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert torch.equal(got, reference_levels(x, qmin, qmax, kernel, channel))


@pytest.mark.parametrize("mode", list(MODES))
def test_negative_zero_priority_keeps_the_index_tie_rule(mode):
    """A case the int64-key sorting network got wrong (a -0.0 priority ranked below +0.0)."""
    kernel, channel = MODES[mode]
    qmin, qmax = qrange(2)
    x = tricky_x((20, 10, 1, 3), 2, seed=3)
    assert torch.equal(flip_levels(x, qmin, qmax, kernel, channel), reference_levels(x, qmin, qmax, kernel, channel))


def test_tricky_values_cover_every_edge_case():
    stats, stats_c = {}, {}
    for bits in (2, 3, 4):
        for seed in range(3):
            x = tricky_x((6, 8, 3, 3), bits, seed)
            reference_levels(x, *qrange(bits), True, True, stats)
            reference_levels(x, *qrange(bits), False, True, stats_c)
    assert stats["k_zero_sum"] > 0 and stats["k_handout"] > 0 and stats["c_handout"] > 0
    assert stats_c["c_handout"] > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("mode", list(MODES))
def test_vectorized_equals_loop_reference_on_gaussian_weights(bits, mode):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(8, 6, 3, 3, generator=g) * torch.rand(8, 1, 1, 1, generator=g)
    grid = weight_grid(w, bits, per_channel=True, symmetric=False)
    x = grid.scaled(w)
    kernel, channel = MODES[mode]
    assert torch.equal(flip_levels(x, grid.qmin, grid.qmax, kernel, channel),
                       reference_levels(x, grid.qmin, grid.qmax, kernel, channel))


@pytest.mark.parametrize("groups", [1, 2, 4, 16])
def test_grouped_and_depthwise_convs_through_the_method(groups):
    torch.manual_seed(groups)
    conv = nn.Conv2d(16, 16, 3, groups=groups)
    w = conv.weight.detach()
    assert w.shape == (16, 16 // groups, 3, 3)
    grid = weight_grid(w, 4, per_channel=True, symmetric=False)
    got = Squant(Squant.Config()).round_weights(w, grid, None)
    assert torch.equal(got, reference_levels(grid.scaled(w), grid.qmin, grid.qmax))


def test_float64_weights_keep_their_dtype_and_match():
    x = tricky_x((4, 3, 3, 3), 4, seed=7).double() + 1e-9
    got = flip_levels(x, -8, 7)
    assert got.dtype == torch.float64 and torch.equal(got, reference_levels(x, -8, 7))


def test_chunked_blocks_equal_one_block(monkeypatch):
    import dfq_bench.methods.squant as sq

    x = tricky_x((40, 8, 3, 3), 3, seed=3)
    whole = flip_levels(x, *qrange(3))
    monkeypatch.setattr(sq, "CHUNK_ELEMS", 100)  # 1 channel (72 elements) per block
    assert torch.equal(flip_levels(x, *qrange(3)), whole)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_vectorized_equals_loop_reference_big_sweep(bits):
    qmin, qmax = qrange(bits)
    shapes = [(32, 16, 3, 3), (16, 8, 5, 5), (16, 3, 7, 7), (48, 1, 3, 3), (32, 64, 1, 1), (20, 300),
              (16, 4, 3, 1)]
    for i, shape in enumerate(shapes):
        for mode, (kernel, channel) in MODES.items():
            x = tricky_x(shape, bits, seed=i)
            assert torch.equal(flip_levels(x, qmin, qmax, kernel, channel),
                               reference_levels(x, qmin, qmax, kernel, channel)), (shape, mode)
            w = torch.randn(shape, generator=torch.Generator().manual_seed(i))
            grid = weight_grid(w, bits, per_channel=True, symmetric=False)
            xs = grid.scaled(w)
            assert torch.equal(flip_levels(xs, qmin, qmax, kernel, channel),
                               reference_levels(xs, qmin, qmax, kernel, channel)), (shape, mode)


# ---------------------------------------------------------------------------------------------
# Hand-worked examples of the two bookkeeping edge cases and of the tie rule
# ---------------------------------------------------------------------------------------------


def test_hand_example_zero_sum_kernel_candidate_and_index_tie_break():
    # One channel, four 1x2 kernels (dyadic values, so every sum and priority is exact):
    # A [0.25, -0.25]: e = [-.25, .25], s = 0 -> "down", 0 flips, over-flipped: the LAST of its down
    #   order (A0, down priority 0) becomes an UP candidate with priority .25 (edge case 1).
    # B [1.25, 2.125]: s = -.375 -> 0 flips, next up element B0 (.25) is the candidate.
    # C [3.25, 2.75]: s = 0 like A -> up candidate C0 (.25).
    # D [4.25, 5.25]: s = -.5 -> round half to even = 0 flips; candidate D0 (.25, index tie).
    # Channel: S = -.875 -> 1 up flip among four .25 candidates: the lowest index, A0 -> 1.
    x = torch.tensor([[[0.25, -0.25], [1.25, 2.125], [3.25, 2.75], [4.25, 5.25]]])
    expected = torch.tensor([[[1.0, 0.0], [1.0, 2.0], [3.0, 3.0], [4.0, 5.0]]])
    assert torch.equal(flip_levels(x, -8, 7), expected)
    assert torch.equal(reference_levels(x, -8, 7), expected)


def test_hand_example_handed_out_non_mover_records_zero_error():
    # 2-bit grid [-2, 1]. Kernel 1 [1.375, 1.25, 1, 1]: e = [-.375, -.25, 0, 0], s = -.625 -> 1 up
    # flip, but nothing may move up (x >= qmax): the order hands out element 0, which keeps level 1
    # and records error 0 (edge case 2), so the kernel's sum becomes -.25 instead of -.625.
    # Kernel 2 [-.375, .5, 0, 0]: e = [.375, -.5, 0, 0], s = -.125, candidate .5 (x = .5, up).
    # Channel: S = -.25 - .125 = -.375 -> no flip; had the error been kept, S = -.75 -> 1 flip.
    x = torch.tensor([[[1.375, 1.25, 1.0, 1.0], [-0.375, 0.5, 0.0, 0.0]]])
    expected = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    assert torch.equal(flip_levels(x, -2, 1), expected)
    assert torch.equal(reference_levels(x, -2, 1), expected)


# ---------------------------------------------------------------------------------------------
# Invariants (methods.md) on N(0, 1) weights, 64x32x3x3, W4
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_w4():
    w = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0))
    grid = weight_grid(w, 4, per_channel=True, symmetric=False)
    return grid.scaled(w), grid


def test_invariants_kernel_stage_alone(gaussian_w4):
    x, grid = gaussian_w4
    q = flip_levels(x, grid.qmin, grid.qmax, kernel=True, channel=False)
    assert (q - x).double().sum((2, 3)).abs().max() <= 0.5
    assert (q - x).double().sum((2, 3)).abs().max() > 0.45  # the bound is tight, not vacuous


def test_invariants_full_squant(gaussian_w4):
    x, grid = gaussian_w4
    rtn = torch.clamp(torch.round(x), grid.qmin, grid.qmax)
    q = flip_levels(x, grid.qmin, grid.qmax)
    per_channel = (q - x).double().flatten(1).sum(1).abs()
    assert per_channel.max() <= 0.5
    assert (rtn - x).double().flatten(1).sum(1).abs().max() > 2.0  # RTN's channel sums are large
    assert (q - rtn).abs().max() == 1.0  # every level within one grid step of RTN
    changed = float((q != rtn).float().mean())
    assert 0.05 <= changed <= 0.09, changed  # "about 7%"
    assert ((q >= grid.qmin) & (q <= grid.qmax)).all() and torch.equal(q, torch.round(q))
    for c in range(q.shape[0]):
        assert len(torch.unique(q[c])) <= 16


def test_squant_e_equals_rtn_levels(gaussian_w4):
    x, grid = gaussian_w4
    assert torch.equal(flip_levels(x, grid.qmin, grid.qmax, False, False),
                       torch.clamp(torch.round(x), grid.qmin, grid.qmax))


# ---------------------------------------------------------------------------------------------
# Whole model through the method
# ---------------------------------------------------------------------------------------------


def ctx_for(abits=None, calib=None, **proto):
    return quant_ctx(4, abits, torch.zeros(2, 3, 16, 16), calib, **proto)


def method_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(Squant.Config), kw)


def weights_of(qmodel):
    return {n: m.layer.weight.detach().clone() for n, m in quant_layers(qmodel).items()}


@pytest.mark.parametrize("fold_bn", [True, False])
def test_squant_e_equals_rtn_on_a_whole_model(fold_bn):
    model = make_test_cnn(seed=1)
    calib = [torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))]
    q_rtn = RTN().quantize(model, ctx_for(4, calib, fold_bn=fold_bn, act_range="minmax"))
    q_e = Squant(method_cfg(mode="squant-e")).quantize(
        model, ctx_for(4, calib, fold_bn=fold_bn, act_range="minmax"))
    a, b = weights_of(q_rtn), weights_of(q_e)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(q_rtn(x), q_e(x))
    q_full = Squant(method_cfg()).quantize(model, ctx_for(None, fold_bn=fold_bn))
    assert any(not torch.equal(a[n], w) for n, w in weights_of(q_full).items())


def test_weights_are_on_the_grid_and_float_model_untouched():
    model = make_test_cnn(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = ctx_for(None)
    qmodel = Squant(method_cfg()).quantize(model, ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for m in quant_layers(qmodel).values():
        levels = m.weight_levels()
        assert torch.allclose(levels, torch.round(levels), atol=1e-4)
        assert levels.min() >= m.w_qmin - 1e-4 and levels.max() <= m.w_qmax + 1e-4
    assert 0.0 < ctx.info["squant_flip_frac"] < 0.2


# ---------------------------------------------------------------------------------------------
# Activation rule
# ---------------------------------------------------------------------------------------------


def test_squant_range_hand_computed():
    nonneg = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # positive entries 1..4: std = sqrt(5/3)
    std = math.sqrt(5.0 / 3.0)
    r = SquantRange(8)
    r.update(nonneg)
    assert r.range() == pytest.approx((0.0, 25 * std))
    r = SquantRange(4)
    r.update(nonneg)
    assert r.range() == pytest.approx((0.0, 4.0))  # 12 * std = 15.5 capped at the max below 6 bits
    signed = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])  # std = sqrt(3.5)
    r = SquantRange(6)
    r.update(signed)
    assert r.range() == pytest.approx((-14 * math.sqrt(3.5) / 1.25, 14 * math.sqrt(3.5) / 1.25))
    r = SquantRange(4)
    r.update(signed)
    assert r.range() == pytest.approx((-3.0, 3.0))
    r.update(torch.full((5,), 100.0))  # only the first batch counts
    assert r.range() == pytest.approx((-3.0, 3.0))
    zero = SquantRange(4)
    zero.update(torch.zeros(10))
    assert zero.range() == (0.0, 0.0)


def test_squant_range_k_table_other_bits():
    with pytest.raises(ValueError, match="no k for 5-bit activations; valid: bits 4, 6, 8"):
        SquantRange(5)
    assert KTable(other=13.0).for_bits(5) == 13.0
    assert KTable({"5": 9.0}).for_bits(5) == 9.0


def test_sequential_calibration_uses_quantized_upstream_and_method_k():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.rand(64, 6, generator=torch.Generator().manual_seed(3))
    ctx = QuantContext(8, 4, protocol(quantize_first_input=True, last_abits=None, fold_bn=False,
                                      first_wbits=None, last_wbits=None), 0, "cpu", x[:2], calib=[x])
    qmodel = Squant(method_cfg(k={"4": 10.0})).quantize(model, ctx)
    layers = quant_layers(qmodel)
    first, second = layers["0"], layers["2"]

    def alpha(t):
        pos = t[t > 0].detach().double()
        return min(10.0 * float(pos.std()), float(t.detach().max()))

    assert first.act_quant.hi == pytest.approx(alpha(x))
    assert first.act_quant.lo == 0.0
    hidden = torch.relu(first.layer(first.act_quant(x)))  # upstream already quantized
    assert second.act_quant.hi == pytest.approx(alpha(hidden), rel=1e-6)
    assert ctx.info["act_range"] == "squant"


def test_missing_k_for_activation_bits_fails_before_quantizing():
    model = make_test_cnn()
    with pytest.raises(ValueError, match="no k for 5-bit activations"):
        Squant(method_cfg()).quantize(model, ctx_for(5, [torch.rand(4, 3, 16, 16)]))
    q = Squant(method_cfg(k_other=13.0)).quantize(model, ctx_for(5, [torch.rand(4, 3, 16, 16)]))
    assert len(quant_layers(q)) == 6


# ---------------------------------------------------------------------------------------------
# Config and runner
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_compose(mode):
    cfg = compose_cfg(["method=squant", f"method.mode={mode}", "+method.k.5=11"])
    validate_config(cfg)
    assert cfg.method.mode == mode and cfg.method.k["5"] == 11


@pytest.mark.parametrize(
    "override,message",
    [("method.mode=squant-x", "method.mode='squant-x' is invalid; valid: squant, squant-e, squant-k, squant-c"),
     ("+method.k.x=3", "method.k.x=3.0 is invalid"),
     ("method.k_other=-1", "method.k_other=-1.0 is invalid")],
)
def test_bad_method_values_fail_at_validation(override, message):
    cfg = compose_cfg(["method=squant", override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_config(cfg)


def test_paper_protocol_preset():
    p = compose_cfg(["protocol=squant_paper"]).protocol
    assert (p.first_wbits, p.last_wbits, p.last_abits, p.fold_bn, p.quantize_first_input, p.w_range) == (
        None, None, 8, False, False, "minmax")


def reference_grid_squant(w, bits, kernel=True, channel=True):
    """SQuant's released weight quantizer, written here from its description: per output channel
    inv = (2^b - 1) / (max - min) over the channel's own [min, max] (no widening to include 0),
    zp = round(inv * min) + 2^(b-1), x = w * inv - zp, levels on [-2^(b-1), 2^(b-1) - 1] by the loop
    oracle above, dequantized as (q + zp) / inv. Returns (levels, dequantized weights)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    rows = w.reshape(w.shape[0], -1)
    lo, hi = rows.min(1).values, rows.max(1).values
    inv = ((2**bits - 1) / (hi - lo).clamp(min=1e-8)).reshape(shape)
    zp = (torch.round(inv.reshape(-1) * lo) + 2 ** (bits - 1)).reshape(shape)
    x = w * inv - zp
    q = reference_levels(x, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, kernel, channel)
    return q, (q + zp) / inv


def same_sign_weights(shape, seed):
    """Gaussian weights in which a third of the output channels are all positive and a third all
    negative (the channels where widening the range to include 0 changes the grid)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    w[0::3] = w[0::3].abs() + 0.05
    w[1::3] = -w[1::3].abs() - 0.05
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", [(12, 6, 3, 3), (9, 1, 3, 3), (10, 20)])
def test_minmax_grid_levels_equal_reference_grid_on_same_sign_channels(shape, bits, mode):
    w = same_sign_weights(shape, seed=bits)
    kernel, channel = MODES[mode]
    ref_q, ref_w = reference_grid_squant(w, bits, kernel, channel)
    g = weight_grid(w, bits, per_channel=True, symmetric=False, include_zero=False)
    q = flip_levels(g.scaled(w), g.qmin, g.qmax, kernel, channel)
    assert torch.equal(q, ref_q)
    torch.testing.assert_close(g.dequant(q), ref_w, rtol=1e-5, atol=1e-6)
    wide = weight_grid(w, bits, per_channel=True, symmetric=False)  # the common protocol's grid
    wide_w = wide.dequant(flip_levels(wide.scaled(w), wide.qmin, wide.qmax, kernel, channel))
    differs = ((wide_w - ref_w).abs() > 1e-4).flatten(1).any(1)
    assert differs[0::3].all() and differs[1::3].all()  # the knob matters on exactly those channels ...
    mixed = torch.ones(shape[0], dtype=torch.bool)
    mixed[0::3] = mixed[1::3] = False
    assert not differs[mixed].any()  # ... and on mixed-sign channels both grids are the same grid


def test_squant_paper_protocol_quantizes_with_the_reference_grid():
    model = make_test_cnn(seed=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(same_sign_weights(m.weight.shape, seed=m.weight.numel()))
    proto = {k: v for k, v in OmegaConf.to_container(compose_cfg(["protocol=squant_paper"]).protocol).items()}
    assert proto["w_range"] == "minmax"
    q = Squant(method_cfg()).quantize(model, ctx_for(None, **proto))
    layers = quant_layers(q)
    assert layers
    for name, ql in layers.items():
        _, ref_w = reference_grid_squant(dict(model.named_modules())[name].weight.detach(), 4)
        torch.testing.assert_close(ql.layer.weight.detach(), ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("override,message", [
    (["protocol.w_range=minmax", "protocol.w_symmetric=true"], "protocol.w_range='minmax' is invalid with"),
    (["method=genie_cpu", "protocol.w_range=minmax"], "not supported by method genie"),
    (["protocol.w_range=minmax", "deploy=onnxruntime"], "protocol.w_range='minmax' is invalid with deploy"),
])
def test_w_range_bad_combinations_fail_at_validation(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_config(compose_cfg(["method=squant", *override]))


def test_same_seed_gives_identical_row_twice(tmp_path):
    overrides = ["method=squant", "model=test_cnn", "dataset=fake", "wbits=4", "abits=4",
                 "dataset.num_samples=128", "data.num_samples=64", f"results_dir={tmp_path}"]
    a, b = run(compose_cfg(overrides)), run(compose_cfg(overrides))
    fields = ["run_id", "status", "top1", "top5", "top1_fp32", "agree_fp32", "kl_fp32", "n_eval",
              "squant_flip_frac", "act_range", "n_act_quant", "method_cfg", "data", "seed"]
    assert a["status"] == "ok" and {f: a[f] for f in fields} == {f: b[f] for f in fields}
    assert a["data"]["num_samples"] == 64 and a["method_cfg"]["mode"] == "squant"
    c = run(compose_cfg([*overrides, "seed=1"]))
    assert c["kl_fp32"] != a["kl_fp32"]  # the seed reaches the noise batch
