"""DFQ: layer graph, BN folding, cross-layer equalization, high-bias absorption, bias correction,
ReLU6 handling and BN-rule ranges, each checked against an independent oracle written here (or
torch.ao's pairwise equalization)."""

import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from dfq_bench.methods.dfq import DFQ, absorb_high_bias, clipped_gaussian_mean, equalize
from dfq_bench.methods.rtn import RTN
from helpers import quant_ctx, randomize_bn
from omegaconf import OmegaConf
from torch import nn
from torch.ao.quantization._equalize import cross_layer_equalization

from dfq_bench.core.bn import fold_bn
from dfq_bench.core.modules import QuantLayer, quant_layers
from dfq_bench.graph import equalization_links, input_sources, relu6_to_relu, trace
from dfq_bench.models.test_cnn import make_test_cnn

HAS_EFFNET = importlib.util.find_spec("efficientnet_lite_pytorch") is not None


def dfq(**kw):
    return DFQ(OmegaConf.merge(OmegaConf.structured(DFQ.Config(name="dfq")), kw))


def ctx_for(example, wbits=8, abits=None, calib=None, **proto):
    return quant_ctx(wbits, abits, example, calib, **proto)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---- independent oracles -------------------------------------------------------------------------


def ref_out_range(w, i):
    return float(w[i].detach().abs().max())


def ref_in_range(layer, w, i, channels):
    """All weights that read input channel i, by explicit indexing (groups, flattened Linear)."""
    if isinstance(layer, nn.Linear):
        k = w.shape[1] // channels
        return float(w[:, i * k:(i + 1) * k].detach().abs().max())
    ipg, opg = w.shape[1], w.shape[0] // layer.groups
    g, j = divmod(i, ipg)
    return float(w[g * opg:(g + 1) * opg, j].detach().abs().max())


def ref_rectified_mean(mu, sigma):
    """E[max(0, x)], x ~ N(mu, sigma^2), by the textbook formula (scalar math)."""
    a = -mu / sigma
    pdf = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(a / math.sqrt(2)))
    return sigma * pdf + mu * (1 - cdf)


# ---- models --------------------------------------------------------------------------------------


def mobilenet_v2():
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.mobilenet_v2(num_classes=10))


def efficientnet_lite0():
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    return randomize_bn(EfficientNet.from_name("efficientnet-lite0", num_classes=10))


CASES = [
    ("test_cnn", lambda: make_test_cnn(0), (2, 3, 32, 32)),
    ("mobilenet_v2", mobilenet_v2, (2, 3, 64, 64)),
]
if HAS_EFFNET:
    CASES.append(("efficientnet_lite0", efficientnet_lite0, (2, 3, 224, 224)))


def embedded_cases():
    """The embedded fmnist models (another helper's module), when they are registered."""
    from dfq_bench import catalog  # noqa: F401
    from dfq_bench.registry import MODELS

    return [n for n in MODELS.names() if n.endswith("_fmnist")]


def build_registered(name):
    """Random init (weights=null): the structure is what matters; BN statistics are randomized."""
    from dfq_bench.config import ModelConfig
    from dfq_bench.registry import MODELS

    torch.manual_seed(0)
    return MODELS.get(name)(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": name, "weights": None}))


# ---- graph ---------------------------------------------------------------------------------------


def test_links_on_test_cnn_follow_the_graph_not_module_order():
    m = make_test_cnn(0)
    fold_bn(m)
    assert [(lk.producer, lk.consumer) for lk in equalization_links(m)] == [
        ("conv1", "conv2"), ("pw.0", "fc")  # stem feeds a residual add too; dw -> pw has a ReLU6
    ]
    m, n = relu6_to_relu(m)
    links = equalization_links(m)
    assert n == 1
    assert [(lk.producer, lk.consumer, lk.act) for lk in links] == [
        ("conv1", "conv2", "relu"), ("dw.0", "pw.0", "relu"), ("pw.0", "fc", "relu")
    ]
    assert links[-1].ops == ("identity", "relu", "avgpool", "flatten")


@pytest.mark.parametrize("arch,expected", [("resnet18", 8), ("resnet50", 32)])
def test_resnet_links_are_the_block_internal_pairs(arch, expected):
    m = getattr(torchvision.models, arch)().eval()
    fold_bn(m)
    links = equalization_links(m)
    assert len(links) == expected
    # never across a residual add or out of the stem (its max-pool output has two users)
    assert all(lk.producer.split(".")[:2] == lk.consumer.split(".")[:2] for lk in links)
    assert all(lk.act == "relu" for lk in links)


def test_mobilenet_v2_links():
    m, n6 = relu6_to_relu(mobilenet_v2())
    fold_bn(m)
    links = equalization_links(m)
    assert n6 == 35
    pairs = {(lk.producer, lk.consumer): lk.act for lk in links}
    assert len(pairs) == 37
    assert pairs[("features.0.0", "features.1.conv.0.0")] == "relu"  # stem -> first depthwise
    assert pairs[("features.1.conv.1", "features.2.conv.0.0")] is None  # projection -> expansion
    assert pairs[("features.18.0", "classifier.1")] == "relu"  # through pooling and flatten
    assert ("features.2.conv.2", "features.3.conv.0.0") not in pairs  # input of a residual block


@pytest.mark.skipif(not HAS_EFFNET, reason="efficientnet-lite-pytorch not installed")
def test_efficientnet_lite0_links_through_same_padding_conv_subclasses():
    m, n6 = relu6_to_relu(efficientnet_lite0())
    assert n6 == 33 and not any(isinstance(x, nn.ReLU6) for x in m.modules())
    fold_bn(m)
    links = equalization_links(m)
    assert len(links) == 35
    assert ("_conv_stem", "_blocks.0._depthwise_conv") in {(lk.producer, lk.consumer) for lk in links}


def test_links_stop_at_two_users_concat_nonrelu_and_shared_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 4, 1)
            self.d, self.e = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.shared = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            z = self.b(y)  # y has two users: b and the concatenation
            u = self.c(torch.cat([y, z], 1))
            v = self.e(torch.sigmoid(self.d(u)))  # sigmoid is not positively homogeneous
            return self.shared(self.shared(v))  # a module called twice is never equalized

    # only c -> d (linear, no activation) is valid
    assert [(lk.producer, lk.consumer, lk.act) for lk in equalization_links(Net())] == [("c", "d", None)]


