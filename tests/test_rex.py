"""REx: orders = 1 against its base method bit for bit, the expansion against a reference written
here (round to nearest on each order's own grid of its masked residual), the error falling with each
order, the kept channels, effective bits on a hand-made model, the row, the deploy refusal, bad keys."""

from __future__ import annotations

import math
import re

import pytest
import torch
from dfq_bench.methods.rex import Rex, effective_bits, kept_channels
from helpers import REPO, cli, compose_cfg, rows_in
from torch import nn

import dfq_bench
from dfq_bench.config import ConfigError, validate_config
from dfq_bench.core.bn import prepare_model
from dfq_bench.core.grid import SumGrid, weight_grid
from dfq_bench.core.modules import quant_layers
from dfq_bench.models.test_cnn import make_test_cnn
from dfq_bench.run.runner import run


def example():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def quantized(method, model=None, wbits=3, abits=None, x=None, **keys):
    model = make_test_cnn(seed=7) if model is None else model
    x = example() if x is None else x
    calib = [torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(1))] if abits else None
    protocol_keys = keys.pop("protocol_keys", None)
    return dfq_bench.quantize(model, method, wbits=wbits, abits=abits, example_input=x, calib=calib,
                              protocol_keys=protocol_keys, **keys)


def reference_expansion(w, bits, orders, keep, per_channel=True, symmetric=False):
    """REx from its definition with round to nearest: R_1 = Q(W); R_k = Q(masked W - sum_{j<k} R_j)
    on the grid of that masked residual, the mask keeping the ceil(keep * O) channels of largest
    residual norm. Returns the sum after each order."""
    approx, out = None, []
    for k in range(orders):
        r = w if approx is None else w - approx
        if k:
            norms = [float(c.double().norm()) for c in r.reshape(r.shape[0], -1)]
            n = max(1, math.ceil(round(keep * r.shape[0], 9)))
            top = sorted(range(len(norms)), key=lambda i: (-norms[i], i))[:n]
            mask = torch.zeros(r.shape[0], dtype=torch.bool)
            mask[top] = True
            mask = mask.reshape((-1,) + (1,) * (w.dim() - 1))
            r = torch.where(mask, r, torch.zeros_like(r))
        g = weight_grid(r, bits, per_channel, symmetric)
        term = g.dequant(torch.clamp(torch.round(r / g.scale + g.zero_point), g.qmin, g.qmax))
        if k:
            term = torch.where(mask, term, torch.zeros_like(term))
        approx = term if approx is None else approx + term
        out.append(approx)
    return out


# ---------------------------------------------------------------------------------------------
# One order is the base method; more orders follow the definition
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["rtn", "squant"])
@pytest.mark.parametrize("protocol_keys", [None, {"w_granularity": "per_tensor", "w_symmetric": True}])
def test_one_order_equals_its_base_method_exactly(base, protocol_keys):
    q_rex, info = quantized("rex", orders=1, base=base, protocol_keys=protocol_keys)
    q_base, _ = quantized(base, protocol_keys=protocol_keys)
    sd_rex, sd_base = q_rex.state_dict(), q_base.state_dict()
    assert sd_rex.keys() == sd_base.keys() and all(torch.equal(sd_rex[k], sd_base[k]) for k in sd_rex)
    assert info["rex_orders"] == 1 and info["eff_wbits"] == info["rex_base_wbits"]
    assert len(info["rex_werr"]) == 1


@pytest.mark.parametrize("orders,keep", [(2, 1.0), (3, 0.5), (4, 0.25)])
@pytest.mark.parametrize("wbits", [2, 4])
def test_expansion_equals_the_reference_and_bakes_the_sum(orders, keep, wbits):
    qmodel, info = quantized("rex", wbits=wbits, orders=orders, keep=keep)
    folded, _ = prepare_model(make_test_cnn(seed=7), True, {})
    for name, ql in quant_layers(qmodel).items():
        w = folded.get_submodule(name).weight.detach()
        ref = reference_expansion(w, ql.w_bits, orders, keep)
        torch.testing.assert_close(ql.layer.weight, ref[-1], rtol=0, atol=1e-7)


@pytest.mark.parametrize("base", ["rtn", "squant"])
@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("wbits", [2, 3, 4])
def test_reconstruction_error_falls_with_each_order(base, keep, wbits):
    _, info = quantized("rex", wbits=wbits, orders=4, keep=keep, base=base)
    err = info["rex_werr"]
    assert len(err) == 4 and all(b < a for a, b in zip(err, err[1:], strict=False)), err
    # the same, measured here on one layer's baked weights for K = 1, 2, 3
    folded, _ = prepare_model(make_test_cnn(seed=7), True, {})
    w = folded.get_submodule("conv2").weight.detach()
    per_k = [float((w - quant_layers(quantized("rex", wbits=wbits, orders=k, keep=keep, base=base)[0])["conv2"]
                    .layer.weight.detach()).pow(2).sum()) for k in (1, 2, 3)]
    assert per_k[0] > per_k[1] > per_k[2]


def test_orders_two_and_up_change_only_the_kept_channels_those_of_largest_residual():
    model = make_test_cnn(seed=7)
    one = quant_layers(quantized("rex", model, orders=1)[0])
    two = quant_layers(quantized("rex", model, orders=2, keep=0.3)[0])
    folded, _ = prepare_model(model, True, {})
    for name in one:
        w = folded.get_submodule(name).weight.detach()
        w1, w2 = one[name].layer.weight, two[name].layer.weight
        o = w.shape[0]
        changed = [not torch.equal(w1[c], w2[c]) for c in range(o)]
        norms = (w - w1).reshape(o, -1).double().norm(dim=1).tolist()
        n = math.ceil(round(0.3 * o, 9))
        top = set(sorted(range(o), key=lambda c: (-norms[c], c))[:n])
        assert {c for c in range(o) if changed[c]} <= top  # a kept channel may round to no change
        assert sum(changed) >= 1


