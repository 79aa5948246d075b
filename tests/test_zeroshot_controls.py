"""The zero-shot QAT family's reference quantizer (method.quantizer=reference: core.learn.MinMaxSteWeight,
core.modules.EmaActQuant), its protocol preset (protocol=zsqat_paper) and the controls (method.samples,
method.finetune).

Oracles are written here: the EMA recursions as loops, the per-channel min/max grid from its formula, the
calibration-only weights against RTN's. Runs are tiny (an 8x8 two-BN CNN, a few iterations).
"""

import json

import pytest
import torch
from helpers import cli, compose_cfg, rows_in
from test_zeroshot_family import FAST, X, eval_set, tiny_bn_net

import dfq_bench
from dfq_bench.config import ConfigError, validate_config
from dfq_bench.core.learn import MinMaxSteWeight
from dfq_bench.core.modules import ActQuant, EmaActQuant, quant_layers
from dfq_bench.run.runner import run_id


def ema_oracle(values, m, corrected):
    out, r = [], 0.0
    for t, v in enumerate(values, 1):
        if corrected:
            r = (m * r + (1 - m) * v) / (1 - m ** t)
        else:
            r = v if t == 1 else m * r + (1 - m) * v
        out.append(r)
    return out


@pytest.mark.parametrize("corrected", [False, True])
def test_ema_ranges_follow_the_recursion_then_freeze(corrected):
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(4, 3, 5, 5, generator=g) * (i + 1) - 0.5 for i in range(6)]
    q = EmaActQuant(4, momentum=0.9, bias_correction=corrected)
    for x in xs:
        q(x)
    lo = ema_oracle([float(x.min()) for x in xs], 0.9, corrected)[-1]
    hi = ema_oracle([float(x.max()) for x in xs], 0.9, corrected)[-1]
    assert q.lo == pytest.approx(lo, rel=1e-6) and q.hi == pytest.approx(hi, rel=1e-6)
    q.freeze()
    out = q(torch.full((1, 3, 2, 2), 100.0))
    assert q.lo == pytest.approx(lo, rel=1e-6) and q.hi == pytest.approx(hi, rel=1e-6)  # frozen
    ref = ActQuant(4, False)
    ref.set_range(lo, hi)
    assert torch.equal(out, ref(torch.full((1, 3, 2, 2), 100.0)))
    if corrected:  # the quirk: a constant batch range is inflated early on
        c = EmaActQuant(4, 0.9, True)
        for _ in range(3):
            c(torch.tensor([0.0, 1.0]))
        assert c.hi == pytest.approx(ema_oracle([1.0] * 3, 0.9, True)[-1]) and c.hi > 10


def test_minmax_weight_grid_is_recomputed_every_forward_with_identity_gradient():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(6, 3, 3, 3, generator=g)).requires_grad_(True)
    pz = MinMaxSteWeight(3)
    out = pz(w)
    flat = w.detach().reshape(6, -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    s = (hi - lo) / 7
    zp = -4 - torch.round(lo / s)
    oracle = (torch.clamp(torch.round(flat / s[:, None]) + zp[:, None], -4, 3) - zp[:, None]) * s[:, None]
    torch.testing.assert_close(out.detach().reshape(6, -1), oracle)
    assert all(len(torch.unique(r)) <= 8 for r in out.detach().reshape(6, -1))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    w2 = w.detach() * 2
    assert torch.allclose(pz(w2), 2 * out.detach(), atol=1e-6)  # the grid follows the weights


def run(method="gdfq", **keys):
    return dfq_bench.quantize(tiny_bn_net(), method, wbits=4, abits=4, example_input=X, eval_data=eval_set(),
                              **{**FAST, **keys})


def test_reference_quantizer_end_to_end_weights_on_their_final_grid_and_frozen_ema_ranges():
    q, info = run(quantizer="reference")
    assert info["act_range"] == "ema" and info["n_act_quant"] == 2
    for ql in quant_layers(q).values():
        w = ql.layer.weight.detach().reshape(len(ql.layer.weight), -1)
        levels = ql.weight_levels().reshape(len(w), -1)
        assert all(len(torch.unique(r)) <= 2 ** ql.w_bits for r in levels)
        assert float(levels.min()) >= ql.w_qmin and float(levels.max()) <= ql.w_qmax
        torch.testing.assert_close((levels - ql.w_zero_point.reshape(-1, 1)) * ql.w_scale.reshape(-1, 1), w)
        if ql.act_quant is not None:
            assert isinstance(ql.act_quant, EmaActQuant) and ql.act_quant.state == "on"
    _, inflated = run(quantizer="reference", range_inflation=True)
    assert inflated["act_range"] == "ema_inflated"
    q2, _ = run(quantizer="reference", range_inflation=True)
    his = [ql.act_quant.hi for ql in quant_layers(q).values() if ql.act_quant is not None]
    his2 = [ql.act_quant.hi for ql in quant_layers(q2).values() if ql.act_quant is not None]
    assert all(b > a for a, b in zip(his, his2, strict=True))  # 1 warm-up epoch of 4 steps: still inflated


def test_adadfq_reference_quantizer_without_warmup_calibrates_the_ema_once():
    _, info = run("adadfq", quantizer="reference", warmup_epochs=0, epochs=1)
    assert info["act_range"] == "ema" and info["n_student_steps"] == 4


def test_calibration_only_control_gives_rtn_weights_and_no_student_step():
    q, info = run(finetune=False)
    assert info["n_student_steps"] == 0 and info["top1_curve_epochs"] == [1]
    rtn, _ = dfq_bench.quantize(tiny_bn_net(), "rtn", wbits=4, abits=4, example_input=X,
                                calib=[torch.randn(8, 3, 8, 8)])
    for (n, a), (_, b) in zip(quant_layers(q).items(), quant_layers(rtn).items(), strict=True):
        torch.testing.assert_close(a.layer.weight, b.layer.weight, msg=n)


def test_noise_and_real_controls_fine_tune_on_fixed_images_without_a_generator():
    images = [torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(3))]
    for samples in ("noise", "real"):
        _, info = run("adadfq", samples=samples, calib=images)
        assert "generator" not in info and info["n_fixed_images"] == 24
        assert info["loss_generator"] == [None, None] and all(v is not None for v in info["loss_student"])
        assert info["n_student_steps"] == 8


