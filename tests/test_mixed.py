"""Mixed precision (core/mixed.py): the solvers against brute force, the budget, the sensitivities,
the plan in the quantized model, seeds, the cache, bad input, the CLI (a frontier as a multirun) and
the deployed-integer check on a mixed plan."""

import itertools
import json
import logging

import numpy as np
import pytest
import torch
from helpers import cli, compose_cfg, rows_in

import dfq_bench
from dfq_bench.config import ConfigError, UnsupportedError, identity_config, validate_config
from dfq_bench.core import mixed
from dfq_bench.core.mixed import MixedPrecision, solve_dp, solve_greedy, solve_random, solve_uniform
from dfq_bench.core.modules import quant_layers
from dfq_bench.core.planner import execution_order
from dfq_bench.models.test_cnn import make_test_cnn
from dfq_bench.results import fields
from dfq_bench.run.runner import run, run_id

TINY = ["model=test_cnn", "dataset=fake", "dataset.num_samples=64", "dataset.batch_size=64", "data.num_samples=32"]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = make_test_cnn().eval()
    g = torch.Generator().manual_seed(1)
    cache = str(tmp_path_factory.mktemp("mp_cache"))  # one sensitivity pass per method for the module
    return model, torch.randn(2, 3, 32, 32, generator=g), [torch.randn(32, 3, 32, 32, generator=g)], cache


def quantize(cnn, method="rtn", abits=8, **mp):
    model, x, calib, cache = cnn
    return dfq_bench.quantize(model, method, wbits=4, abits=abits, example_input=x, calib=calib,
                              planner=MixedPrecision(**{"cache_dir": cache, **mp}))


# --- the solvers ----------------------------------------------------------------------------------


def brute_force(cost, weight, capacity):
    """The least cost over every plan that fits (all 3^L of them)."""
    plans = np.array(list(itertools.product(range(cost.shape[1]), repeat=len(cost))))
    rows = np.arange(len(cost))
    fits = weight[rows, plans].sum(axis=1) <= capacity
    return cost[rows, plans].sum(axis=1)[fits].min()


