"""Grid math, weight/activation fake-quant, BN folding and the layer plan, checked against
independent references written here."""

import random

import pytest
import torch
from helpers import protocol, quant_ctx
from torch import nn

from dfq_bench.core.bn import fold_bn, prepare_model
from dfq_bench.core.grid import grid_from_range, weight_grid
from dfq_bench.core.modules import ActQuant, QuantLayer, quantize_weights
from dfq_bench.core.planner import plan_layers
from dfq_bench.core.ranges import calibrate_activations
from dfq_bench.models.test_cnn import make_test_cnn


def ref_levels(values, bits, symmetric):
    """Independent reference: signed grid, range widened to 0, round half to even (Python round)."""
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = (max(-lo, hi) / qmax if symmetric else (hi - lo) / (qmax - qmin)) or 1.0
    z = 0 if symmetric else min(max(qmin - round(lo / s), qmin), qmax)
    return [min(max(round(v / s + z), qmin), qmax) for v in values], s, z


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_grid_matches_reference(bits, symmetric):
    rng = random.Random(bits)
    values = [rng.gauss(0.3, 1.0) for _ in range(500)]
    w = torch.tensor(values, dtype=torch.float64)
    grid = weight_grid(w, bits, per_channel=False, symmetric=symmetric)
    levels, s, z = ref_levels(values, bits, symmetric)
    assert grid.levels(w).tolist() == levels
    assert float(grid.scale) == pytest.approx(s, rel=1e-15)
    assert float(grid.zero_point) == z
    dequant = grid.fake(w)
    assert torch.allclose(dequant, torch.tensor([(q - z) * s for q in levels], dtype=torch.float64))


@pytest.mark.parametrize("symmetric", [False, True])
def test_per_channel_grid_matches_reference_row_by_row(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 3, 3, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 8).reshape(-1, 1, 1, 1)
    w[2] = w[2].abs() + 0.5  # an all-positive channel: the range must be widened to 0
    grid = weight_grid(w, 4, per_channel=True, symmetric=symmetric)
    levels = grid.levels(w)
    for c in range(8):
        ref, _, _ = ref_levels(w[c].flatten().tolist(), 4, symmetric)
        assert levels[c].flatten().tolist() == ref
        assert len(torch.unique(levels[c])) <= 2**4


def test_exact_ties_round_half_to_even():
    # Range [-8, 7] at 4 bits gives scale 1 and zero-point 0: x/scale is exact.
    w = torch.tensor([-8.0, 7.0, 0.5, 1.5, 2.5, -0.5, -1.5, 6.5])
    grid = weight_grid(w, 4, per_channel=False, symmetric=False)
    assert float(grid.scale) == 1.0 and float(grid.zero_point) == 0.0
    assert grid.levels(w).tolist() == [-8, 7, 0, 2, 2, 0, -2, 6]


def test_zero_is_exact_and_all_zero_channel_is_safe():
    w = torch.zeros(2, 4)
    w[1] = torch.tensor([0.3, -1.2, 0.0, 2.0])
    grid = weight_grid(w, 3, per_channel=True, symmetric=False)
    out = grid.fake(w)
    assert torch.equal(out[0], torch.zeros(4))
    assert out[1, 2] == 0.0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_at_most_2_pow_b_levels_per_channel(bits):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    grid = weight_grid(w, bits, per_channel=True, symmetric=False)
    levels = grid.levels(w)
    assert all(len(torch.unique(levels[c])) <= 2**bits for c in range(16))
    assert levels.min() >= -(2 ** (bits - 1)) and levels.max() <= 2 ** (bits - 1) - 1


def test_activation_quantizer_output_on_grid():
    aq = ActQuant(4, symmetric=False)
    aq.set_range(0.0, 3.0)
    assert (aq.qmin, aq.qmax) == (0, 15)
    x = torch.linspace(-1, 4, 101)
    y = aq(x)
    q = y / aq.scale
    assert torch.allclose(q, q.round(), atol=1e-4)  # every output is a multiple of the step
    assert y.min() == 0.0 and float(y.max()) == pytest.approx(3.0)
    signed = ActQuant(4, symmetric=True)
    signed.set_range(-2.0, 1.0)
    assert (signed.qmin, signed.qmax) == (-8, 7) and int(signed.zero_point) == 0
    assert float(signed.scale) == pytest.approx(2.0 / 7)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("lo,hi", [(0.0, 3.7), (-1.3, 2.9), (-2.5, 2.5)])
def test_activation_quantizer_eval_path_equals_torch_fake_quant(bits, lo, hi):
    """The in-place evaluation path gives exactly torch's fused op (with gradient it is the fused op),
    including inputs at and one ulp around every .5 tie of the grid."""
    aq = ActQuant(bits, symmetric=lo == -hi)
    aq.set_range(lo, hi)
    ties = (torch.arange(-300, 300).float() + 0.5) * aq.scale
    big, small = torch.tensor(1e9), torch.tensor(-1e9)
    x = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(bits)) * 4, ties,
                   ties.nextafter(big), ties.nextafter(small)])
    ref = torch.fake_quantize_per_tensor_affine(x, aq.scale, aq.zero_point, aq.qmin, aq.qmax)
    with torch.no_grad():
        assert torch.equal(aq(x), ref)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = aq(xg)  # with a gradient: torch's op, straight-through estimator
    out.sum().backward()
    torch.fake_quantize_per_tensor_affine(xr, aq.scale, aq.zero_point, aq.qmin, aq.qmax).sum().backward()
    assert torch.equal(out.detach(), ref) and torch.equal(xg.grad, xr.grad)