def test_input_sources_range_walk_equals_bn_producers():
    from dfq_bench.graph import bn_producers

    for m in (make_test_cnn(0), mobilenet_v2()):
        ref = bn_producers(m)
        got = {k: s for k, s in input_sources(m).items() if isinstance(m.get_submodule(s.name), nn.BatchNorm2d)}
        assert set(got) == set(ref)
        assert all(m.get_submodule(got[k].name) is ref[k][0] and got[k].act == ref[k][1] for k in ref)


# ---- ReLU6 ---------------------------------------------------------------------------------------


def test_relu6_to_relu_exact_below_six_and_counted():
    m = make_test_cnn(0)
    ref = copy.deepcopy(m)
    m, n = relu6_to_relu(m)
    assert n == 1 and not any(isinstance(x, nn.ReLU6) for x in m.modules())
    x = torch.randn(4, 3, 32, 32) * 0.1  # pre-activations stay below 6: ReLU == ReLU6 exactly
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))
        big = torch.randn(4, 3, 32, 32) * 50  # above 6 the replacement changes the function
        assert not torch.equal(m(big), ref(big))


def test_relu6_to_relu_finds_functional_calls():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
            self.clip = nn.Hardtanh(0.0, 6.0)

        def forward(self, x):
            return self.b(self.clip(F.relu6(self.a(x))))

    m, n = relu6_to_relu(Net())
    assert n == 2
    targets = [nd.target for nd in trace(m).graph.nodes if nd.op == "call_function"]
    assert F.relu6 not in targets and F.relu in targets
    assert isinstance(m.clip, nn.ReLU)
    x = torch.randn(2, 3, 5, 5) * 100
    with torch.no_grad():
        assert torch.allclose(m(x), m.b(F.relu(m.a(x))))
    assert [(lk.producer, lk.consumer) for lk in equalization_links(m)] == [("a", "b")]


def test_dfq_without_relu6_to_relu_keeps_relu6_and_skips_those_pairs():
    m = make_test_cnn(0)
    x = torch.randn(8, 3, 32, 32)
    ctx = ctx_for(x[:2], wbits=16, abits=None, first_wbits=None, last_wbits=None)
    q = dfq(relu6_to_relu=False, bias_correction=False).quantize(m, ctx)
    assert ctx.info["n_relu6_to_relu"] == 0 and ctx.info["n_cle_pairs"] == 2
    assert any(isinstance(x, nn.ReLU6) for x in q.modules())
    with torch.no_grad():
        assert rel_err(q(x), m(x)) < 1e-4  # 16-bit weights; every step exact, ReLU6 kept


def _two_relu6_net():
    """conv -> BN -> ReLU6 (input below 6 to 6 sigma) -> conv -> BN -> ReLU6 (often above 6) -> conv."""
    g = torch.Generator().manual_seed(11)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(),
                      nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        for conv in (m[0], m[3], m[6]):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
        m[1].weight.fill_(0.5)
        m[1].bias.copy_(torch.linspace(-1, 2.5, 8))  # beta + 6 gamma <= 5.5
        m[4].weight.fill_(1.0)
        m[4].bias.copy_(torch.linspace(3, 5, 8))  # beta + 6 gamma up to 11
    return m.eval()


def test_relu6_scope_safe_replaces_only_where_bn_statistics_keep_the_input_below_six():
    m = _two_relu6_net()
    x = torch.randn(4, 3, 6, 6)
    ctx = ctx_for(x[:2], wbits=16, abits=None, first_wbits=None, last_wbits=None)
    q = dfq(relu6_scope="safe", bias_correction=False).quantize(m, ctx)
    assert (ctx.info["n_relu6_to_relu"], ctx.info["n_relu6_kept"], ctx.info["n_cle_pairs"]) == (1, 1, 1)
    assert isinstance(q[2], nn.ReLU) and isinstance(q[5], nn.ReLU6)
    ctx_all = ctx_for(x[:2], wbits=16, abits=None, first_wbits=None, last_wbits=None)
    dfq(bias_correction=False).quantize(m, ctx_all)
    assert (ctx_all.info["n_relu6_to_relu"], ctx_all.info["n_relu6_kept"], ctx_all.info["n_cle_pairs"]) == (2, 0, 2)