def test_kept_channels_count_and_ties():
    r = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert kept_channels(r, 0.5).tolist() == [False, True, False, True]
    assert kept_channels(r, 0.6).tolist() == [True, True, False, True]  # ceil(2.4) = 3; tie: lower index
    assert kept_channels(r, 0.01).tolist() == [False, True, False, False]  # at least one
    assert kept_channels(torch.zeros(10, 3), 0.3).sum() == 3  # 0.3 * 10 is 3.0000000000000004 in floats


def test_sum_grid_levels_reproduce_the_expansion():
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(2)) * 0.1
    g1 = weight_grid(w, 3, True, False)
    r = w - g1.fake(w)
    mask = kept_channels(r, 0.5).reshape(-1, 1, 1, 1)
    rm = torch.where(mask, r, torch.zeros_like(r))
    grid = SumGrid([g1, weight_grid(rm, 3, True, False)], [None, mask])
    q = grid.levels(w)
    assert q.shape == (2, *w.shape)
    assert torch.equal(grid.fake(w), reference_expansion(w, 3, 2, 0.5)[-1])
    assert torch.equal(SumGrid([g1], [None]).fake(w), g1.fake(w))


# ---------------------------------------------------------------------------------------------
# Effective bits
# ---------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """conv 3->4 (k3: 108 weights, 27 per channel), conv 4->6 (k3: 216, 36), fc 6->10 (60, 6)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3), nn.Linear(6, 10)
        with torch.no_grad():
            for m in (self.conv1, self.conv2, self.fc):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.2)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_effective_bits_of_a_hand_made_case():
    # first and last layer at 8 bits (protocol), conv2 at 3; keep 0.3: ceil(1.2) = 2, ceil(1.8) = 2 and
    # ceil(3.0) = 3 channels, i.e. 54, 72 and 18 extra weights per order >= 2
    _, info = quantized("rex", Tiny(), wbits=3, x=torch.randn(2, 3, 8, 8), orders=2, keep=0.3)
    base = (8 * 108 + 3 * 216 + 8 * 60) / 384  # 5.1875
    assert info["rex_base_wbits"] == base
    assert info["eff_wbits"] == (8 * (108 + 54) + 3 * (216 + 72) + 8 * (60 + 18)) / 384  # 7.25
    _, info3 = quantized("rex", Tiny(), wbits=3, x=torch.randn(2, 3, 8, 8), orders=3, keep=0.3)
    assert info3["eff_wbits"] == (8 * (108 + 2 * 54) + 3 * (216 + 2 * 72) + 8 * (60 + 2 * 18)) / 384  # 9.3125
    # every layer at 4 bits, all channels kept: K orders are K * 4 bits
    _, info4 = quantized("rex", Tiny(), wbits=4, x=torch.randn(2, 3, 8, 8), orders=3, keep=1.0,
                         protocol_keys={"first_wbits": None, "last_wbits": None})
    assert info4["eff_wbits"] == 12.0 and info4["rex_base_wbits"] == 4.0
    assert effective_bits([(4, 100, [50, 25]), (8, 10, [10, 0])]) == ((4 * 175 + 8 * 20) / 110, (400 + 80) / 110)


# ---------------------------------------------------------------------------------------------
# The row, refusals
# ---------------------------------------------------------------------------------------------


def test_row_records_orders_keep_and_effective_bits(tmp_path):
    row = run(compose_cfg(["method=rex", "model=test_cnn", "dataset=fake", "wbits=3", "abits=8",
                           "method.orders=3", "method.keep=0.25", "dataset.num_samples=64", "data.num_samples=16",
                           f"results_dir={tmp_path}"]))
    assert row["status"] == "ok" and row["rex_orders"] == 3 and row["rex_keep"] == 0.25 and row["rex_base"] == "rtn"
    assert row["rex_base_wbits"] < row["eff_wbits"] < 3 * row["rex_base_wbits"]
    assert len(row["rex_werr"]) == 3 and row["act_range"] == "minmax"
    assert rows_in(tmp_path)[-1]["eff_wbits"] == row["eff_wbits"]


def test_deploy_is_refused_in_one_line_exit_2_and_no_row(tmp_path):
    msg = ("method rex cannot run with deploy=onnxruntime: its weights are a sum of quantized orders "
           "(residual expansion), not one uniform integer grid; valid: deploy=null")
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        validate_config(compose_cfg(["method=rex", "deploy=onnxruntime"]))
    proc = cli(["method=rex", "model=test_cnn", "dataset=fake", "deploy=onnxruntime", f"results_dir={tmp_path}"],
               REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {msg}"]
    assert rows_in(tmp_path) == []


@pytest.mark.parametrize("override,message", [
    ("method.orders=0", "method.orders=0 is invalid; valid: an integer >= 1"),
    ("method.keep=0", "method.keep=0.0 is invalid; valid: a fraction in (0, 1]"),
    ("method.keep=1.5", "method.keep=1.5 is invalid; valid: a fraction in (0, 1]"),
    ("method.base=dfq", "method.base='dfq' is invalid; valid: rtn, squant"),
])
def test_bad_keys_fail_before_any_model_is_built(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        validate_config(compose_cfg(["method=rex", override]))
    with pytest.raises(ConfigError):
        Rex(compose_cfg(["method=rex", override]).method)
