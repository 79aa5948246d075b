"""GDFQ (methods/gdfq.py) and its building blocks: the generator and the BN-statistics loss
(calib/generator.py), the alternating loop (train/zeroshot.py).

Oracles are written here: the BN-statistics loss by hand from the layers, the levels of the fine-tuned
weights counted per channel, the curve's last point recomputed on the same images. Runs are tiny
(an 8x8 two-BN CNN, a few iterations), so the file takes seconds.
"""

import math

import pytest
import torch
from helpers import cli, compose_cfg, rows_in
from torch import nn
from torch.nn.utils import parametrize

import dfq_bench
from dfq_bench.calib.bnstats import InputStats
from dfq_bench.calib.generator import Generator, bn_stats_loss
from dfq_bench.config import ConfigError, UnsupportedError, validate_config
from dfq_bench.core.modules import quant_layers


def tiny_bn_net(seed=0, classes=5):
    """conv-BN-ReLU, conv-BN-ReLU, pool, linear on 3x8x8 inputs, with seeded non-trivial BN statistics."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.4)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(8, generator=g) + 0.5)
                m.weight.copy_(torch.rand(8, generator=g) + 0.5)
                m.bias.copy_(torch.randn(8, generator=g) * 0.2)
    return net.eval()


X = torch.zeros(2, 3, 8, 8)
FAST = dict(epochs=4, warmup_epochs=1, iters_per_epoch=8, batch_size=16, calib_images=32, eval_images=None)


def eval_set(seed=1, n=64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(n // 32)]


def run_gdfq(seed=0, wbits=4, abits=4, **keys):
    return dfq_bench.quantize(tiny_bn_net(), "gdfq", wbits=wbits, abits=abits, example_input=X, seed=seed,
                              eval_data=eval_set(), **{**FAST, **keys})


@pytest.mark.parametrize("size,classes,cbn,first", [((1, 28, 28), 10, False, 7), ((3, 32, 32), 100, False, 8),
                                                    ((1, 32, 32), 10, False, 8), ((3, 224, 224), 1000, True, 56)])
def test_generator_output_shape_and_range(size, classes, cbn, first):
    torch.manual_seed(0)
    gen = Generator(size, classes)
    assert gen.conditional is cbn and (gen.h0, gen.w0) == (first, first)
    assert gen.linear.out_features == 128 * first * first
    assert all(getattr(bn, "bn", bn).eps == 0.8 for bn in (gen.bn1, gen.bn2))
    z, y = gen.draw(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = gen(z, y)  # train mode: the last BN (no affine) standardises each channel over the batch
        assert x.shape == (4, *size) and bool(torch.isfinite(x).all())
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        assert mean.abs().max() < 1e-4 and bool(((var > 0.99) & (var <= 1.0 + 1e-5)).all())
        gen.eval()  # fresh running statistics (0, 1): tanh's range, divided by sqrt(1 + eps)
        x = gen(z, y)
        assert x.shape == (4, *size) and float(x.abs().max()) < 1.0
        if cbn:  # its per-class gammas start at 1 (no effect yet): give them the spread training would
            gen.bn1.gamma.weight.normal_(1.0, 0.5, generator=torch.Generator().manual_seed(1))
            x = gen(z, y)
        assert not torch.equal(gen(z, (y + 1) % classes), x)  # the label conditions the image


def test_bn_statistics_loss_equals_the_formula_written_out():
    net = tiny_bn_net()
    bns = [net[1], net[4]]
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    hooks = InputStats(bns)
    net(x)
    got = bn_stats_loss(hooks.modules, hooks.inputs)
    hooks.remove()
    with torch.no_grad():  # the BN inputs by hand, then the mean and biased variance per channel by hand
        a1 = net[0](x)
        a2 = net[3](torch.relu(net[1](a1)))
        terms = []
        for a, bn in ((a1, bns[0]), (a2, bns[1])):
            c = a.shape[1]
            flat = a.transpose(0, 1).reshape(c, -1)
            mu = flat.sum(1) / flat.shape[1]
            var = ((flat - mu[:, None]) ** 2).sum(1) / flat.shape[1]
            terms.append(((mu - bn.running_mean) ** 2).sum() / c + ((var - bn.running_var) ** 2).sum() / c)
        expected = (terms[0] + terms[1]) / 2
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_finetuned_weights_stay_on_the_grid_and_the_student_loss_falls():
    qmodel, info = run_gdfq(wbits=3, lr_student=0.05, epochs=5)
    rtn, _ = dfq_bench.quantize(tiny_bn_net(), "rtn", wbits=3, abits=4, example_input=X, calib=[X])
    moved = 0
    for name, ql in quant_layers(qmodel).items():
        assert not parametrize.is_parametrized(ql.layer)  # plain weights, written on the grid
        lv = ql.weight_levels()
        assert torch.allclose(lv, lv.round(), atol=1e-4) and lv.min() >= ql.w_qmin and lv.max() <= ql.w_qmax
        rows = lv.round().reshape(lv.shape[0], -1)
        assert max(len(torch.unique(r)) for r in rows) <= 2 ** ql.w_bits
        moved += int((lv.round() != quant_layers(rtn)[name].weight_levels().round()).sum())
    assert moved > 0  # the fine-tuning changed levels
    assert info["n_student_steps"] == 4 * 8 and info["loss_student"][0] is None  # warm-up: generator only
    trained = info["loss_student"][1:]
    assert all(math.isfinite(v) for v in trained) and trained[-1] < 0.8 * trained[0], trained
    assert info["act_range"] == "minmax" and info["n_act_quant"] == 2


def test_accuracy_curve_best_epoch_and_last_point():
    qmodel, info = run_gdfq(lr_student=0.05)
    curve, epochs = info["top1_curve"], info["top1_curve_epochs"]
    assert epochs == [1, 2, 3, 4] and len(curve) == 4 and info["curve_n_eval"] == 64
    assert info["top1_best_epoch"] == max(curve) and curve[epochs.index(info["best_epoch"])] == max(curve)
    with torch.no_grad():  # the last point is the returned model on the same images
        right = sum(int((qmodel(x).argmax(1) == y).sum()) for x, y in eval_set())
    assert curve[-1] == pytest.approx(100.0 * right / 64)


def test_same_seed_same_result_other_seed_differs():
    (a, ia), (b, ib) = run_gdfq(seed=3, epochs=2), run_gdfq(seed=3, epochs=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ia["loss_student"] == ib["loss_student"] and ia["top1_curve"] == ib["top1_curve"]
    c, ic = run_gdfq(seed=4, epochs=2)
    assert ic["loss_generator"] != ia["loss_generator"]


def test_a_model_without_batchnorm_is_refused_up_front():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    with pytest.raises(UnsupportedError, match="no BatchNorm layer"):
        dfq_bench.quantize(net, "gdfq", wbits=4, abits=4, example_input=X)


@pytest.mark.parametrize("override,message", [
    ("method.temperature=0", "method.temperature=0.0 is invalid; valid: a number > 0"),
    ("method.batch_size=1", "method.batch_size=1 is invalid; valid: an integer >= 2 (BN statistics of a batch)"),
    ("method.milestones=[3,1]", "method.milestones=[3, 1] is invalid; valid: ascending integers >= 0"),
    ("method.conditioning=film", "method.conditioning='film' is invalid; valid: auto, multiply, cbn"),
    ("method.eval_images=0", "method.eval_images=0 is invalid; valid: an integer >= 1, or null (all)"),
])
def test_bad_key_is_a_one_line_config_error(override, message):
    overrides = ["method=gdfq_cpu", override]
    with pytest.raises(ConfigError) as e:
        validate_config(compose_cfg(overrides), overrides)
    assert str(e.value) == message


def test_cli_bad_value_exit_2_no_row_and_a_real_row(tmp_path):
    out = tmp_path / "results"
    proc = cli(["method=gdfq_cpu", "model=test_cnn", "dataset=fake", "method.momentum=1", f"results_dir={out}"],
               tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: method.momentum=1.0 is invalid; valid: a number in [0, 1)"]
    assert not out.exists()
    proc = cli(["method=gdfq_cpu", "model=test_cnn", "dataset=fake", "dataset.num_samples=64", "method.epochs=2",
                "method.iters_per_epoch=2", "method.batch_size=8", "method.calib_images=16", "method.eval_images=32",
                f"results_dir={out}"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = rows_in(out)
    assert row["status"] == "ok" and row["method_cfg"]["preset"] == "cpu" and row["curve_n_eval"] == 32
    assert row["top1_curve_epochs"] == [1, 2] and row["top1_best_epoch"] == max(row["top1_curve"])
    assert row["best_epoch"] in (1, 2) and row["n_eval"] == 64 and row["generator"]["conditioning"] == "multiply"