@pytest.mark.skipif(not HAS_EFFNET, reason="efficientnet-lite-pytorch not installed")
def test_relu6_sites_group_shared_modules():
    from dfq_bench.graph import relu6_sites

    sites = relu6_sites(efficientnet_lite0())
    assert sum(len(v) for v in sites.values()) == 33
    assert sites["_blocks.1._swish"] == ["_blocks.1._bn0", "_blocks.1._bn1"]  # one module, two sites
    m, n = relu6_to_relu(efficientnet_lite0(), only={"_blocks.1._swish"})
    assert n == 2 and isinstance(m._blocks[1]._swish, nn.ReLU) and isinstance(m._blocks[2]._swish, nn.ReLU6)


# ---- BN folding and CLE preserve the float function ------------------------------------------


def max_range_mismatch(m, links):
    """Largest relative difference between paired channel ranges, by the explicit-index oracle."""
    worst = 0.0
    for lk in links:
        p, c = m.get_submodule(lk.producer), m.get_submodule(lk.consumer)
        ch = p.weight.shape[0]
        for i in range(ch):
            r1, r2 = ref_out_range(p.weight, i), ref_in_range(c, c.weight, i, ch)
            if r1 > 0 and r2 > 0:
                worst = max(worst, abs(r1 - r2) / max(r1, r2))
    return worst


def _fold_and_equalize(model, x, mode="absmax"):
    m, _ = relu6_to_relu(copy.deepcopy(model))
    with torch.no_grad():
        y0 = m(x)
        fold_bn(m)
        y1 = m(x)
        links = equalization_links(m)
        res = equalize(m, links, 1e-8, 200, mode)
        y2 = m(x)
    return m, links, res, y0, y1, y2


@pytest.mark.parametrize("name,build,shape", CASES, ids=[c[0] for c in CASES])
def test_fold_and_cle_preserve_outputs_and_equalize_ranges(name, build, shape):
    model = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    m, links, res, y0, y1, y2 = _fold_and_equalize(model, x)
    assert rel_err(y1, y0) < 1e-4  # BN folding
    assert rel_err(y2, y1) < 1e-4  # CLE
    assert res.converged and links
    assert max_range_mismatch(m, links) < 1e-5
    # CLE did something: ranges were far from equal before it
    folded, _ = relu6_to_relu(copy.deepcopy(model))
    fold_bn(folded)
    lk = links[0]
    p, c = folded.get_submodule(lk.producer), folded.get_submodule(lk.consumer)
    before = max(abs(ref_out_range(p.weight, i) - ref_in_range(c, c.weight, i, p.weight.shape[0]))
                 / ref_out_range(p.weight, i) for i in range(p.weight.shape[0]))
    assert before > 1e-2


@pytest.mark.parametrize("name", embedded_cases())
def test_fold_and_cle_preserve_outputs_on_embedded_models(name):
    built = build_registered(name)
    x = torch.randn((4, *built.input_size), generator=torch.Generator().manual_seed(2))
    m, links, res, y0, y1, y2 = _fold_and_equalize(randomize_bn(built.model), x)
    assert rel_err(y1, y0) < 1e-4 and rel_err(y2, y1) < 1e-4
    assert res.converged and len(links) >= 7
    assert max_range_mismatch(m, links) < 1e-5