@pytest.mark.parametrize("overrides, message", [
    (["method.range_inflation=true"], "method.range_inflation=true is invalid with method.quantizer='protocol'"),
    (["method.samples=real"], "method.samples='real' needs data=real"),
    (["method.samples=gan"], "method.samples='gan' is invalid; valid: generator, noise, real"),
    (["method.quantizer=reference", "protocol.a_granularity=per_channel"],
     "method.quantizer='reference' keeps one EMA range per tensor"),
])
def test_bad_family_keys_are_one_line_config_errors(overrides, message):
    overrides = ["method=adadfq_cpu", *overrides]
    with pytest.raises(ConfigError) as e:
        validate_config(compose_cfg(overrides), overrides)
    assert str(e.value).startswith(message)


def test_zsqat_paper_protocol_composes_and_existing_run_ids_stay():
    cfg = compose_cfg(["method=gdfq_cpu", "protocol=zsqat_paper"])
    validate_config(cfg, [])
    p = cfg.protocol
    assert (p.first_wbits, p.last_wbits, p.last_abits, p.fold_bn, p.quantize_first_input) == (None, None, None,
                                                                                               False, False)
    # the new method keys have defaults outside the presets: run_ids of earlier rows are unchanged
    assert run_id(compose_cfg(["method=gdfq_cpu"])) == "f1e1cf2f7921f501"
    assert run_id(compose_cfg(["method=adadfq_cpu"])) == "10d3d62256a64d18"


def test_cli_real_control_row_records_samples_and_data(tmp_path):
    out = tmp_path / "results"
    proc = cli(["method=adadfq_cpu", "model=test_cnn", "dataset=fake", "dataset.num_samples=32", "data=real",
                "data.num_samples=32", "method.samples=real", "method.quantizer=reference", "method.epochs=2",
                "method.iters_per_epoch=2", "method.batch_size=8", "method.calib_images=16",
                "method.eval_images=16", "protocol=zsqat_paper", f"results_dir={out}"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = rows_in(out)
    assert row["status"] == "ok" and row["data"]["name"] == "real" and row["n_fixed_images"] == 32
    assert row["method_cfg"]["samples"] == "real" and row["method_cfg"]["finetune"] is True
    assert row["act_range"] == "ema" and row["protocol"]["name"] == "zsqat_paper"
    json.dumps(row)


EXPERIMENTS = ("cifar10", "cifar100", "imagenet_resnet18", "imagenet_mobilenet_v2", "imagenet_resnet50")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_adadfq_table2_overlays_compose_with_all_five_columns(name):
    cfg = compose_cfg([f"+experiment=adadfq_table2_{name}"])
    assert cfg.protocol.name == "zsqat_paper" and cfg.method.name == "adadfq" and cfg.abits == cfg.wbits
    top1 = cfg.paper.top1
    assert set(top1) == {"intraq", "gdfq", "qimera", "adasg", "adadfq"}
    assert set(top1.adadfq) == ({"W3A3", "W4A4", "W5A5"} if name.startswith("cifar") else {"W4A4", "W5A5"})


def test_cifar_resnet20_loads_its_layout_and_an_overlay_runs_on_a_stand_in(tmp_path):
    from omegaconf import OmegaConf

    from dfq_bench.models.cifar_resnet import resnet20_cifar10

    built = resnet20_cifar10(OmegaConf.create({"weights": None, "sha256": None}))
    assert sum(p.numel() for p in built.model.parameters()) == 272474  # pytorchcv's count for resnet20_cifar10
    path = tmp_path / "r20.pt"
    torch.save(built.model.state_dict(), path)
    out = tmp_path / "results"
    proc = cli(["+experiment=adadfq_table2_cifar10", "dataset=fake", "dataset.num_samples=16", f"model.weights={path}",
                "method=adadfq_cpu", "method.epochs=1", "method.warmup_epochs=1", "method.iters_per_epoch=1",
                "method.batch_size=4", "method.calib_images=4", "method.eval_images=16", f"results_dir={out}"],
               tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr
    (row,) = rows_in(out)
    assert row["status"] == "ok" and row["model"].startswith("resnet20_cifar10") and row["wbits"] == row["abits"] == 3
    assert row["paper"]["top1"]["adadfq"]["W3A3"] == 84.89 and row["paper"]["fp32"] == 93.89
    assert row["protocol"]["name"] == "zsqat_paper"
