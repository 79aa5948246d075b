"""Qimera, AdaDFQ and GranQ (methods/qimera.py, adadfq.py, granq.py) and the activation granularities
(protocol.a_granularity: core/modules.py ActQuant, core/ranges.py).

Oracles are written here, independently of the code under test: the superposed embeddings recomputed
from the soft labels' classes and weights, the losses from their formulas on hand-made logits, the
quantized activations from a per-slice loop. Runs are tiny (an 8x8 two-BN CNN, a few iterations).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from dfq_bench.methods.qimera import superposed_labels
from helpers import compose_cfg
from torch import nn

import dfq_bench
from dfq_bench.calib.generator import Generator, label_embedding
from dfq_bench.config import ConfigError, validate_config

X = torch.zeros(2, 3, 8, 8)
FAST = dict(epochs=3, warmup_epochs=1, iters_per_epoch=4, batch_size=8, calib_images=16, eval_images=None)


def tiny_bn_net(seed=0, classes=5):
    """conv-BN-ReLU x 2, pool, linear on 3x8x8 inputs, with seeded non-trivial weights and BN statistics."""
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


def eval_set(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n // 16)]


def run(method, seed=0, wbits=4, abits=4, protocol_keys=None, **keys):
    return dfq_bench.quantize(tiny_bn_net(), method, wbits=wbits, abits=abits, example_input=X, seed=seed,
                              eval_data=eval_set(), protocol_keys=protocol_keys, **{**FAST, **keys})


# ---- Qimera -----------------------------------------------------------------------------------------


def test_qimera_superposed_embeddings_are_convex_mixtures_with_soft_labels_summing_to_1():
    classes, k, n = 7, 3, 4000
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, classes, (n,), generator=g)
    soft, mixed = superposed_labels(y, classes, 0.4, k, g)
    assert soft.shape == (n, classes) and bool((soft >= 0).all())
    assert torch.allclose(soft.sum(1), torch.ones(n), atol=1e-6)
    assert abs(float(mixed.float().mean()) - 0.4) < 0.03  # each sample superposed with probability 0.4
    assert torch.equal(soft[~mixed], F.one_hot(y[~mixed], classes).float())  # the others: one-hot
    n_classes = soft[mixed].gt(0).sum(1)  # K draws, repeats added: at most K classes, mostly more than one
    assert bool((n_classes <= k).all()) and float((n_classes >= 2).float().mean()) > 0.8
    assert bool((soft[mixed].gather(1, y[mixed, None]) > 0).all())  # the drawn label is one of the K
    gen = Generator((3, 8, 8), classes, latent_dim=6)
    with torch.no_grad():
        got = label_embedding(gen.embed, soft[:50])
        for i in range(50):  # the mixture, class by class: sum over the classes it weights of w_c * E[c]
            expected = torch.zeros(6)
            for c in range(classes):
                if soft[i, c] > 0:
                    expected += float(soft[i, c]) * gen.embed.weight[c]
            assert torch.allclose(got[i], expected, atol=1e-6)
            if not mixed[i]:  # one-hot: exactly the class's own embedding (GDFQ's)
                assert torch.equal(got[i], gen.embed(y[i]))
        z = torch.randn(50, 6, generator=g)
        gen.eval()
        assert torch.allclose(gen(z, soft[:50]), gen.out_bn(torch.tanh(gen.conv3(torch.nn.functional.leaky_relu(
            gen.bn2(gen.conv2(F.interpolate(F.leaky_relu(gen.bn1(gen.conv1(F.interpolate(gen.bn0(
                gen.linear(got * z).view(50, 128, 2, 2)), scale_factor=2))), 0.2), size=(8, 8)))), 0.2)))),
            atol=1e-5)


def test_qimera_soft_label_cross_entropy_and_a_run():
    q = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    expected = -(soft * torch.log(torch.exp(q) / torch.exp(q).sum(1, keepdim=True))).sum(1).mean()
    from dfq_bench.methods.qimera import Qimera

    m = Qimera()
    assert float(F.cross_entropy(q, soft)) == pytest.approx(float(expected), rel=1e-6)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(m.generator_loss(t, soft, torch.tensor(0.0))) == pytest.approx(
        float(-(soft * F.log_softmax(t, 1)).sum(1).mean()), rel=1e-6)
    qmodel, info = run("qimera", embed_init="teacher_fc")
    assert info["qimera"] == {"latent_dim": 8, "embed_init": "teacher_fc", "mix_p": 0.4, "mix_classes": 2}
    assert all(math.isfinite(v) for v in info["loss_student"][1:]) and len(info["top1_curve"]) == 3


@pytest.mark.parametrize("override,message", [
    ("method.mix_p=1.5", "method.mix_p=1.5 is invalid; valid: a probability in [0, 1]"),
    ("method.mix_classes=1", "method.mix_classes=1 is invalid; valid: an integer >= 2"),
    ("method.embed_init=fc", "method.embed_init='fc' is invalid; valid: random, teacher_fc"),
])
def test_qimera_bad_keys_are_one_line_config_errors(override, message):
    overrides = ["method=qimera_cpu", override]
    with pytest.raises(ConfigError) as e:
        validate_config(compose_cfg(overrides), overrides)
    assert str(e.value) == message


# ---- AdaDFQ ------------------------------------------------------------------------------------------

T_LOGITS = torch.tensor([[3.0, 0.5, -1.0, 0.0], [0.2, 0.1, 0.0, -0.1], [-2.0, 4.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.5]])
Q_LOGITS = torch.tensor([[2.5, 0.0, -0.5, 0.5], [0.2, 0.1, 0.0, -0.1], [1.0, -1.0, 1.0, 0.0], [0.0, 3.0, 1.0, 1.0]])


def hand_entropy(row):
    """Entropy (nats) of softmax(row), from exp and log of Python floats."""
    e = [math.exp(v) for v in row]
    p = [v / sum(e) for v in e]
    return -sum(pi * math.log(pi) for pi in p)


def test_adadfq_margin_loss_equals_the_formula_with_the_min_max_normalised_entropy():
    from dfq_bench.methods.adadfq import margin_loss

    d = (T_LOGITS - Q_LOGITS).tolist()
    h = [hand_entropy(r) for r in d]  # row 1: t == q, uniform softmax: h = log 4; row 0: the lowest
    lo = min(h)
    hn = [(v - lo) / (math.log(4) - lo) for v in h]
    assert hn[1] == pytest.approx(1.0) and min(hn) == 0.0
    for l_l, l_u in ((0.1, 0.8), (0.3, 0.5), (0.0, 1.0)):
        expected = sum(max(l_l - v, 0.0) for v in hn) / 4 + sum(max(v - l_u, 0.0) for v in hn) / 4
        got = float(margin_loss(T_LOGITS, Q_LOGITS, l_l, l_u))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (l_l, l_u)
    assert float(margin_loss(T_LOGITS, Q_LOGITS, 0.0, 1.0)) == 0.0


def test_adadfq_generator_and_student_losses_equal_their_formulas():
    from dfq_bench.methods.adadfq import AdaDFQ

    m = AdaDFQ()  # the defaults: a_ds 0.2, a_as 0.1, l_l 0.1, l_u 0.8, beta = gamma = 1, T = 20
    assert (m.cfg.a_ds, m.cfg.a_as, m.cfg.l_l, m.cfg.l_u, m.cfg.beta, m.cfg.gamma, m.cfg.temperature,
            m.cfg.batch_size) == (0.2, 0.1, 0.1, 0.8, 1.0, 1.0, 20.0, 16)
    y = [0, 3, 1, 2]

    def ce(rows):  # -log softmax(row)[y], averaged
        return sum(math.log(sum(math.exp(v) for v in r)) - r[c] for r, c in zip(rows, y, strict=True)) / len(y)

    d, s = (T_LOGITS - Q_LOGITS).tolist(), (T_LOGITS + Q_LOGITS).tolist()
    h = [hand_entropy(r) for r in d]
    hn = [(v - min(h)) / (math.log(4) - min(h)) for v in h]
    margin = sum(max(0.1 - v, 0) for v in hn) / 4 + sum(max(v - 0.8, 0) for v in hn) / 4
    bns = 0.37
    expected = margin + 1.0 * (0.2 * ce(d) + 0.1 * ce(s)) + 1.0 * bns
    got = m.generator_loss(T_LOGITS, torch.tensor(y), torch.tensor(bns), Q_LOGITS)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    for T in (20.0, 5.0):
        m = AdaDFQ(compose_method("adadfq", temperature=T))
        expected = -sum(T * T * hand_entropy([v / T for v in r]) for r in d) / 4
        assert float(m.student_loss(Q_LOGITS, T_LOGITS, torch.tensor(y))) == pytest.approx(expected, rel=1e-5)


def compose_method(name, **keys):
    return dfq_bench.build_method(name, **keys).cfg


def test_adadfq_generator_step_sees_the_student_not_detached_and_updates_only_the_generator():
    from dfq_bench.methods.adadfq import AdaDFQ

    from dfq_bench.train.zeroshot import ZeroShotTrainer

    seen = []

    class OnlyStudent(AdaDFQ):
        def generator_loss(self, t, y, bns, q=None):
            seen.append(q)
            return q.square().mean()  # a loss of the student's logits alone: its gradient must reach G

    teacher, student = tiny_bn_net(0), tiny_bn_net(1)
    for p in student.parameters():
        p.requires_grad_(True)
    gen = Generator((3, 8, 8), 5, latent_dim=6)
    method = OnlyStudent(compose_method("adadfq_cpu", iters_per_epoch=1, batch_size=4, lr_generator=1e-2))
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    trainer = ZeroShotTrainer(teacher, student, gen, method.cfg, method, 0, "cpu")
    trainer.epoch(0, train_student=False)
    trainer.close()
    assert len(seen) == 1 and seen[0].requires_grad and seen[0].grad_fn is not None
    assert not torch.equal(before["linear.weight"], gen.linear.weight)  # moved by a loss of q alone
    assert all(p.grad is None for p in student.parameters())  # the generator step leaves the student alone


def test_adadfq_cpu_end_to_end_gives_a_finite_row():
    qmodel, info = run("adadfq_cpu")
    assert info["act_range"] == "minmax" and info["n_student_steps"] == 2 * 4
    assert all(math.isfinite(v) for v in info["loss_student"][1:] + info["loss_generator"])
    assert info["loss_student"][1] < 0  # -T^2 * entropy
    metrics = dfq_bench.evaluate(tiny_bn_net(), qmodel, eval_set())
    assert math.isfinite(metrics["top1"]) and math.isfinite(metrics["kl_fp32"]) and metrics["n_eval"] == 32


@pytest.mark.parametrize("override,message", [
    ("method.l_u=0.05", "method.l_u=0.05 is invalid; valid: a number in [method.l_l=0.1, 1]"),
    ("method.a_ds=-1", "method.a_ds=-1.0 is invalid; valid: a number >= 0"),
    ("method.temperature=0", "method.temperature=0.0 is invalid; valid: a number > 0"),
])
def test_adadfq_bad_keys_are_one_line_config_errors(override, message):
    overrides = ["method=adadfq_cpu", override]
    with pytest.raises(ConfigError) as e:
        validate_config(compose_cfg(overrides), overrides)
    assert str(e.value) == message


# ---- activation granularity (protocol.a_granularity) ------------------------------------------------


def slice_oracle(x, bits, lo, hi):
    """Fake-quantized ``x`` on the asymmetric unsigned grid of [min(lo, 0), max(hi, 0)], written out."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2 ** bits - 1
    s = (hi - lo) / qmax if hi > lo else 1.0
    z = min(max(-round(lo / s), 0), qmax)
    return (torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s, s


def activations(seed=0):
    """(3 samples, 4 channels, 5 x 5) with a different spread in every (sample, channel) slice, some negative."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor([[0.1, 1.0, 3.0, 0.5], [2.0, 0.2, 0.05, 4.0], [1.0, 1.0, 8.0, 0.3]])
    return torch.randn(3, 4, 5, 5, generator=g) * spread[:, :, None, None] + 0.3


def test_dynamic_quantizer_gives_each_sample_and_channel_its_own_range_and_static_ones_do_not():
    from dfq_bench.core.modules import ActQuant

    x, bits = activations(), 4
    dyn = ActQuant(bits, False, "dynamic")
    dyn.set_range(-100.0, 100.0)  # a static range it must ignore for 4-D inputs
    per_tensor = ActQuant(bits, False)
    per_tensor.set_range(float(x.min()), float(x.max()))
    per_channel = ActQuant(bits, False, "per_channel")
    per_channel.set_range(x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3)))
    with torch.no_grad():
        out_dyn, out_t, out_c = dyn(x), per_tensor(x), per_channel(x)
    steps = set()
    for n in range(3):
        for c in range(4):
            sl = x[n, c]
            ref, s = slice_oracle(sl, bits, float(sl.min()), float(sl.max()))
            assert torch.allclose(out_dyn[n, c], ref, atol=1e-5 * s), (n, c)
            steps.add(round(s, 6))
            assert len(torch.unique(out_dyn[n, c])) <= 2 ** bits
            ref_c, _ = slice_oracle(sl, bits, float(x[:, c].min()), float(x[:, c].max()))
            assert torch.allclose(out_c[n, c], ref_c, atol=1e-5)
    assert len(steps) == 12  # twelve slices, twelve ranges
    ref_t, s_t = slice_oracle(x, bits, float(x.min()), float(x.max()))
    assert torch.allclose(out_t, ref_t, atol=1e-5)  # one range for every slice
    err = lambda out: (out - x).abs().amax(dim=(2, 3))  # noqa: E731
    assert bool((err(out_dyn) <= err(out_t) + 1e-6).all()) and float(err(out_dyn)[1, 2]) < 0.2 * float(err(out_t)[1, 2])
    x2 = x.clone()
    x2[0] *= 10  # another sample's values: the dynamic slices of sample 1 do not move
    with torch.no_grad():
        assert torch.equal(dyn(x2)[1:], out_dyn[1:])
    # the training path: the same values (up to a rounding of x + (q - x)), a straight-through gradient
    xg = x.clone().requires_grad_(True)
    dyn(xg).sum().backward()
    assert torch.allclose(dyn(xg).detach(), out_dyn, atol=1e-5) and torch.equal(xg.grad, torch.ones_like(x))
    xg.grad = None
    assert torch.allclose(per_channel(xg).detach(), out_c, atol=1e-6)
    # 2-D inputs (a Linear's) keep the static per-tensor range of a dynamic quantizer
    dyn.set_range(0.0, 1.5)
    v = torch.linspace(-0.5, 2.0, 12).reshape(2, 6)
    with torch.no_grad():
        assert torch.allclose(dyn(v), slice_oracle(v, bits, 0.0, 1.5)[0], atol=1e-6)


def test_protocol_granularity_reaches_every_activation_quantizer_and_the_row():
    from dfq_bench.core.modules import quant_layers

    calib = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(4))]
    out = {}
    for gran in ("per_tensor", "per_channel", "dynamic"):
        qmodel, info = dfq_bench.quantize(tiny_bn_net(), "rtn", wbits=4, abits=4, example_input=X, calib=calib,
                                          protocol_keys={"a_granularity": gran})
        assert info["a_granularity"] == gran
        aqs = [ql.act_quant for ql in quant_layers(qmodel).values() if ql.act_quant is not None]
        assert len(aqs) == 2 and {aq.granularity for aq in aqs} == {gran}  # conv2's input and the Linear's
        assert aqs[0].scale.shape == ((8,) if gran == "per_channel" else ())
        with torch.no_grad():
            out[gran] = qmodel(calib[0])
    assert not torch.equal(out["per_tensor"], out["dynamic"]) and not torch.equal(out["per_tensor"], out["per_channel"])


def test_granularity_refusals_are_one_line_before_any_model_is_built():
    def refused(*overrides):
        with pytest.raises(ConfigError) as e:
            validate_config(compose_cfg(list(overrides)), list(overrides))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert refused("method=rtn", "protocol.a_granularity=per_channel", "protocol.act_range=percentile") == (
        "protocol.a_granularity='per_channel' is not supported by act_range rule 'percentile' (it gives one range "
        "per tensor); valid: protocol.a_granularity=per_tensor|dynamic, or protocol.act_range=minmax")
    assert refused("method=genie_cpu", "data=genie_cpu", "protocol.a_granularity=dynamic").startswith(
        "protocol.a_granularity='dynamic' is not supported by method genie")
    for ok in (["method=rtn", "protocol.a_granularity=per_channel"],
               ["method=squant", "protocol.a_granularity=dynamic"],
               ["method=rtn", "protocol.a_granularity=dynamic", "abits=null", "deploy=onnxruntime"]):
        validate_config(compose_cfg(ok), ok)


def test_dynamic_ranges_with_deploy_exit_2_with_one_line_and_no_row(tmp_path):
    pytest.importorskip("onnxruntime")
    from helpers import cli

    out = tmp_path / "results"
    proc = cli(["method=rtn", "model=test_cnn", "dataset=fake", "protocol.a_granularity=dynamic", "deploy=onnxruntime",
                f"results_dir={out}"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: protocol.a_granularity='dynamic' is invalid with deploy=onnxruntime: dynamic activation ranges "
        "(min/max of every sample and channel, recomputed at every call, test time too) have no fixed integer "
        "scale; valid: protocol.a_granularity=per_tensor, or deploy=null"]
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"^protocol.a_granularity='per_channel' is invalid with deploy=onnxruntime"):
        validate_config(compose_cfg(["method=rtn", "protocol.a_granularity=per_channel", "deploy=onnxruntime"]))


def test_existing_run_ids_are_unchanged():
    """Committed rows (made before a_granularity took more than per_tensor) keep their run_ids: recomputed from
    the command each row gives (its own, or the one rebuilt from its fields), and the golden value of one."""
    import json
    import shlex
    from pathlib import Path

    from dfq_bench.run.command import row_command
    from dfq_bench.run.runner import run_id

    results = Path(__file__).resolve().parents[1] / "results"
    checked = 0
    for name in ("mixed_precision", "deploy", "squant_embedded"):
        rows = [json.loads(line) for line in (results / name / "runs.jsonl").read_text().splitlines() if line.strip()]
        row = next(r for r in rows if r.get("status") == "ok" and r["protocol"]["a_granularity"] == "per_tensor")
        cmd = row_command(row)
        assert cmd is not None, name
        assert run_id(compose_cfg(shlex.split(cmd)[3:])) == row["run_id"], name
        checked += 1
    assert checked == 3
    golden = ["model=resnet20_fmnist", "dataset=fashion_mnist", "method=rtn", "protocol=common", "data=noise",
              "wbits=4", "abits=8", "seed=0", "mp.allocator=dp", "mp.avg_wbits=2.5"]
    assert run_id(compose_cfg(golden)) == "475c03fe0cc1a7c4"  # results/mixed_precision's first row
    assert run_id(compose_cfg([*golden, "protocol.a_granularity=dynamic"])) != "475c03fe0cc1a7c4"


# ---- GranQ -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("own,gran", [("dynamic", "dynamic"), ("protocol", "per_tensor")])
def test_granq_cpu_end_to_end_dynamic_by_default_and_static_on_request(own, gran):
    from dfq_bench.core.modules import quant_layers

    qmodel, info = run("granq_cpu", a_granularity=own)
    assert info["a_granularity"] == gran and info["n_student_steps"] == 2 * 4
    aqs = [ql.act_quant for ql in quant_layers(qmodel).values() if ql.act_quant is not None]
    assert {aq.granularity for aq in aqs} == {gran}
    assert all(math.isfinite(v) for v in info["loss_student"][1:] + info["loss_generator"])
    metrics = dfq_bench.evaluate(tiny_bn_net(), qmodel, eval_set())
    assert math.isfinite(metrics["top1"]) and math.isfinite(metrics["kl_fp32"]) and metrics["n_eval"] == 32


def test_granq_granularity_refusals():
    def refused(*overrides):
        with pytest.raises(ConfigError) as e:
            validate_config(compose_cfg(["method=granq_cpu", *overrides]), ["method=granq_cpu", *overrides])
        return str(e.value)

    assert refused("deploy=onnxruntime").startswith(
        "method.a_granularity='dynamic' is invalid with deploy=onnxruntime: dynamic activation ranges")
    assert refused("protocol.a_granularity=per_channel") == (
        "method.a_granularity='dynamic' conflicts with protocol.a_granularity='per_channel'; valid: "
        "method.a_granularity=protocol (the protocol's static ranges), or protocol.a_granularity=per_tensor")
    assert refused("method.a_granularity=static") == (
        "method.a_granularity='static' is invalid; valid: dynamic, protocol")
    ok = ["method=granq_cpu", "method.a_granularity=protocol", "deploy=onnxruntime"]
    validate_config(compose_cfg(ok), ok)