def test_depthwise_triplet_converges_to_cube_root_balance():
    """conv (1 in-channel per out) -> dw -> conv: at the fixed point the three per-channel ranges are
    equal to the geometric mean of the original ones (a product invariant of the rescaling)."""
    g = torch.Generator().manual_seed(3)
    m = nn.Sequential(nn.Conv2d(1, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(), nn.Conv2d(6, 1, 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.rand(6, 1, 1, 1, generator=g) * 4 + 0.1)
        m[2].weight.copy_(torch.rand(6, 1, 3, 3, generator=g) * 2 - 1)
        m[4].weight.copy_(torch.rand(1, 6, 1, 1, generator=g) * 8 + 0.1)
    r = [m[0].weight.abs().flatten(), m[2].weight.abs().amax((1, 2, 3)), m[4].weight.abs().flatten()]
    expected = (r[0] * r[1] * r[2]) ** (1 / 3)
    res = equalize(m, equalization_links(m), 1e-10, 500)
    assert res.converged
    for got in (m[0].weight.abs().flatten(), m[2].weight.abs().amax((1, 2, 3)), m[4].weight.abs().flatten()):
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=0)


def test_one_pair_matches_torch_ao_pairwise_equalization():
    g = torch.Generator().manual_seed(4)
    m = nn.Sequential(nn.Conv2d(5, 8, 3), nn.ReLU(), nn.Conv2d(8, 7, 3))
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * torch.rand(1, generator=g) * 3)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
        m[0].weight[:, :] *= torch.logspace(-1, 1, 8)[:, None, None, None]  # unequal channels
    ref, orig = copy.deepcopy(m), copy.deepcopy(m)
    cross_layer_equalization(ref[0], ref[2])
    res = equalize(m, equalization_links(m), tol=1e-8, max_iter=1, mode="minmax")
    assert res.iters == 1
    for ours, theirs in ((m[0].weight, ref[0].weight), (m[0].bias, ref[0].bias), (m[2].weight, ref[2].weight)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert float((m[0].weight - orig[0].weight).detach().abs().max()) > 0.1  # it did rescale


# ---- high-bias absorption ----------------------------------------------------------------------


def _gaussian_bn_pair(seed, cin=4, mid=8, cout=6, k=1, beta=None, gamma=None):
    """conv1 (1x1) -> BN -> ReLU -> conv2 on N(0, 1) inputs, with BN running statistics set to the
    exact distribution of conv1's output, so the BN output is N(beta, gamma^2) per channel."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, cout, k))
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(m[0].weight.shape, generator=g))
        m[0].bias.copy_(torch.randn(mid, generator=g))
        m[3].weight.copy_(torch.randn(m[3].weight.shape, generator=g) * 0.3)
        m[3].bias.copy_(torch.randn(cout, generator=g) * 0.1)
        bn = m[1]
        bn.running_mean.copy_(m[0].bias)
        bn.running_var.copy_(m[0].weight.flatten(1).pow(2).sum(1) - bn.eps)
        bn.weight.copy_(gamma if gamma is not None else torch.rand(mid, generator=g) + 0.5)
        bn.bias.copy_(beta if beta is not None else torch.randn(mid, generator=g))
    return m.eval()


def test_high_bias_absorption_exact_where_relu_active():
    beta = torch.tensor([4.0, 5.0, 0.3, -1.0, 6.0, 2.0, 0.0, 3.5])
    gamma = torch.tensor([0.5, 1.0, 0.5, 0.4, 1.5, 0.2, 1.0, 0.8])
    m = _gaussian_bn_pair(5, beta=beta, gamma=gamma)
    x = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        pre = m[1](m[0](x))  # BN output, before the ReLU
        y = m(x)
    fold_bn(m)
    link = equalization_links(m)[0]
    c = absorb_high_bias(m, link, beta.double(), gamma.double(), 3.0)
    expected_c = torch.clamp(beta - 3 * gamma, min=0)
    torch.testing.assert_close(c.float(), expected_c)
    assert int((c > 0).sum()) == 5
    with torch.no_grad():
        y_abs = m(x)
    cc = expected_c[None, :, None, None]
    active = ((pre >= cc) | (cc == 0)).all(1)  # every absorbed channel ReLU-active (above c)
    assert active.float().mean() > 0.97
    err = (y_abs - y).abs().amax(1)
    assert float(err[active].max()) < 1e-5 * float(y.abs().max())
    assert float(err[~active].max()) > 1e-3  # elsewhere absorption is not exact (as expected)


# ---- bias correction ---------------------------------------------------------------------------


def test_rectified_gaussian_mean_matches_formula():
    mu = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64)
    sd = torch.tensor([0.5, 1.0, 2.0, 0.3, 1.5], dtype=torch.float64)
    got = clipped_gaussian_mean(mu, sd, "relu")
    for i in range(5):
        assert float(got[i]) == pytest.approx(ref_rectified_mean(float(mu[i]), float(sd[i])), rel=1e-12)
    z = torch.randn(2_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mc = (mu[3] + sd[3] * z).clamp(0, 6).mean()  # ReLU6: Monte Carlo within 4 standard errors
    assert abs(float(clipped_gaussian_mean(mu[3:4], sd[3:4], "relu6")[0] - mc)) < 4 * 0.3 / 1414
    assert torch.equal(clipped_gaussian_mean(mu, sd, None), mu)


def test_bias_correction_removes_expected_output_bias():
    m = _gaussian_bn_pair(7, cin=8, mid=16, cout=16, k=3)
    x = torch.randn(256, 8, 10, 10, generator=torch.Generator().manual_seed(8))
    kw = dict(wbits=4, abits=None, w_granularity="per_tensor", first_wbits=16, last_wbits=None)
    errs, infos = {}, {}
    for bc in (False, True):
        ctx = ctx_for(x[:2], **kw)
        q = dfq(cle=False, bias_absorption=False, bias_correction=bc).quantize(m, ctx)
        with torch.no_grad():
            errs[bc] = (q(x) - m(x)).mean((0, 2, 3)).abs().mean()
        infos[bc] = ctx.info["n_bias_corrected"]
    assert infos == {False: 0, True: 1}  # conv2 (conv1's input is the image: no BN source)
    assert float(errs[True]) * 5 < float(errs[False])


def test_bias_correction_uses_the_layer_bits():
    """The correction equals -(eps summed over space) @ E[x] with eps on the layer's own grid."""
    m = _gaussian_bn_pair(9, cin=3, mid=6, cout=4, k=3)
    for bits in (3, 6):
        ctx = ctx_for(torch.zeros(2, 3, 8, 8), wbits=bits, abits=None, w_granularity="per_tensor",
                      first_wbits=None, last_wbits=None)
        q = dfq(cle=False, bias_absorption=False).quantize(m, ctx)
        layer = quant_layers(q)["3"].layer
        w = m[3].weight.detach().double()
        lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
        s = (hi - lo) / (2**bits - 1)
        z = -(2 ** (bits - 1)) - round(lo / s)
        wq = (torch.clamp(torch.round(w / s + z), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) - z) * s
        bn = m[1]
        pairs = zip(bn.bias.tolist(), bn.weight.tolist(), strict=True)
        ex = torch.tensor([ref_rectified_mean(b, abs(gm)) for b, gm in pairs])
        expected = m[3].bias.double() - (wq - w).sum((2, 3)) @ ex.double()
        torch.testing.assert_close(layer.bias.double(), expected, rtol=0, atol=1e-5)


# ---- the method end to end ---------------------------------------------------------------------


def test_bn_rule_ranges_follow_the_rescaled_statistics():
    """After CLE the conv2 input is channel-wise scaled by S; the bn rule must see beta*S, gamma*S."""
    m = make_test_cnn(0)
    ctx = ctx_for(torch.zeros(2, 3, 32, 32), wbits=16, abits=8, calib=[torch.randn(8, 3, 32, 32)])
    q = dfq(bias_absorption=False, bias_correction=False).quantize(m, ctx)  # 16 bits: S from weights
    folded = copy.deepcopy(m)
    fold_bn(folded)
    s = q.conv1.layer.weight.detach().abs().amax((1, 2, 3)) / folded.conv1.weight.abs().amax((1, 2, 3))
    beta, gamma = m.bn1.bias.detach(), m.bn1.weight.detach().abs()
    aq = q.conv2.act_quant
    assert aq.hi == pytest.approx(float(((beta + 6 * gamma) * s).max()), rel=1e-4)
    assert aq.lo == pytest.approx(max(0.0, float(((beta - 6 * gamma) * s).min())), abs=1e-6)
    assert ctx.info["n_act_bn_rule"] == 4 and ctx.info["act_range"] == "bn"


def test_dfq_with_every_step_off_equals_rtn_with_bn_ranges():
    m = make_test_cnn(0)
    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    ex = torch.zeros(2, 3, 32, 32)
    ctx1, ctx2 = ctx_for(ex, 4, 4, calib, act_range="bn"), ctx_for(ex, 4, 4, calib, act_range="bn")
    off = dict(relu6_to_relu=False, cle=False, bias_absorption=False, bias_correction=False)
    q1, q2 = dfq(**off).quantize(m, ctx1), RTN().quantize(m, ctx2)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q1(x), q2(x))