def instances(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        layers = int(rng.integers(1, 9))
        sizes = rng.integers(1, 60, size=layers)[:, None] * np.array([2, 4, 8])  # n_l x bits, increasing
        sizes = sizes + rng.integers(0, 5, size=(layers, 1)) * np.array([1, 2, 3])  # not all multiples
        cost = np.sort(rng.random((layers, 3)), axis=1)[:, ::-1].copy()  # fewer bits, more sensitive
        if rng.random() < 0.3:
            cost = rng.random((layers, 3))  # and arbitrary costs
        lo, hi = int(sizes[:, 0].sum()), int(sizes[:, -1].sum())
        yield cost, sizes, int(rng.integers(lo, hi + 1))


def used(weight, choice):
    return sum(int(weight[i, k]) for i, k in enumerate(choice))


def test_dp_equals_brute_force_on_random_small_instances():
    for cost, weight, capacity in instances(300):
        choice, info = solve_dp(cost, weight, capacity)
        assert info["exact"] and used(weight, choice) <= capacity
        assert sum(cost[i, k] for i, k in enumerate(choice)) == pytest.approx(brute_force(cost, weight, capacity),
                                                                             abs=1e-12)
        coarse, cinfo = solve_dp(cost, weight, capacity, bin_bits=7)  # binned: still fits, never better
        assert used(weight, coarse) <= capacity
        assert sum(cost[i, k] for i, k in enumerate(coarse)) >= brute_force(cost, weight, capacity) - 1e-12


def test_baseline_allocators_fit_the_budget_and_uniform_is_the_widest_that_fits():
    for cost, weight, capacity in instances(100, seed=1):
        for choice in (solve_greedy(cost, weight, capacity), solve_random(weight, capacity, 0),
                       solve_uniform(weight, capacity)):
            assert used(weight, choice) <= capacity
        k = solve_uniform(weight, capacity)[0]
        assert k == 2 or weight[:, k + 1].sum() > capacity
        rand = solve_random(weight, capacity, 3)  # maximal: no layer can go up a choice
        assert all(k == 2 or used(weight, rand) - weight[i, k] + weight[i, k + 1] > capacity
                   for i, k in enumerate(rand))
    with pytest.raises(mixed.InfeasibleError):
        solve_dp(np.zeros((2, 3)), np.array([[2, 4, 8], [2, 4, 8]]), 3)


# --- plans on a model -------------------------------------------------------------------------------


def in_plan_order(cnn, qmodel) -> dict:
    model, x = cnn[:2]
    layers = quant_layers(qmodel)
    return {name: layers[name] for name in execution_order(model, x)}


def test_plan_respects_the_budget_exactly_and_size_mb_counts_weights_scales_and_zero_points(cnn):
    for budget in (2.0, 2.7, 4.5, 8.0):
        for allocator in ("dp", "greedy", "random", "uniform"):
            qmodel, info = quantize(cnn, allocator=allocator, avg_wbits=budget, bits=[2, 4, 8])
            layers = in_plan_order(cnn, qmodel)
            n = {k: ql.layer.weight.numel() for k, ql in layers.items()}
            alloc = list(layers)[1:-1]  # the first and last layers are the protocol's (8 bits)
            assert [ql.w_bits for ql in layers.values()] == info["mp_bits"] and info["mp_bits"][0] == 8
            assert sum(n[k] * layers[k].w_bits for k in alloc) <= budget * sum(n[k] for k in alloc)
            assert info["avg_wbits"] == info["eff_wbits"]
            bits = sum(n[k] * ql.w_bits + ql.layer.weight.shape[0] * (32 + ql.w_bits) for k, ql in layers.items())
            assert info["size_mb"] == bits / 8 / 2**20
    _, at3 = quantize(cnn, allocator="dp", avg_wbits=3.0, bits=[2, 4, 8])
    _, by_size = quantize(cnn, allocator="dp", size_mb=at3["size_mb"], bits=[2, 4, 8])
    assert by_size["size_mb"] <= at3["size_mb"] and by_size["mp_objective"] <= at3["mp_objective"] + 1e-12
    _, four = quantize(cnn, allocator="uniform", avg_wbits=5.0, bits=[2, 4, 8])
    assert four["mp_bits"] == [8, 4, 4, 4, 4, 8]  # the widest uniform plan below the budget


def test_sensitivity_is_zero_at_16_bits_and_grows_as_bits_fall(cnn, monkeypatch):
    model, x, calib, _ = cnn
    planner = MixedPrecision(allocator="dp", avg_wbits=8.0, bits=[2, 4, 8, 16], cache=False)
    seen, sensitivities = {}, mixed.sensitivities

    def probe(*args):
        seen["kl"] = kl = sensitivities(*args)
        return kl

    monkeypatch.setattr(mixed, "sensitivities", probe)
    dfq_bench.quantize(model, "rtn", wbits=4, abits=None, example_input=x, calib=calib, planner=planner)
    kl = seen["kl"]
    assert kl.shape == (4, 4) and bool((kl[:, 3] < 1e-7).all())
    assert bool((kl[:, :3] > kl[:, 1:]).all())  # 2 > 4 > 8 > 16 bits, every allocated layer


def test_the_downstream_replay_computes_what_whole_forwards_compute(cnn, monkeypatch):
    model, x, calib, _ = cnn
    seen, sensitivities = [], mixed.sensitivities
    for kw in ({"replay": False}, {}, {"max_env_bytes": 200_000}):  # the last: chunks of a few images
        monkeypatch.setattr(mixed, "sensitivities", lambda *a, kw=kw: seen.append(sensitivities(*a, **kw)) or seen[-1])
        dfq_bench.quantize(model, "squant", wbits=4, abits=None, example_input=x, calib=calib,
                           planner=MixedPrecision(allocator="dp", cache=False))
    assert torch.equal(seen[0], seen[1]) and torch.allclose(seen[0], seen[2], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_each_layer_takes_at_most_2_to_the_k_levels(cnn, method):
    qmodel, info = quantize(cnn, method, allocator="dp", avg_wbits=3.0, bits=[2, 4, 8])
    assert len(set(info["mp_bits"][1:-1])) > 1  # a mixed plan
    for ql, k in zip(in_plan_order(cnn, qmodel).values(), info["mp_bits"], strict=True):
        w = ql.layer.weight.detach().reshape(ql.layer.weight.shape[0], -1)
        assert ql.w_bits == k and max(len(torch.unique(row)) for row in w) <= 2**k
        levels = ql.weight_levels()
        assert int(levels.min()) >= -(2 ** (k - 1)) and int(levels.max()) <= 2 ** (k - 1) - 1


def test_the_same_seed_gives_the_same_plan(cnn):
    plans = [quantize(cnn, allocator="random", avg_wbits=4.0, seed=s)[1]["mp_bits"] for s in (0, 0, 1, 2, 3)]
    assert plans[0] == plans[1] and len({tuple(p) for p in plans}) > 1
    assert quantize(cnn, allocator="dp", avg_wbits=3.5)[1]["mp_bits"] == quantize(cnn, allocator="dp",
                                                                                 avg_wbits=3.5)[1]["mp_bits"]


def test_sensitivities_are_cached_and_an_unwritable_cache_is_a_warning(cnn, tmp_path, caplog):
    model, x, calib, _ = cnn
    kw = dict(wbits=4, example_input=x, calib=calib)
    _, miss = dfq_bench.quantize(model, "squant", abits=8, **kw,
                                 planner=MixedPrecision(allocator="dp", avg_wbits=3.0, cache_dir=str(tmp_path)))
    _, hit = dfq_bench.quantize(model, "squant", abits=4, **kw,  # the activation bits are not in the key
                                planner=MixedPrecision(allocator="greedy", avg_wbits=4.0, cache_dir=str(tmp_path)))
    assert miss["mp_sensitivity"]["cache"] == "miss" and hit["mp_sensitivity"]["cache"] == "hit"
    assert hit["mp_sensitivity"]["cache_file"] == miss["mp_sensitivity"]["cache_file"]
    _, other = dfq_bench.quantize(model, "rtn", abits=8, **kw,  # another method's rounding: its own entry
                                  planner=MixedPrecision(allocator="dp", avg_wbits=3.0, cache_dir=str(tmp_path)))
    assert other["mp_sensitivity"]["cache"] == "miss"
    blocked = tmp_path / "file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING):
        _, info = dfq_bench.quantize(model, "rtn", abits=8, **kw,
                                     planner=MixedPrecision(allocator="dp", avg_wbits=3.0, cache_dir=str(blocked)))
    assert info["mp_sensitivity"]["cache"] == "miss" and "cache_error" in info["mp_sensitivity"]
    assert info["mp_bits"] == other["mp_bits"] and "cannot write sensitivity cache" in caplog.text
    with pytest.raises(ValueError, match="callable source"):
        dfq_bench.quantize(model, "rtn", wbits=4, abits=None, example_input=x, calib=lambda state: calib,
                           planner=MixedPrecision(allocator="dp", cache=False))


# --- config, runner, CLI -------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["mp.allocator=dpp"], "mp.allocator='dpp' is invalid; valid: none, dp, greedy, random, uniform"),
    (["mp.avg_wbits=3"], "mp.avg_wbits=3.0 is set but mp.allocator=none"),
    (["mp.allocator=dp", "mp.avg_wbits=3", "mp.size_mb=1"], "are both set; valid: one budget"),
    (["mp.allocator=dp", "mp.avg_wbits=1.5"], "mp.avg_wbits=1.5 is below the smallest plan .* valid: 2..8"),
    (["mp.allocator=dp", "mp.avg_wbits=9"], "mp.avg_wbits=9.0 is above the largest plan"),
    (["mp.allocator=dp", "wbits=2", "mp.bits=[4,8]"], r"wbits \(the budget\)=2 is below the smallest plan"),
    (["mp.allocator=dp", "mp.bits=[1,4]"], r"mp.bits=1 is invalid; valid: an integer in 2..16"),
    (["mp.allocator=dp", "mp.bits=[4,4]"], "mp.bits=\\[4, 4\\] is invalid; valid: distinct"),
    (["mp.allocator=dp", "mp.size_mb=0"], "mp.size_mb=0.0 is invalid; valid: a size in MB > 0"),
    (["mp.allocator=dp", "mp.bin_bits=0"], "mp.bin_bits=0 is invalid"),
    (["mp.allocator=dp", "mp.bits=[4,16]", "deploy=onnxruntime"], "integer kernels take at most 8"),
    (["mp.allocator=dp", "method=rex"], "method rex cannot run with mp.allocator=dp"),
])
def test_bad_mp_keys_are_one_line_errors_up_front(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate_config(compose_cfg([*TINY, *overrides]))
    assert "\n" not in str(e.value)


def test_run_ids_without_mp_are_unchanged_and_a_size_budget_out_of_reach_writes_no_row(tmp_path):
    plain = compose_cfg([*TINY, "method=rtn"])
    assert "mp" not in identity_config(plain)
    assert run_id(plain) == run_id(compose_cfg([*TINY, "method=rtn", "mp.allocator=none", "mp.bits=[2,4]"]))
    dp = compose_cfg([*TINY, "method=rtn", "mp.allocator=dp"])
    assert identity_config(dp)["mp"] == {"allocator": "dp", "avg_wbits": 4.0, "size_mb": None,
                                         "bits": [2, 3, 4, 6, 8], "bin_bits": None}
    assert run_id(dp) == run_id(compose_cfg([*TINY, "method=rtn", "mp.allocator=dp", "mp.avg_wbits=4",
                                             "mp.cache=false", "mp.seed=5"]))  # seed: random only
    assert run_id(dp) != run_id(plain) != run_id(compose_cfg([*TINY, "method=rtn", "mp.allocator=uniform"]))
    big = compose_cfg([*TINY, "method=rtn", "mp.allocator=dp", "mp.size_mb=5", f"results_dir={tmp_path}"])
    validate_config(big)
    with pytest.raises(UnsupportedError, match=r"mp.size_mb=5.0 is above the largest plan of test_cnn .* valid: "):
        run(big)
    assert rows_in(tmp_path) == []


def test_cli_frontier_is_a_multirun_over_the_budget_with_one_sensitivity_pass(tmp_path):
    out = cli(["-m", *TINY, "method=rtn", "abits=null", "mp.allocator=dp", "mp.avg_wbits=2.5,4",
               f"mp.cache_dir={tmp_path / 'cache'}", f"results_dir={tmp_path}",
               f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = rows_in(tmp_path)
    assert [r["mp"]["avg_wbits"] for r in rows] == [2.5, 4.0] and all(r["status"] == "ok" for r in rows)
    assert set(fields("mixed precision")) <= set(rows[0])
    assert [r["mp_sensitivity"]["cache"] for r in rows] == ["miss", "hit"]
    assert rows[0]["data"]["name"] == "noise" and rows[0]["t_synth_s"] > 0  # made for the planner (weight-only)
    assert rows[0]["size_mb"] < rows[1]["size_mb"] and rows[0]["mp_bits"][0] == rows[0]["mp_bits"][-1] == 8
    assert json.loads(json.dumps(rows[1]["mp_budget"]))["exact"] is True


def test_deploy_runs_on_a_mixed_plan_of_at_most_8_bits(tmp_path):
    pytest.importorskip("onnxruntime")
    cfg = compose_cfg([*TINY, "dataset.batch_size=32", "method=squant", "abits=8", "mp.allocator=dp",
                       "mp.avg_wbits=3", "mp.cache=false", "deploy=onnxruntime", f"results_dir={tmp_path}"])
    validate_config(cfg)
    row = run(cfg, run_dir=tmp_path / "run")
    assert row["status"] == "ok" and len(set(row["mp_bits"])) > 2
    assert row["agree_int"] >= 95.0 and row["n_int_ops"] >= len(row["mp_bits"]) - 1  # the stem may stay float
    assert 0.0 <= row["max_logit_diff"] < 0.5
