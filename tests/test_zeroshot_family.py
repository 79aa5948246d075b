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