def test_dfq_on_test_cnn_counts_and_leaves_float_model_untouched():
    m = make_test_cnn(0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ctx = ctx_for(torch.zeros(2, 3, 32, 32), 8, 8, [torch.randn(8, 3, 32, 32)], fold_bn=False)
    q = dfq().quantize(m, ctx)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    info = ctx.info
    assert info["dfq_fold"] == "method" and info["n_bn_folded"] == 5
    assert (info["n_relu6_to_relu"], info["n_cle_pairs"], info["cle_converged"]) == (1, 3, True)
    assert info["n_bias_corrected"] == 4  # conv1, conv2, pw, fc (stem: image input; dw: after an add)
    assert isinstance(q.fc, QuantLayer)


def test_model_where_nothing_applies_runs_with_zero_counts():
    m = nn.Sequential(nn.Linear(10, 5)).eval()
    ex = torch.zeros(2, 10)
    ctx = ctx_for(ex, 8, 8, None)
    q = dfq().quantize(m, ctx)
    ref = RTN().quantize(m, ctx_for(ex, 8, 8, None))
    assert {k: ctx.info[k] for k in ("n_bn_folded", "n_relu6_to_relu", "n_cle_pairs", "n_absorbed",
                                      "n_bias_corrected", "cle_iters")} == dict.fromkeys(
        ("n_bn_folded", "n_relu6_to_relu", "n_cle_pairs", "n_absorbed", "n_bias_corrected", "cle_iters"), 0)
    x = torch.randn(4, 10)
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))


def test_untraceable_model_is_refused_unless_every_graph_step_is_off():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 1.0
            return self.b(F.relu(self.bn(self.a(x))))

    from dfq_bench.config import UnsupportedError

    m = randomize_bn(Dyn())
    with pytest.raises(UnsupportedError, match="cannot run on Dyn"):  # refused before any work
        dfq().quantize(m, ctx_for(torch.zeros(2, 3, 4, 4), 8, None, None, fold_bn=False))
    ctx = ctx_for(torch.zeros(2, 3, 4, 4), 8, None, None, fold_bn=False)
    q = dfq(relu6_to_relu=False, cle=False, bias_absorption=False, bias_correction=False).quantize(m, ctx)
    assert ctx.info["n_cle_pairs"] == 0 and ctx.info["n_bias_corrected"] == 0 and ctx.info["n_bn_folded"] == 0
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert rel_err(q(x), m(x)) < 0.05


