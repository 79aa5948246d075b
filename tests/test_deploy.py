"""Deployed-integer check (deploy/): the ONNX file holds exactly our integer levels, scales and
zero-points; ORT's optimized graph runs integer convolutions; the integer model's levels and
logits stay within the requantization error of the fake-quant simulation, with the bound derived
from the levels ORT actually computed."""

import copy

import numpy as np
import pytest
import torch
from dfq_bench.methods.rtn import RTN
from helpers import compose_cfg, quant_ctx
from torch import nn

from dfq_bench import deploy
from dfq_bench.config import ConfigError, validate_config
from dfq_bench.core.modules import quant_layers
from dfq_bench.models.test_cnn import make_test_cnn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
numpy_helper = onnx.numpy_helper


def _quantize(wbits, abits, **proto):
    model = make_test_cnn(0)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    qmodel = RTN().quantize(model, quant_ctx(wbits, abits, x[:2], calib=[x], **proto))
    return model, qmodel, x


def _with_level_outputs(exp: deploy.Exported, path):
    """The exported model with every layer's uint8 input levels as extra graph outputs."""
    m = onnx.load(str(exp.path))
    for value in dict.fromkeys(exp.act_levels.values()):
        m.graph.output.append(onnx.helper.make_tensor_value_info(value, onnx.TensorProto.UINT8, None))
    onnx.save(m, str(path))
    return path


def _sim_levels(qmodel, x, forced: dict | None = None) -> tuple[dict, torch.Tensor]:
    """Reference levels at each quantized layer's input, recomputed here from the inputs the
    simulation sees: clamp(round(x / s) + z, qmin, qmax), shifted to uint8 for a signed grid.

    ``forced``: uint8 levels per layer (ORT's); each quantizer then outputs those instead of its
    own, so that every layer's reference is computed from the same inputs ORT had (layer-local)."""
    seen, hooks = {}, []
    for name, ql in quant_layers(qmodel).items():
        if ql.act_quant is None:
            continue

        def hook(aq, inp, out, name=name):
            shift = 128 if aq.qmin < 0 else 0
            seen[name] = torch.clamp(torch.round(inp[0] / aq.scale) + aq.zero_point, aq.qmin, aq.qmax) + shift
            if forced is not None:
                return (forced[name] - shift - aq.zero_point) * aq.scale

        hooks.append(ql.act_quant.register_forward_hook(hook))
    with torch.no_grad():
        logits = qmodel(x)
    for h in hooks:
        h.remove()
    return seen, logits


@pytest.mark.parametrize("wbits,proto", [(4, {}), (8, {}), (8, {"w_symmetric": True}),
                                         (4, {"w_granularity": "per_tensor"})])
def test_weights_in_the_file_decode_to_our_exact_levels(tmp_path, wbits, proto):
    _, qmodel, x = _quantize(wbits, 8, first_wbits=None, last_wbits=None, **proto)
    exp = deploy.export(qmodel, x[:2], tmp_path / "m.onnx")
    stored = deploy.read_weight_levels(exp.path)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(exp.path)).graph.initializer}
    layers = {n: m for n, m in quant_layers(qmodel).items() if m.w_bits is not None}
    assert set(stored) == set(layers)
    for name, ql in layers.items():
        levels = ql.weight_levels().detach()
        assert torch.equal(levels, levels.round())
        assert levels.min() >= -(2 ** (wbits - 1)) and levels.max() <= 2 ** (wbits - 1) - 1
        np.testing.assert_array_equal(stored[name], levels.numpy().astype(np.int32))
        np.testing.assert_array_equal(inits[f"{name}.w_scale"], ql.w_scale.reshape(inits[f"{name}.w_scale"].shape))
        zp = inits[f"{name}.w_zero_point"]
        assert zp.dtype == np.int8
        np.testing.assert_array_equal(zp, ql.w_zero_point.reshape(zp.shape).numpy().astype(np.int8))
    exp.path.unlink()


