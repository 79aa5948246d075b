"""Where activation quantizers sit (``protocol.a_placement``, core.modules.install_act_quants): ``layer_input``
(the core's, unchanged) and ``after_relu`` (the zero-shot QAT references' and ZeroQ's: after every ReLU/ReLU6,
nowhere else; protocol=zsqat_paper).

Oracles written here: the ReLU outputs of the weight-quantized model recorded by hooks before any activation
quantizer exists, their min/max, and the asymmetric fake-quant formula of a [0, hi] range.
"""

import copy

import pytest
import torch
from dfq_bench.methods.rtn import RTN
from helpers import cli, compose_cfg, make_method, quant_ctx, rows_in
from torch import nn

from dfq_bench.config import ConfigError, validate_config
from dfq_bench.core.modules import ActAfter, ActQuant, EmaActQuant, quant_layers
from dfq_bench.models.test_cnn import make_test_cnn
from dfq_bench.run.runner import run_id

PAPER = {"last_abits": None, "first_wbits": None, "last_wbits": None}


def _batch(n=32, seed=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _quantize(abits=4, placement="after_relu", **proto):
    x = _batch()
    model = make_test_cnn(0)
    ctx = quant_ctx(4, abits, x[:2], calib=[x[:16], x[16:]], a_placement=placement, **{**PAPER, **proto})
    return model, RTN().quantize(model, ctx), x


def _relu_outputs(model: nn.Module, x: torch.Tensor) -> dict:
    """Every ReLU/ReLU6 module's outputs on ``x`` (a module called twice: both outputs), by module name."""
    outs, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            handles.append(m.register_forward_hook(lambda mod, a, out, name=name: outs.setdefault(name, []).append(
                out.detach().clone())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


def test_after_relu_puts_one_quantizer_after_each_relu_module_and_none_at_layer_inputs():
    _, qmodel, _ = _quantize()
    sites = {n: m for n, m in qmodel.named_modules() if isinstance(m, ActAfter)}
    # test_cnn: stem ReLU, the shared self.relu (called twice, one quantizer), dw's ReLU6, pw's ReLU
    assert sorted(sites) == ["dw.2", "pw.2", "relu", "stem.2"]
    assert [type(s.act) for s in sites.values()] == [nn.ReLU, nn.ReLU, nn.ReLU6, nn.ReLU]
    assert all(type(s.act_quant) is ActQuant and s.act_quant.state == "on" and s.act_quant.bits == 4
               for s in sites.values())
    assert all(q.act_quant is None for q in quant_layers(qmodel).values())
    assert [type(m) for m in qmodel.modules() if isinstance(m, ActQuant)].count(ActQuant) == 4


def test_after_relu_ranges_are_the_relu_outputs_min_max_and_outputs_the_fake_quant_formula():
    x = _batch()
    calib = [x[:16], x[16:]]
    model = make_test_cnn(0)
    # the same model with the same weight grid, activations float: the ReLU outputs the range rule sees
    wq = RTN().quantize(copy.deepcopy(model), quant_ctx(4, None, x[:2], **PAPER))
    seen = {}
    for b in calib:
        for name, outs in _relu_outputs(wq, b).items():
            seen.setdefault(name, []).extend(outs)
    qmodel = RTN().quantize(model, quant_ctx(4, 4, x[:2], calib=calib, a_placement="after_relu", **PAPER))
    for name, outs in seen.items():
        aq = qmodel.get_submodule(name).act_quant
        hi = max(float(o.max()) for o in outs)
        assert min(float(o.min()) for o in outs) == 0.0 and (aq.lo, aq.hi) == (0.0, pytest.approx(hi, rel=1e-6))
        s = hi / 15  # asymmetric 4-bit grid of [0, hi]: zero-point 0
        assert float(aq.scale) == pytest.approx(s, rel=1e-6) and int(aq.zero_point) == 0
    # the first ReLU's output, quantized: the formula on the float ReLU output, <= 16 distinct values
    stem = qmodel.get_submodule("stem.2")
    got = _relu_outputs(qmodel, x)  # hooks on the inner ReLUs: what enters each quantizer
    with torch.no_grad():
        out = stem(got["stem.2.act"][0])  # not hooked twice: ActAfter holds the ReLU as .act
    s = float(stem.act_quant.scale)
    torch.testing.assert_close(out, torch.clamp(torch.round(got["stem.2.act"][0] / s), 0, 15) * s)
    assert out.unique().numel() <= 16


def test_layer_input_placement_is_unchanged():
    _, default, x = _quantize(placement="layer_input")
    model = make_test_cnn(0)
    plain = RTN().quantize(model, quant_ctx(4, 4, x[:2], calib=[x[:16], x[16:]], **PAPER))
    assert not any(isinstance(m, ActAfter) for m in default.modules())
    names = [n for n, q in quant_layers(default).items() if q.act_quant is not None]
    assert names == [n for n, q in quant_layers(plain).items() if q.act_quant is not None]
    assert "stem.0" not in names and "fc" in names  # the image float, every other layer input quantized
    with torch.no_grad():
        torch.testing.assert_close(default(x), plain(x), rtol=0, atol=0)


def test_after_relu_changes_the_function_and_leaves_residual_adds_float():
    model, qmodel, x = _quantize()
    _, inputs, _ = _quantize(placement="layer_input")
    with torch.no_grad():
        assert not torch.equal(qmodel(x), inputs(x))
        # the add x + bn2(conv2(y)) is not quantized: what the shared relu passes on at its second call holds
        # more than 16 values, its quantizer's output at most 16
        seen = _relu_outputs(qmodel, x)["relu.act"]
        after = qmodel.relu(seen[1])
    assert seen[1].unique().numel() > 16 and after.unique().numel() <= 16


def test_reference_ema_quantizers_sit_after_relu_under_zsqat_paper():
    from helpers import protocol

    from dfq_bench.core.method import QuantContext

    x = _batch(16)
    method = make_method("gdfq", quantizer="reference", epochs=1, warmup_epochs=1, iters_per_epoch=2, batch_size=4,
                         calib_images=8, eval_images=8, samples="noise")
    ctx = QuantContext(4, 4, protocol(**PAPER, a_placement="after_relu", fold_bn=False), 0, "cpu", x[:2],
                       calib=[x])
    qmodel = method.quantize(make_test_cnn(0), ctx)
    sites = {n: m for n, m in qmodel.named_modules() if isinstance(m, ActAfter)}
    assert sorted(sites) == ["dw.2", "pw.2", "relu", "stem.2"]
    assert all(type(s.act_quant) is EmaActQuant and s.act_quant.n_updates > 0 and s.act_quant.state == "on"
               for s in sites.values())
    assert all(q.act_quant is None for q in quant_layers(qmodel).values())


def test_zsqat_paper_sets_after_relu_and_default_run_ids_stay():
    assert compose_cfg(["protocol=zsqat_paper"]).protocol.a_placement.value == "after_relu"
    assert compose_cfg([]).protocol.a_placement.value == "layer_input"
    base = ["method=rtn", "model=resnet20_fmnist", "wbits=4", "abits=4"]
    assert run_id(compose_cfg(base)) == run_id(compose_cfg([*base, "protocol.a_placement=layer_input"]))
    assert run_id(compose_cfg(base)) != run_id(compose_cfg([*base, "protocol.a_placement=after_relu",
                                                            "protocol.last_abits=null"]))


@pytest.mark.parametrize("overrides, message", [
    (["method=genie_cpu"], "protocol.a_placement='after_relu' is not supported by method genie"),
    (["method=dfq"], "protocol.a_placement='after_relu' is invalid: act_range rule 'bn'"),
    (["method=rtn", "protocol.last_abits=8"], "protocol.a_placement='after_relu' is invalid: every ReLU output is "
                                              "quantized at abits=4, not protocol.last_abits=8"),
    (["method=rtn", "deploy=onnxruntime", "protocol.w_range=include_zero"],
     "protocol.a_placement='after_relu' is invalid: deploy=onnxruntime"),
    (["method=rtn", "mp.allocator=dp"], "protocol.a_placement='after_relu' is invalid: mixed precision"),
    (["method=rtn", "protocol.a_placement=before_relu"], None),
])
def test_after_relu_refusals_are_one_line_config_errors(overrides, message):
    if message is None:  # an unknown value is Hydra's enum error
        with pytest.raises(Exception, match="before_relu"):
            compose_cfg(overrides)
        return
    cfg = compose_cfg(["protocol.a_placement=after_relu", "protocol.last_abits=null", "wbits=4", "abits=4",
                       *overrides])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, [])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_cli_after_relu_row_records_the_placement(tmp_path):
    out = tmp_path / "r"
    args = ["method=rtn", "model=test_cnn", "dataset=fake", "dataset.num_samples=64", "wbits=4", "abits=4",
            "protocol.last_abits=null", f"results_dir={out}"]
    for extra in ([], ["protocol.a_placement=after_relu"]):
        proc = cli([*args, *extra], tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
    inputs, relu = rows_in(out)
    assert relu["status"] == "ok" and relu["protocol"]["a_placement"] == "after_relu"
    assert inputs["protocol"]["a_placement"] == "layer_input"
    assert (inputs["n_act_quant"], relu["n_act_quant"]) == (5, 4)  # 6 layers minus the image's; 4 ReLU modules
    assert "protocol.a_placement=after_relu" in relu["command"] and "a_placement" not in inputs["command"]
    assert relu["run_id"] != inputs["run_id"]
    assert (relu["top1"], relu["kl_fp32"]) != (inputs["top1"], inputs["kl_fp32"])


def test_cli_refuses_after_relu_with_genie_before_building_a_model(tmp_path):
    out = tmp_path / "r"
    proc = cli(["method=genie_cpu", "model=test_cnn", "dataset=fake", "wbits=4", "abits=4",
                "protocol.a_placement=after_relu", "protocol.last_abits=null", f"results_dir={out}"], tmp_path,
               timeout=120)
    assert proc.returncode == 2 and rows_in(out) == []
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: protocol.a_placement='after_relu' is not supported by method genie")