def test_bad_config_values_give_one_line_errors():
    with pytest.raises(ValueError, match="cle_tol"):
        dfq(cle_tol=0.0)
    with pytest.raises(ValueError, match="cle_max_iter"):
        dfq(cle_max_iter=0)
    with pytest.raises(Exception, match="cle_range"):
        dfq(cle_range="median")


def test_cle_consumer_kinds_are_a_key_and_links_are_counted_per_kind():
    """conv -> ReLU -> conv -> ReLU -> avgpool -> flatten -> Linear: two links, one per consumer kind.
    With cle_consumers=[conv] (AIMET's choice) the classifier is not linked and keeps its weights;
    both settings preserve the function at 16 bits."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    with torch.no_grad():
        m[3].weight[:4] *= 20.0  # unequal channel ranges: CLE moves scales into the classifier
    x = torch.randn(4, 3, 8, 8)
    out = {}
    for consumers in (["conv", "linear"], ["conv"]):
        ctx = ctx_for(x[:2], wbits=16, first_wbits=16, last_wbits=16)
        q = dfq(cle_consumers=consumers, relu6_to_relu=False, bias_absorption=False,
                bias_correction=False).quantize(m, ctx)
        with torch.no_grad():
            assert rel_err(q(x), m(x)) < 1e-4
        out[tuple(consumers)] = (ctx.info["cle_links"], q.get_submodule("8").layer.weight.detach().clone())
    assert out[("conv", "linear")][0] == {"conv": 1, "linear": 1}
    assert out[("conv",)][0] == {"conv": 1, "linear": 0}
    assert torch.allclose(out[("conv",)][1], m[8].weight, atol=1e-4)  # only rounded to 16 bits
    assert not torch.allclose(out[("conv", "linear")][1], m[8].weight, atol=1e-2)  # rescaled by CLE
    with pytest.raises(ValueError, match=r"method.cle_consumers=\['pool'\] is invalid"):
        dfq(cle_consumers=["pool"])


# ---- conv -> depthwise -> conv triplets in closed form (method.cle_triplets) ------------------------


def _inverted_residual_net():
    """stem -> BN -> ReLU6 -> [1x1 expand -> BN -> act -> 3x3 depthwise -> BN -> act -> 1x1 project -> BN]
    twice (act: ReLU6, then ReLU), then pooling -> flatten -> Linear: the chain stem -> exp1 -> (dw1)
    -> proj1 -> exp2 -> (dw2) -> proj2 -> fc has two triplets, coupled through the links between them."""
    torch.manual_seed(0)

    def block(c, e, a):
        return [nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), a(),
                nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), a(),
                nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)]

    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                      *block(8, 24, nn.ReLU6), *block(8, 32, nn.ReLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 5))
    with torch.no_grad():
        for layer in m:
            if isinstance(layer, nn.Conv2d):
                layer.weight.mul_(torch.logspace(-1, 1, layer.out_channels)[torch.randperm(layer.out_channels)]
                                  .reshape(-1, 1, 1, 1))  # unequal channel ranges
    return randomize_bn(m).eval()


def _legacy_equalize(model, links, tol, max_iter, mode):
    """The pairwise-only sweep as it was before method.cle_triplets (frozen here as the reference)."""
    from dfq_bench.methods.dfq import CleResult, _channels, _ScaledLayer

    n_in = {link.consumer: _channels(model.get_submodule(link.producer)) for link in links}
    layers = {}
    for link in links:
        for name in (link.producer, link.consumer):
            if name not in layers:
                m = model.get_submodule(name)
                layers[name] = _ScaledLayer(m, n_in.get(name, m.weight.shape[1]), mode)
    iters, change = 0, 0.0
    while links and iters < max_iter:
        iters, change = iters + 1, 0.0
        for link in links:
            p, c = layers[link.producer], layers[link.consumer]
            r1, r2 = p.out_range(), c.in_range()
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r2 / torch.where(ok, r1, 1.0)), 1.0)
            p.s_out *= s
            c.s_in *= s
            change = max(change, float((s - 1).abs().max()))
        if change < tol:
            break
    for layer in layers.values():
        layer.write_back()
    return CleResult(iters, not links or change < tol, change, {})


def _folded(model):
    m, _ = relu6_to_relu(copy.deepcopy(model))
    fold_bn(m)
    return m, equalization_links(m)


TRIPLET_CASES = [("inverted_residual", _inverted_residual_net, (2, 3, 12, 12), 2),
                 ("mobilenetv2_fmnist", None, None, 8)]


def _triplet_case(name, build, shape):
    if build is not None:
        return build(), torch.randn(shape, generator=torch.Generator().manual_seed(1))
    built = build_registered(name)
    return randomize_bn(built.model), torch.randn((4, *built.input_size), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("mode", ["absmax", "minmax"])
@pytest.mark.parametrize("name,build,shape,n_triplets", TRIPLET_CASES, ids=[c[0] for c in TRIPLET_CASES])
def test_triplets_reach_the_pairwise_fixed_point_in_fewer_sweeps(name, build, shape, n_triplets, mode):
    model, x = _triplet_case(name, build, shape)
    (mp, links), (mt, _) = _folded(model), _folded(model)
    with torch.no_grad():
        y = mp(x)
    res_p = equalize(mp, links, 1e-8, 500, mode, triplets=False)
    res_t = equalize(mt, links, 1e-8, 500, mode, triplets=True)
    assert res_p.converged and res_t.converged
    assert (res_p.n_triplets, res_t.n_triplets) == (0, n_triplets)
    assert res_t.iters < res_p.iters
    for (k, wp), wt in zip(mp.state_dict().items(), mt.state_dict().values(), strict=True):
        if wp.is_floating_point():
            torch.testing.assert_close(wt, wp, rtol=1e-5, atol=1e-6 * float(wp.abs().max()), msg=k)
    for lk in links:  # the total scales too
        torch.testing.assert_close(res_t.scales[lk.producer], res_p.scales[lk.producer], rtol=1e-5, atol=0)
    with torch.no_grad():  # both preserve the (ReLU6 -> ReLU) float function
        assert rel_err(mt(x), y) < 1e-4 and rel_err(mp(x), y) < 1e-4


def _triplet_net(seed, cin=3, mid=6, cout=4, dead=False):
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(cin, mid, 1), nn.ReLU(), nn.Conv2d(mid, mid, 3, groups=mid), nn.ReLU(),
                      nn.Conv2d(mid, cout, 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(m[0].weight.shape, generator=g) * torch.logspace(-1, 1, mid)[:, None, None, None])
        m[2].weight.copy_(torch.rand(m[2].weight.shape, generator=g) * 2 - 1)
        m[2].weight.mul_(torch.logspace(1, -1, mid)[:, None, None, None])
        m[4].weight.copy_(torch.randn(m[4].weight.shape, generator=g) * 3)
        for layer in (m[0], m[2], m[4]):
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
        if dead:
            m[0].weight[0] = 0.0  # channel 0: the first link is dead (s12 = 1), the second still balances
            m[4].weight[:, 1] = 0.0  # channel 1: the second link is dead (s23 = 1)
    return m.eval()


def _ranges(m, mode):
    """Per channel: layer 1's output row, the depthwise kernel, layer 3's input column (explicit indexing)."""
    def rng(t):
        t = t.detach().double()
        return float(t.max() - t.min()) if mode == "minmax" else float(t.abs().max())

    mid = m[2].weight.shape[0]
    return torch.tensor([[rng(m[0].weight[i]), rng(m[2].weight[i]), rng(m[4].weight[:, i])] for i in range(mid)],
                        dtype=torch.float64)


@pytest.mark.parametrize("mode", ["absmax", "minmax"])
def test_one_closed_form_pass_makes_the_three_ranges_equal(mode):
    m = _triplet_net(21)
    r0 = _ranges(m, mode)
    links = equalization_links(m)
    pairwise = copy.deepcopy(m)
    x = torch.randn(8, 3, 7, 7, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = m(x)
        res = equalize(m, links, 1e-8, 1, mode, triplets=True)
        assert rel_err(m(x), y) < 1e-5  # the biases of layer 1 and the depthwise conv scaled with them
    assert (res.iters, res.n_triplets) == (1, 1)
    r = _ranges(m, mode)
    geo = r0.prod(1) ** (1 / 3)  # the rescaling keeps r1 * r2 * r3: the balance is their cube root
    for k in range(3):
        torch.testing.assert_close(r[:, k], geo, rtol=1e-6, atol=0)
    equalize(pairwise, links, 1e-8, 1, mode, triplets=False)  # one pairwise sweep does not balance
    rp = _ranges(pairwise, mode)
    assert float(((rp[:, 0] - rp[:, 2]).abs() / rp[:, 2]).max()) > 1e-2
    again = equalize(m, links, 1e-6, 100, mode, triplets=True)  # already the fixed point (to float32)
    assert again.converged and again.iters == 1


def test_closed_form_triplet_with_dead_channels_is_the_pairwise_fixed_point():
    m = _triplet_net(22, dead=True)
    ref = copy.deepcopy(m)
    links = equalization_links(m)
    assert equalize(m, links, 1e-8, 1, triplets=True).n_triplets == 1
    assert equalize(ref, links, 1e-12, 2000, triplets=False).converged
    for a, b in ((m[0].weight, ref[0].weight), (m[2].weight, ref[2].weight), (m[4].weight, ref[4].weight),
                 (m[0].bias, ref[0].bias), (m[2].bias, ref[2].bias)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    r = _ranges(m, "absmax")
    assert float(r[0, 0]) == 0.0 and float(r[1, 2]) == 0.0
    torch.testing.assert_close(r[0, 1], r[0, 2], rtol=1e-6, atol=0)  # dead r1: dw and layer 3 balanced
    torch.testing.assert_close(r[1, 0], r[1, 1], rtol=1e-6, atol=0)  # dead r3: layer 1 and dw balanced


@pytest.mark.parametrize("replace", [True, False], ids=["relu6_to_relu", "relu6_kept"])
def test_dfq_with_triplets_preserves_the_float_function(replace):
    """At 16 bits, with and without the ReLU6 replacement (against the float model after it, as the
    tests above): without it the ReLU6 block has no links, so only the ReLU block is a triplet."""
    m = _inverted_residual_net()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    ref = relu6_to_relu(copy.deepcopy(m))[0] if replace else m
    infos = {}
    for tri in (True, False):
        ctx = ctx_for(x[:2], wbits=16, abits=None, first_wbits=None, last_wbits=None)
        q = dfq(cle_triplets=tri, relu6_to_relu=replace, cle_max_iter=500, bias_correction=False).quantize(m, ctx)
        with torch.no_grad():
            assert rel_err(q(x), ref(x)) < 1e-4
        infos[tri] = {k: ctx.info[k] for k in ("n_cle_pairs", "n_cle_triplets", "cle_converged")}
    n_links, n_tri = (7, 2) if replace else (4, 1)  # ReLU6 kept: stem -> exp1 -> dw1 -> proj1 unlinked
    assert infos[True] == {"n_cle_pairs": n_links, "n_cle_triplets": n_tri, "cle_converged": True}
    assert infos[False] == {"n_cle_pairs": n_links, "n_cle_triplets": 0, "cle_converged": True}


@pytest.mark.parametrize("mode", ["absmax", "minmax"])
def test_cle_triplets_false_is_the_previous_pairwise_sweep_bit_for_bit(mode):
    model = _inverted_residual_net()
    (a, links), (b, _) = _folded(model), _folded(model)
    res = equalize(a, links, 1e-8, 100, mode, triplets=False)
    old = _legacy_equalize(b, links, 1e-8, 100, mode)
    assert (res.iters, res.converged, res.last_change, res.n_triplets) == (old.iters, old.converged,
                                                                           old.last_change, 0)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # end to end, the method at the legacy value runs that sweep (same quantized weights)
    x = torch.randn(2, 3, 12, 12)
    ctx = ctx_for(x, wbits=8, abits=None)
    q = dfq(cle_triplets=False, cle_range=mode, bias_absorption=False, bias_correction=False).quantize(model, ctx)
    assert ctx.info["cle_iters"] == old.iters and ctx.info["n_cle_triplets"] == 0
    for lk in links:  # biases stay float: the legacy sweep's, bit for bit
        assert torch.equal(q.get_submodule(lk.producer).layer.bias, b.get_submodule(lk.producer).bias)


def test_dfq_on_a_model_without_triplets_is_unchanged_by_the_key():
    m = make_test_cnn(0)
    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    out = []
    for tri in (True, False):
        ctx = ctx_for(torch.zeros(2, 3, 32, 32), 4, 4, calib)
        q = dfq(cle_triplets=tri).quantize(m, ctx)
        out.append((q, ctx.info["n_cle_triplets"], ctx.info["cle_iters"]))
    assert out[0][1:] == (0, out[1][2]) and out[1][1] == 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(out[0][0](x), out[1][0](x))


def test_zoo_mobilenetv2_fmnist_legacy_sweeps_match_the_committed_rows():
    """The committed rows (pairwise sweep) report cle_iters; the legacy value reproduces it, the
    default solves the 8 triplets in closed form in fewer sweeps."""
    import json
    from pathlib import Path

    from dfq_bench.config import ModelConfig
    from dfq_bench.registry import MODELS

    rows = [json.loads(line) for line in
            (Path(__file__).parents[1] / "results" / "dfq_ablation" / "runs.jsonl").read_text().splitlines()]
    committed = {r["cle_iters"] for r in rows if r["model"] == "mobilenetv2_fmnist" and r.get("cle_iters")}
    built = MODELS.get("mobilenetv2_fmnist")(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                             {"name": "mobilenetv2_fmnist", "weights": "zoo"}))
    got = {}
    for tri in (False, True):
        ctx = ctx_for(torch.zeros(2, *built.input_size), wbits=8, abits=None)
        dfq(cle_triplets=tri, bias_absorption=False, bias_correction=False).quantize(built.model, ctx)
        got[tri] = (ctx.info["cle_iters"], ctx.info["n_cle_triplets"])
    assert committed == {got[False][0]} and got[False][1] == 0
    assert got[True][1] == 8 and got[True][0] < got[False][0]


def test_run_id_at_the_legacy_value_is_the_run_id_without_the_key():
    """cle_triplets=false (and any value with cle=false) is not hashed: the committed rows keep their
    run_ids; the default (true) is a new run. The committed reference row of DFQ on resnet20_fmnist
    W4 is found at the legacy value."""
    import json
    from pathlib import Path

    from helpers import compose_cfg

    from dfq_bench.run.runner import run_id

    base = ["method=dfq", "model=resnet20_fmnist", "wbits=4", "seed=0", "abits=null", "dataset=fashion_mnist",
            "dataset.limit=2000"]
    rid = lambda *o: run_id(compose_cfg([*base, *o]))  # noqa: E731
    without = rid("~method.cle_triplets")
    assert rid("method.cle_triplets=false") == without != rid() == rid("method.cle_triplets=true")
    assert rid("method.cle=false") == rid("method.cle=false", "~method.cle_triplets") == rid(
        "method.cle=false", "method.cle_triplets=false")
    committed = {r["run_id"] for r in map(json.loads, (Path(__file__).parents[1] / "results" / "reference" /
                                                     "runs.jsonl").read_text().splitlines())}
    assert without in committed and rid() not in committed