def _int32_biases(qmodel) -> dict:
    """Reference int32 biases: round(b / (s_x * s_w[c])), for layers with a quantized input."""
    out = {}
    for name, ql in quant_layers(qmodel).items():
        if ql.act_quant is not None and ql.w_bits is not None and ql.layer.bias is not None:
            ps = ql.act_quant.scale.double() * ql.w_scale.reshape(-1).double()
            out[name] = (torch.round(ql.layer.bias.detach().double() / ps), ps)
    return out


def _ort_levels(exp, tmp_path, x):
    sess = deploy.session(_with_level_outputs(exp, tmp_path / "probe.onnx"), tmp_path / "opt.onnx")
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x.numpy()}), strict=True))
    levels = {name: torch.from_numpy(outs[v].astype(np.float32)) for name, v in exp.act_levels.items()}
    return levels, torch.from_numpy(outs["logits"])


@pytest.mark.parametrize("wbits,abits,proto", [
    (8, 8, {}),
    (4, 4, {}),
    (6, 6, {}),
    (4, 4, {"a_symmetric": True, "quantize_first_input": True, "fold_bn": False}),
])
def test_integer_levels_and_logits_stay_within_requantization_error(tmp_path, wbits, abits, proto):
    """The documented differences, each checked on its own.

    1. Biases: the file holds round(b / (s_x s_w[c])) in int32, half a product step at most from
       the simulation's float bias.
    2. Arithmetic: against a simulation given those same int32 biases, and layer by layer (each
       reference computed from ORT's own levels upstream), ORT's levels are the simulation's or
       one away at near-ties only (the int32 -> uint8 requantization of a fused QLinearConv, x/s
       vs x*(1/s), float summation order): at most 1e-4 of the values.
    3. Free-running, against the row's simulation (float biases), flips propagate; the logits then
       differ by at most what the observed flips at the last layer's input and its bias rounding
       can move them: |dlogit_j| <= s_x s_wj (sum_k |dq_k| |w_jk - z_j| + 1/2), plus float error.
    """
    _, qmodel, x = _quantize(wbits, abits, **proto)
    exp = deploy.export(qmodel, x[:2], tmp_path / "m.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(exp.path)).graph.initializer}
    biases = _int32_biases(qmodel)
    assert biases
    rounded = copy.deepcopy(qmodel)
    for name, (b_int, ps) in biases.items():
        np.testing.assert_array_equal(inits[f"{name}.b_q"].reshape(-1), b_int.numpy().astype(np.int32))
        assert ((b_int * ps - qmodel.get_submodule(name).layer.bias.double()).abs() <= 0.5 * ps + 1e-12).all()
        rounded.get_submodule(name).layer.bias.data = (b_int * ps).float()
    sim32 = deploy.with_int32_biases(qmodel)  # the row's int32-bias simulation is this reference
    for name, m in quant_layers(rounded).items():
        if m.layer.bias is not None:
            torch.testing.assert_close(sim32.get_submodule(name).layer.bias, m.layer.bias, rtol=1e-6, atol=0)

    q_ort, logits_int = _ort_levels(exp, tmp_path, x)
    assert deploy.op_counts(tmp_path / "opt.onnx").get("QLinearConv", 0) == exp.n_requantized
    ref, _ = _sim_levels(rounded, x, forced=q_ort)
    assert set(ref) == set(q_ort)
    for name, q_sim in ref.items():
        diff = (q_ort[name] - q_sim).abs()
        assert diff.max() <= 1 and diff.mean() <= 1e-4, name

    ref, logits_sim = _sim_levels(qmodel, x)
    fc = qmodel.fc
    aq = fc.act_quant
    dq = q_ort["fc"] - ref["fc"]
    w = (fc.weight_levels().detach() - fc.w_zero_point).abs()  # (classes, features)
    prod = aq.scale * fc.w_scale.reshape(-1)
    bound = prod * (dq.abs() @ w.T + 0.5) + 1e-5 * (1 + logits_sim.abs())
    assert ((logits_int - logits_sim).abs() <= bound).all()
    assert (logits_int.argmax(1) == logits_sim.argmax(1)).float().mean() >= 0.95


def test_optimized_graph_runs_every_quantized_conv_in_integer(tmp_path):
    _, qmodel, x = _quantize(4, 4)
    exp = deploy.export(qmodel, x[:2], tmp_path / "m.onnx")
    # test_cnn: conv1->ReLU->conv2 and dw->ReLU6->pw feed the next quantizer directly (requantized);
    # conv2 (residual add) and pw (pooling) do not; the stem's input is float (protocol)
    assert (exp.n_quant_layers, exp.n_requantized, exp.n_conv_integer, exp.n_float_layers) == (6, 2, 2, 1)
    deploy.session(exp.path, tmp_path / "opt.onnx")
    ops = deploy.op_counts(tmp_path / "opt.onnx")
    assert ops.get("QLinearConv") == 2 and ops.get("ConvInteger") == 2 and ops.get("QGemm") == 1
    assert sum(ops.get(k, 0) for k in deploy.FLOAT_COMPUTE_OPS) == 1  # the stem only
    # without the ConvInteger lowering ORT leaves the non-requantized convs as float Conv
    exp2 = deploy.export(qmodel, x[:2], tmp_path / "qdq.onnx", conv_integer=False)
    deploy.session(exp2.path, tmp_path / "qdq_opt.onnx")
    ops2 = deploy.op_counts(tmp_path / "qdq_opt.onnx")
    assert ops2.get("ConvInteger", 0) == 0 and ops2.get("QLinearConv") == 2
    assert sum(ops2.get(k, 0) for k in deploy.FLOAT_COMPUTE_OPS) == 3


def test_max_pooling_runs_on_the_levels_so_the_conv_before_it_fuses(tmp_path):
    """conv -> ReLU -> MaxPool -> quantizer: max pooling commutes with the monotone quantizer, so
    the conv is requantized (QLinearConv) and MaxPool runs on uint8, with the same levels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    qmodel = RTN().quantize(model, quant_ctx(4, 4, x[:2], calib=[x], quantize_first_input=True))
    exp = deploy.export(qmodel, x[:2], tmp_path / "m.onnx")
    assert (exp.n_requantized, exp.n_conv_integer) == (2, 1)  # layer 6's output is average-pooled
    q_ort, _ = _ort_levels(exp, tmp_path, x)
    ops = deploy.op_counts(tmp_path / "opt.onnx")
    assert ops.get("QLinearConv") == 2 and ops.get("ConvInteger") == 1
    assert ops.get("MaxPool", 0) + ops.get("NhwcMaxPool", 0) == 2  # on uint8 (no float conv left)
    assert sum(ops.get(k, 0) for k in deploy.FLOAT_COMPUTE_OPS) == 0
    rounded = copy.deepcopy(qmodel)
    for name, (b_int, ps) in _int32_biases(qmodel).items():
        rounded.get_submodule(name).layer.bias.data = (b_int * ps).float()
    sim32 = deploy.with_int32_biases(qmodel)  # the row's int32-bias simulation is this reference
    for name, m in quant_layers(rounded).items():
        if m.layer.bias is not None:
            torch.testing.assert_close(sim32.get_submodule(name).layer.bias, m.layer.bias, rtol=1e-6, atol=0)
    ref, _ = _sim_levels(rounded, x, forced=q_ort)
    for name, q_sim in ref.items():
        diff = (q_ort[name] - q_sim).abs()
        assert diff.max() <= 1 and diff.mean() <= 1e-3, name


def test_eight_bit_asymmetric_weights_use_the_zero_point_correction(tmp_path):
    """W8 asymmetric: w - z_w[c] can leave int8, so the export subtracts z_w[c] * boxsum in int32;
    with requantization off every conv goes that way and the result is still the simulation's."""
    _, qmodel, x = _quantize(8, 8)
    exp = deploy.export(qmodel, x[:2], tmp_path / "m.onnx", requantize=False)
    nodes = onnx.load(str(exp.path)).graph.node
    corrected = {n.output[0].rsplit(".", 1)[0] for n in nodes if n.op_type == "Sub" and ".acc" in n.output[0]}
    assert len(corrected) >= 3  # conv1, conv2, dw, pw: whichever have a channel with |w - z| > 127
    rounded = copy.deepcopy(qmodel)
    for name, (b_int, ps) in _int32_biases(qmodel).items():
        rounded.get_submodule(name).layer.bias.data = (b_int * ps).float()
    sim32 = deploy.with_int32_biases(qmodel)  # the row's int32-bias simulation is this reference
    for name, m in quant_layers(rounded).items():
        if m.layer.bias is not None:
            torch.testing.assert_close(sim32.get_submodule(name).layer.bias, m.layer.bias, rtol=1e-6, atol=0)
    q_ort, logits_int = _ort_levels(exp, tmp_path, x)
    ref, logits_sim = _sim_levels(rounded, x, forced=q_ort)
    for name, q_sim in ref.items():
        diff = (q_ort[name] - q_sim).abs()
        assert diff.max() <= 1 and diff.mean() <= 1e-4, name  # ties only
    assert (logits_int - logits_sim).abs().max() <= 1e-4 * logits_sim.abs().max()


@pytest.mark.parametrize("wbits,abits,message", [
    (16, 8, "w_bits=16"),
    (8, 12, "a_bits=12"),
])
def test_unexportable_model_fails_with_a_clear_error(tmp_path, wbits, abits, message):
    _, qmodel, x = _quantize(wbits, abits, first_wbits=None, last_wbits=None, last_abits=None)
    with pytest.raises(deploy.ExportError, match=message) as e:
        deploy.export(qmodel, x[:2], tmp_path / "m.onnx")
    assert "\n" not in str(e.value) and "at most 8-bit" in str(e.value)


def test_weights_moved_off_their_grid_fail(tmp_path):
    _, qmodel, x = _quantize(4, 4)
    with torch.no_grad():
        qmodel.conv1.layer.weight.add_(0.3 * qmodel.conv1.w_scale)
    with pytest.raises(deploy.ExportError, match="'conv1'.*not on their quantization grid"):
        deploy.export(qmodel, x[:2], tmp_path / "m.onnx")


def test_runner_adds_the_deploy_fields_and_a_failed_export_fails_the_row(tmp_path):
    from dfq_bench.run.runner import run, run_id

    base = ["model=test_cnn", "dataset=fake", "dataset.num_samples=64", "dataset.batch_size=32",
            f"results_dir={tmp_path}"]
    cfg = compose_cfg([*base, "wbits=4", "abits=4", "deploy=onnxruntime"])
    validate_config(cfg)
    assert run_id(cfg) != run_id(compose_cfg([*base, "wbits=4", "abits=4"]))
    row = run(cfg, run_dir=tmp_path / "run")
    assert row["status"] == "ok" and row["deploy"] == "onnxruntime"
    assert row["int_ops"] == {"ConvInteger": 2, "QGemm": 1, "QLinearConv": 2} and row["n_int_ops"] == 5
    assert row["agree_int"] >= 95.0 and abs(row["top1_int"] - row["top1"]) <= 100.0 * 3 / 64
    assert 0.0 <= row["max_logit_diff"] < 0.5
    assert row["agree_int_sim_int32_bias"] >= row["agree_int"] - 100.0 * 2 / 64
    assert abs(row["top1_sim_int32_bias"] - row["top1_int"]) <= 100.0 * 2 / 64
    assert row["lat_batch"] == 32 and row["lat_threads"] == torch.get_num_threads()
    assert min(row["lat_fp32_torch_ms"], row["lat_fp32_ort_ms"], row["lat_int_ort_ms"]) > 0
    assert (tmp_path / "run" / "deploy" / "model_int.optimized.onnx").is_file()
    bad = compose_cfg([*base, "wbits=16", "protocol.first_wbits=null", "protocol.last_wbits=null",
                       "deploy=onnxruntime"])
    with pytest.raises(deploy.ExportError):
        run(bad)
    rows = [r for r in map(__import__("json").loads, (tmp_path / "runs.jsonl").read_text().splitlines())]
    assert rows[-1]["status"] == "failed" and rows[-1]["error"].startswith("ExportError: cannot export layer")


def test_unknown_deploy_target_is_a_config_error():
    with pytest.raises(ConfigError, match="^deploy='tensorrt' is invalid; valid: onnxruntime or null$"):
        validate_config(compose_cfg(["deploy=tensorrt"]))