def test_asymmetric_activation_grid_has_integer_zero_point():
    grid = grid_from_range(torch.tensor(-1.0), torch.tensor(3.0), 8, symmetric=False, signed=False)
    assert float(grid.zero_point) == round(1.0 / (4.0 / 255))
    assert float(grid.fake(torch.tensor(0.0))) == 0.0


def test_bn_folding_preserves_outputs():
    model = make_test_cnn(0)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    folded, n = prepare_model(model, fold=True)
    assert n == 5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert (model(x) - folded(x)).abs().max() < 1e-5
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched


def test_fold_bn_counts_only_conv_bn_pairs():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Conv2d(1, 2, 1))
    assert fold_bn(model) == 0


def test_plan_applies_first_last_rules_in_execution_order():
    model = make_test_cnn(0)
    x = torch.zeros(2, 3, 32, 32)
    plans = plan_layers(model, x, protocol(), wbits=4, abits=4)
    assert [p.name for p in plans] == ["stem.0", "conv1", "conv2", "dw.0", "pw.0", "fc"]
    assert [(p.w_bits, p.a_bits) for p in plans] == [(8, None), (4, 4), (4, 4), (4, 4), (4, 4), (8, 8)]
    paper = protocol(first_wbits=None, last_wbits=None, quantize_first_input=True, last_abits=None)
    plans = plan_layers(model, x, paper, wbits=3, abits=5)
    assert [(p.w_bits, p.a_bits) for p in plans] == [(3, 5)] * 6
    weight_only = plan_layers(model, x, protocol(), wbits=4, abits=None)
    assert all(p.a_bits is None for p in weight_only)


def test_quantized_weights_sit_on_their_grid_and_float_model_is_untouched():
    model = make_test_cnn(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel, _ = prepare_model(model, fold=True)
    plans = plan_layers(qmodel, torch.zeros(2, 3, 32, 32), protocol(), 3, None)
    quantize_weights(qmodel, plans, protocol())
    for name, layer in qmodel.named_modules():
        if isinstance(layer, QuantLayer):
            levels = layer.weight_levels()
            recon = (levels - layer.w_zero_point) * layer.w_scale
            assert torch.allclose(recon, layer.layer.weight, atol=1e-6), name
            per_channel = levels.reshape(levels.shape[0], -1)
            bits = layer.w_bits
            assert all(len(torch.unique(r)) <= 2**bits for r in per_channel)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _quantize(bits, abits, rule="minmax"):
    model = make_test_cnn(0)
    qmodel, _ = prepare_model(model, fold=True)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    proto = protocol(first_wbits=None, last_wbits=None, last_abits=None)
    plans = plan_layers(qmodel, x[:2], proto, bits, abits)
    quantize_weights(qmodel, plans, proto)
    info = calibrate_activations(qmodel, plans, rule, proto, [x], float_model=model) if abits else {}
    return model, qmodel, x, info


def test_rtn_8bit_keeps_logits_close_to_float():
    model, qmodel, x, _ = _quantize(8, 8)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 0.03
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    _, q4, _, _ = _quantize(4, 4)
    with torch.no_grad():
        assert (q4(x) - ref).abs().max() > (out - ref).abs().max()  # fewer bits, larger error


def test_bn_rule_sets_ranges_from_bn_statistics():
    model, qmodel, x, info = _quantize(8, 8, rule="bn")
    # conv1, conv2, pw.0 and fc (through pooling) take BN->ReLU(6) outputs; dw.0 sees a residual
    # add and falls back to min/max on data.
    assert info["n_act_bn_rule"] == 4 and info["n_act_quant"] == 5
    aq = qmodel.conv2.act_quant
    beta, gamma = model.bn1.bias.detach(), model.bn1.weight.detach().abs()
    assert aq.hi == pytest.approx(float((beta + 6 * gamma).max()))
    assert aq.lo == pytest.approx(max(0.0, float((beta - 6 * gamma).min())))
    # dw.0's range is the min/max of what it saw: recompute it with its quantizer switched off.
    dw = qmodel.get_submodule("dw.0")
    lo, hi, seen = dw.act_quant.lo, dw.act_quant.hi, []
    dw.act_quant.state = "off"
    dw.layer.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    with torch.no_grad():
        qmodel(x)
    assert (lo, hi) == (float(seen[0].min()), float(seen[0].max()))
    pw_in = qmodel.get_submodule("pw.0").act_quant  # after ReLU6: capped at 6
    assert pw_in.hi <= 6.0


def test_percentile_rule_is_inside_minmax():
    _, q_mm, _, _ = _quantize(8, 8, "minmax")
    _, q_pc, _, _ = _quantize(8, 8, "percentile")
    mm, pc = q_mm.conv2.act_quant, q_pc.conv2.act_quant
    assert mm.lo <= pc.lo <= pc.hi <= mm.hi
    assert pc.hi < mm.hi


def test_method_returns_new_model_and_leaves_float_model_untouched():
    from dfq_bench.methods.rtn import RTN

    model = make_test_cnn(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ctx = quant_ctx(4, 4, x[:2], calib=[x])
    qmodel = RTN().quantize(model, ctx)
    assert qmodel is not model and isinstance(qmodel.conv1, QuantLayer)
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert ctx.info["n_layers"] == 6 and ctx.info["n_act_quant"] == 5
