"""PowerQuant: the power grid against a reference written here (sign(w)|w|^a on a uniform grid and
back), a = 1 against RTN bit for bit, the exponent search against a scan of every a of its lattice,
at most 2^b values per channel, the row's fields, the deploy refusal and bad keys."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from dfq_bench.methods.powerquant import PowerQuant, lattice, recon_error, search_exponent
from helpers import REPO, cli, compose_cfg, quant_ctx, rows_in

import dfq_bench
from dfq_bench.config import ConfigError, validate_config
from dfq_bench.core.grid import PowerGrid, power_weight_grid, weight_grid
from dfq_bench.core.modules import quant_layers
from dfq_bench.models.test_cnn import make_test_cnn
from dfq_bench.run.runner import run

PROTOCOLS = [  # (per_channel, symmetric, include_zero)
    (True, False, True), (True, True, True), (False, False, True), (False, True, True), (True, False, False),
]


def reference_fake(w, a, bits, per_channel, symmetric, include_zero=True):
    """The power quantizer from its definition: u = sign(w)|w|^a on the uniform grid, v back by
    sign(v)|v|^(1/a); a = 1 is the uniform grid of w itself."""
    if a == 1:
        return weight_grid(w, bits, per_channel, symmetric, include_zero).fake(w)
    u = torch.sign(w) * torch.abs(w) ** a
    v = weight_grid(u, bits, per_channel, symmetric, include_zero).fake(u)
    return torch.sign(v) * torch.abs(v) ** (1.0 / a)


def laplace(shape, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.sign(torch.randn(shape, generator=g)) * -torch.log(torch.rand(shape, generator=g)) * scale


def example():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel,symmetric,include_zero", PROTOCOLS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_power_grid_at_a_one_is_the_uniform_grid_bitwise(per_channel, symmetric, include_zero, bits):
    w = laplace((16, 8, 3, 3), 0) + 0.01  # a shift: some channels' ranges off-centre
    pg = power_weight_grid(w, 1.0, bits, per_channel, symmetric, include_zero)
    g = weight_grid(w, bits, per_channel, symmetric, include_zero)
    assert torch.equal(pg.scale, g.scale) and torch.equal(pg.zero_point, g.zero_point)
    assert (pg.qmin, pg.qmax) == (g.qmin, g.qmax)
    assert torch.equal(pg.levels(w), g.levels(w)) and torch.equal(pg.fake(w), g.fake(w))
    assert torch.equal(pg.scaled(w), g.scaled(w))


@pytest.mark.parametrize("per_channel,symmetric,include_zero", PROTOCOLS)
@pytest.mark.parametrize("a", [0.3, 0.62, 1.37])
def test_power_grid_equals_the_reference_quantizer(per_channel, symmetric, include_zero, a):
    w = laplace((8, 4, 3, 3), 1)
    got = power_weight_grid(w, a, 3, per_channel, symmetric, include_zero).fake(w)
    torch.testing.assert_close(got, reference_fake(w, a, 3, per_channel, symmetric, include_zero), rtol=0, atol=0)


@pytest.mark.parametrize("per_channel,symmetric,include_zero", PROTOCOLS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_at_most_two_to_the_b_values_per_channel_and_not_uniform(per_channel, symmetric, include_zero, bits):
    w = laplace((32, 64), 2)
    grid = power_weight_grid(w, 0.5, bits, per_channel, symmetric, include_zero)
    levels, q = grid.levels(w), grid.fake(w)
    assert levels.min() >= grid.qmin and levels.max() <= grid.qmax and torch.equal(levels, levels.round())
    rows = q if per_channel else q.reshape(1, -1)
    for row in rows:
        assert row.unique().numel() <= 2**bits
    # the values are the inverse power of a uniform grid: gaps grow away from 0 (a < 1)
    v = grid.dequant(torch.arange(grid.qmin, grid.qmax + 1.0).reshape(1, -1))[0]  # (first) channel's values
    gaps = v.diff()
    assert (gaps > 0).all() and gaps.max() > 1.5 * gaps.min()
    assert bool((v == 0).any())  # 0 stays exact (integer zero-point)


def test_power_grid_is_a_grid_the_baked_layer_keeps():
    w = laplace((4, 3, 3, 3), 3)
    grid = power_weight_grid(w, 0.7, 4, True, False)
    assert isinstance(grid, PowerGrid) and grid.a == 0.7
    assert torch.equal(grid.dequant(grid.levels(w)), grid.fake(w))


# ---------------------------------------------------------------------------------------------
# The exponent search
# ---------------------------------------------------------------------------------------------


def test_lattice_holds_a_one_exactly_and_ends_inside():
    pts = lattice(0.2, 1.5, 0.01)
    assert len(pts) == 131 and pts[0] == 0.2 and pts[-1] == 1.5 and 1.0 in pts
    assert lattice(0.3, 1.0, 0.3) == [0.3, 0.6, 0.9]


def test_search_finds_the_minimiser_of_a_smooth_function_to_the_tolerance():
    for target, tol in [(0.6137, 0.01), (1.2345, 0.001), (0.2, 0.05)]:
        a, seen = search_exponent(lambda a, t=target: (a - t) ** 2, 0.2, 1.5, tol)
        assert abs(a - target) <= tol / 2 + 1e-12
        assert len(seen) == len(lattice(0.2, 1.5, tol))


@pytest.mark.parametrize("seed,shape,bits,symmetric", list(itertools.product(
    [0, 1], [(16, 8, 3, 3), (32, 64)], [2, 3, 4, 6], [False, True])))
def test_search_finds_the_reconstruction_minimiser_on_a_dense_grid_of_a(seed, shape, bits, symmetric):
    w = laplace(shape, seed) if seed else torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1
    tol = 0.01
    a, _ = search_exponent(lambda a: recon_error(w, power_weight_grid(w, a, bits, True, symmetric)), 0.2, 1.5, tol)
    dense = [0.2 + j * 0.01 for j in range(131)]  # the same points, built and evaluated independently
    errs = [float(((w.double() - reference_fake(w, round(x, 10), bits, True, symmetric).double()) ** 2).sum())
            for x in dense]
    minimisers = [x for x, e in zip(dense, errs, strict=True) if e <= min(errs) * (1 + 1e-12)]  # more than one: a tie
    assert any(abs(a - x) <= tol / 2 for x in minimisers)
    e_found = float(((w.double() - reference_fake(w, a, bits, True, symmetric).double()) ** 2).sum())
    assert e_found <= min(errs) * (1 + 1e-12)
    e_rtn = float(((w.double() - weight_grid(w, bits, True, symmetric).fake(w).double()) ** 2).sum())
    assert e_found <= e_rtn  # a = 1 is on the lattice


def test_power_grid_beats_rtn_on_bell_shaped_weights():
    w = laplace((64, 576), 4)
    a, seen = search_exponent(lambda a: recon_error(w, power_weight_grid(w, a, 3, True, False)), 0.2, 1.5, 0.01)
    assert 0.4 < a < 0.9 and seen[a] < 0.8 * seen[1.0]


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


def quantized(method, abits=None, **keys):
    model = make_test_cnn(seed=5)
    x = example()
    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))] if abits else None
    protocol_keys = keys.pop("protocol_keys", None)
    return dfq_bench.quantize(model, method, wbits=3, abits=abits, example_input=x, calib=calib,
                              protocol_keys=protocol_keys, **keys), x


@pytest.mark.parametrize("protocol_keys", [None, {"w_symmetric": True}, {"w_granularity": "per_tensor"},
                                           {"w_range": "minmax"}])
@pytest.mark.parametrize("abits", [None, 4])
def test_powerquant_with_a_one_equals_rtn_exactly(protocol_keys, abits):
    (q_pq, info), x = quantized("powerquant", abits, a=1.0, protocol_keys=protocol_keys)
    (q_rtn, _), _ = quantized("rtn", abits, protocol_keys=protocol_keys)
    sd_pq, sd_rtn = q_pq.state_dict(), q_rtn.state_dict()
    assert sd_pq.keys() == sd_rtn.keys()
    assert all(torch.equal(sd_pq[k], sd_rtn[k]) for k in sd_pq)
    with torch.no_grad():
        assert torch.equal(q_pq(x), q_rtn(x))
    assert set(info["powerquant_a"].values()) == {1.0} and info["powerquant_scope"] == "fixed"


def test_each_layer_gets_its_own_searched_exponent_and_its_values():
    (qmodel, info), _ = quantized("powerquant")
    model = make_test_cnn(seed=5)
    from dfq_bench.core.bn import prepare_model  # the folded weights the method quantized

    folded, _ = prepare_model(model, True, {})
    layers = quant_layers(qmodel)
    assert set(info["powerquant_a"]) == set(layers) and info["powerquant_scope"] == "per_layer"
    for name, ql in layers.items():
        w = folded.get_submodule(name).weight.detach()
        a = info["powerquant_a"][name]
        best, _ = search_exponent(lambda x, w=w, b=ql.w_bits: recon_error(w, power_weight_grid(w, x, b, True, False)),
                                  0.2, 1.5, 0.01)
        assert a == best and 0.2 <= a <= 1.5
        assert torch.equal(ql.layer.weight, reference_fake(w, a, ql.w_bits, True, False))
        for row in ql.layer.weight.reshape(w.shape[0], -1):
            assert row.unique().numel() <= 2**ql.w_bits
    assert len(set(info["powerquant_a"].values())) > 1


def test_global_scope_uses_one_exponent_minimising_the_summed_relative_error():
    (qmodel, info), _ = quantized("powerquant", scope="global", tol=0.05)
    values = set(info["powerquant_a"].values())
    assert len(values) == 1 and info["powerquant_scope"] == "global"
    from dfq_bench.core.bn import prepare_model

    folded, _ = prepare_model(make_test_cnn(seed=5), True, {})
    layers = [(folded.get_submodule(n).weight.detach(), ql.w_bits) for n, ql in quant_layers(qmodel).items()]

    def total(a):
        return sum(float(((w.double() - reference_fake(w, a, b, True, False).double()) ** 2).sum())
                   / float(w.double().pow(2).sum()) for w, b in layers)

    errs = {a: total(a) for a in lattice(0.2, 1.5, 0.05)}
    assert values.pop() == min(errs, key=errs.get)


def test_row_records_the_exponent_of_every_layer(tmp_path):
    row = run(compose_cfg(["method=powerquant", "model=test_cnn", "dataset=fake", "wbits=3", "abits=8",
                           "dataset.num_samples=64", "data.num_samples=16", f"results_dir={tmp_path}"]))
    assert row["status"] == "ok" and row["method_cfg"]["scope"] == "per_layer"
    assert len(row["powerquant_a"]) == row["n_layers"]
    assert all(0.2 <= a <= 1.5 for a in row["powerquant_a"].values())
    assert row["act_range"] == "minmax" and rows_in(tmp_path)[-1]["powerquant_a"] == row["powerquant_a"]


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_deploy_is_refused_in_one_line_exit_2_and_no_row(tmp_path):
    msg = ("method powerquant cannot run with deploy=onnxruntime: its weights lie on a power grid "
           "(sign(v) |v|^(1/a)), not a uniform integer grid; valid: deploy=null")
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        validate_config(compose_cfg(["method=powerquant", "deploy=onnxruntime"]))
    proc = cli(["method=powerquant", "model=test_cnn", "dataset=fake", "deploy=onnxruntime",
                f"results_dir={tmp_path}"], REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {msg}"]
    assert rows_in(tmp_path) == []


@pytest.mark.parametrize("override,message", [
    ("method.a_min=0", "method.a_min=0.0 is invalid; valid: a number > 0"),
    ("method.a_max=0.1", "method.a_max=0.1 is invalid; valid: a number > method.a_min=0.2"),
    ("method.tol=0", "method.tol=0.0 is invalid; valid: a number in (0, a_max - a_min]"),
    ("method.tol=2", "method.tol=2.0 is invalid"),
    ("method.scope=per_channel", "method.scope='per_channel' is invalid; valid: per_layer, global"),
    ("method.a=-1", "method.a=-1.0 is invalid; valid: a number > 0, or null (search)"),
])
def test_bad_keys_fail_before_any_model_is_built(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate_config(compose_cfg(["method=powerquant", override]))
    with pytest.raises(ConfigError):
        PowerQuant(compose_cfg(["method=powerquant", override]).method)


@pytest.mark.parametrize("method", ["powerquant", "rex"])
def test_the_exporter_itself_refuses_a_non_uniform_grid_by_name(method, tmp_path):
    """Called from Python (no validate_config in front), export names the grid instead of reporting
    weights "changed after rounding"."""
    pytest.importorskip("onnx")
    from helpers import make_method

    from dfq_bench.deploy.export import ExportError, export

    x = torch.zeros(1, 3, 16, 16)
    kw = {"a": 0.7} if method == "powerquant" else {}
    q = make_method(method, **kw).quantize(make_test_cnn(seed=0), quant_ctx(4, 8, x, [torch.rand(4, 3, 16, 16)]))
    kind = "PowerGrid" if method == "powerquant" else "SumGrid"
    with pytest.raises(ExportError, match=rf"its weight grid is {kind}, not a uniform grid"):
        export(q, x, tmp_path / "m.onnx")


def test_every_row_has_its_effective_bits_per_weight():
    """eff_wbits = sum bits x weights / weights over the quantized layers, written here from the
    protocol's rule: first and last layers at 8 bits, the others at wbits."""
    model = make_test_cnn(seed=0)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    sizes = [m.weight.numel() for m in layers]
    want = (8 * sizes[0] + 3 * sum(sizes[1:-1]) + 8 * sizes[-1]) / sum(sizes)
    x = torch.zeros(1, 3, 16, 16)
    for name in ("rtn", "squant", "powerquant"):
        _, info = dfq_bench.quantize(model, name, wbits=3, abits=None, example_input=x)
        assert info["eff_wbits"] == pytest.approx(want, rel=1e-12), name
    _, info = dfq_bench.quantize(model, "rtn", wbits=3, abits=None, example_input=x, protocol="squant_paper")
    assert info["eff_wbits"] == 3.0  # every layer at wbits
