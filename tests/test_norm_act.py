"""Root causes of silently wrong rows on torchvision/timm models, each on a tiny model built here:
fused norm-activation modules (timm BatchNormAct2d), untraceable models, modules that cache tensors
while traced, squeeze-excite maps of one pixel, noise in the model's input space, and models chosen
by name from torchvision."""

import copy
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, cli, make_method, quant_ctx, randomize_bn
from omegaconf import OmegaConf
from timm.layers import BatchNormAct2d
from torch import fx, nn

import dfq_bench
from dfq_bench import catalog  # noqa: F401
from dfq_bench.calib.sources import Noise
from dfq_bench.calib.zeroq import ZeroQData
from dfq_bench.config import UnsupportedError
from dfq_bench.core.bn import count_bn, prepare_model
from dfq_bench.core.modules import NonFiniteError, QuantLayer
from dfq_bench.data import DataBundle
from dfq_bench.graph import NormAct, bn_producers, conv_bn_pairs, input_sources, trace
from dfq_bench.models import BuiltModel, Preprocess, reestimate_bn


def ctx_for(x, wbits=16, abits=None, calib=None, **proto):
    base = {"first_wbits": None, "last_wbits": None, "last_abits": None} if wbits == 16 else {}
    return quant_ctx(wbits, abits, x[:2], calib, **{**base, **proto})


# every BatchNorm kind (timm's BatchNormAct2d, the DoubledBN subclass below), wider spreads than test_dfq's
randomize = partial(randomize_bn, mean_std=0.3, bias_std=0.5, kinds=nn.modules.batchnorm._BatchNorm)


def no_rows(results_dir) -> bool:
    path = results_dir / "runs.jsonl"
    return not path.exists() or not path.read_text().strip()


def agreement_kl(a, b):
    kl = float(F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), log_target=True, reduction="batchmean"))
    return float((a.argmax(1) == b.argmax(1)).float().mean()), kl


class ConvBnAct(nn.Module):
    """conv -> timm BatchNormAct2d(act) -> conv -> BatchNormAct2d(act) -> pool -> fc."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BatchNormAct2d(8, act_layer=act)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = BatchNormAct2d(8, act_layer=act)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


X = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(1))


# ---- fused norm-activation ------------------------------------------------------------------------


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.Hardswish])
def test_folding_a_batchnormact_keeps_its_activation(act):
    m = randomize(ConvBnAct(act))
    info = {}
    q, n = prepare_model(m, True, info)
    assert n == 2 and info == {"bn_fold_rule": "graph", "n_norm_act_split": 2, "n_bn_unfolded": 0}
    assert isinstance(q.bn1, NormAct) and isinstance(q.bn1.act, act) and isinstance(q.bn1.bn, nn.Identity)
    with torch.no_grad():
        assert torch.allclose(q(X), m(X), atol=1e-5, rtol=1e-5)
    assert isinstance(m.bn1, BatchNormAct2d)  # the float model is untouched


def test_unfused_model_without_activation_would_differ():
    """The check above can fail: deleting the activation (what folding did before) changes the output."""
    m = randomize(ConvBnAct(nn.ReLU))
    broken = copy.deepcopy(m)
    broken.bn1.act, broken.bn2.act = nn.Identity(), nn.Identity()
    with torch.no_grad():
        assert (broken(X) - m(X)).abs().max() > 1e-2


def test_graph_sees_the_activation_inside_a_batchnormact():
    relu, silu = randomize(ConvBnAct(nn.ReLU)), randomize(ConvBnAct(nn.SiLU))
    assert conv_bn_pairs(relu) == [("conv1", "bn1.bn"), ("conv2", "bn2.bn")]
    src = input_sources(relu)["conv2"]
    assert (src.name, src.act, src.act_site) == ("bn1.bn", "relu", "bn1.act")
    assert bn_producers(relu)["conv2"][1] == "relu"
    assert "conv2" not in bn_producers(silu)  # a SiLU after the BN: no BN rule range
    assert "conv2" not in {k for k, s in input_sources(silu).items() if s.name.endswith(".bn")}


def test_bn_rule_range_after_batchnormact_relu_is_non_negative():
    m = randomize(ConvBnAct(nn.ReLU))
    q = make_method("rtn").quantize(m, ctx_for(X, 8, 8, [X], act_range="bn"))
    aq = q.conv2.act_quant
    gamma, beta = m.bn1.weight.detach(), m.bn1.bias.detach()
    assert aq.lo == 0.0 and aq.hi == pytest.approx(float((beta + 6 * gamma.abs()).max()), rel=1e-5)


@pytest.mark.parametrize("name", ["rtn", "squant", "dfq", "zeroq"])
@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU])
def test_every_method_preserves_a_batchnormact_model_at_16_bits(name, act):
    m = randomize(ConvBnAct(act))
    ctx = ctx_for(X)
    q = make_method(name).quantize(m, ctx)
    with torch.no_grad():
        agree, kl = agreement_kl(m(X), q(X))
    assert agree == 1.0 and kl < 1e-6, (agree, kl)
    assert ctx.info["n_norm_act_split"] == 2


def test_dfq_links_and_bias_correction_through_batchnormact():
    m = randomize(ConvBnAct(nn.ReLU))
    ctx = ctx_for(X, 8, None)
    make_method("dfq", bias_absorption=False).quantize(m, ctx)
    assert ctx.info["n_cle_pairs"] == 2  # conv1 -> ReLU -> conv2, conv2 -> ReLU -> pool -> fc (a SiLU stops both)
    assert ctx.info["n_bias_corrected"] == 2  # conv2 and fc read a BN output through ReLU
    ctx = ctx_for(X, 8, None)
    make_method("dfq").quantize(randomize(ConvBnAct(nn.SiLU)), ctx)
    assert ctx.info["n_cle_pairs"] == 0 and ctx.info["n_bias_corrected"] == 0


class DoubledBN(nn.BatchNorm2d):
    """A BN subclass whose forward is not plain BN."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_unknown_bn_subclass_is_not_folded_but_counted():
    m = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), DoubledBN(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)))
    with torch.no_grad():
        m(X)
    info = {}
    q, n = prepare_model(m, True, info)
    assert n == 0 and info["n_bn_unfolded"] == 1 and isinstance(q[1], DoubledBN)
    with torch.no_grad():
        assert torch.equal(q(X), m(X))


# ---- untraceable models ---------------------------------------------------------------------------


class Branchy(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) around a Sequential conv-BN-ReLU."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), BatchNormAct2d(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.head(self.body(x))
        if x.mean() > 100:  # never true, but a Proxy cannot be a bool
            x = x * 0
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_folds_by_module_rule_and_graph_free_methods_run():
    m = randomize(Branchy())
    for name in ("rtn", "squant"):
        ctx = ctx_for(X)
        q = make_method(name).quantize(m, ctx)
        assert ctx.info["bn_fold_rule"] == "module" and ctx.info["n_bn_folded"] == 2
        assert ctx.info["n_bn_unfolded"] == 0
        with torch.no_grad():
            agree, kl = agreement_kl(m(X), q(X))
        assert agree == 1.0 and kl < 1e-6


def test_untraceable_model_is_refused_by_graph_methods_before_any_work():
    m = randomize(Branchy())
    with pytest.raises(UnsupportedError, match="cannot run on Branchy.*cannot trace"):
        make_method("dfq").quantize(m, ctx_for(X))
    with pytest.raises(UnsupportedError, match="bn range rule"):
        make_method("rtn").quantize(m, ctx_for(X, 8, 8, [X], act_range="bn"))
    ctx = ctx_for(X, 8, None)  # every DFQ graph step off: nothing needs the graph
    make_method("dfq", relu6_to_relu=False, cle=False, bias_absorption=False, bias_correction=False).quantize(m, ctx)
    assert ctx.info["n_bn_folded"] == 2


def test_cli_refuses_dfq_on_an_untraceable_timm_model_in_one_line_without_a_row(tmp_path):
    out = cli(["method=dfq", "model=timm", "model.name=mobilevit_xxs", "model.weights=null", "dataset=fake",
               "dataset.num_samples=4", "wbits=8", "abits=8", f"results_dir={tmp_path}",
               f"hydra.run.dir={tmp_path}/run"], REPO)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "method dfq cannot run on timm:mobilevit_xxs" in lines[0]
    assert "cannot trace" in lines[0]
    assert no_rows(tmp_path)


# ---- tracing never touches the caller's model ------------------------------------------------------


class Caching(nn.Module):
    """Caches a tensor derived from its input when not training (as timm LeViT caches attention biases)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.cache = {}

    def forward(self, x):
        if not self.training:
            self.cache["last"] = x.sum()
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_tracing_leaves_the_model_clean_and_deepcopyable():
    m = randomize(Caching())
    trace(m)
    assert m.cache == {}
    ctx = ctx_for(X, 8, 8, [X])
    q = make_method("dfq").quantize(m, ctx)
    assert not any(isinstance(v, fx.Proxy) for v in m.cache.values())
    copy.deepcopy(m)  # breaks if a Proxy was cached in the caller's model
    assert isinstance(q.fc, QuantLayer)


# ---- squeeze-excite maps of one pixel ----------------------------------------------------------------


class SE(nn.Module):
    """conv-BN-ReLU, then a squeeze-excite gate whose reduce conv has a BN on a 1x1 map (rexnet)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se_reduce = nn.Conv2d(8, 4, 1)
        self.se_bn = nn.BatchNorm2d(4)
        self.se_expand = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        s = self.se_expand(torch.relu(self.se_bn(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        return self.fc((x * torch.sigmoid(s)).mean((2, 3)))


def test_zeroq_data_on_one_pixel_bn_maps_is_finite():
    m = randomize(SE())
    cfg = OmegaConf.structured(ZeroQData.Config(name="zeroq", num_samples=8, batch_size=8, steps=5, cache=False))
    batches, info = ZeroQData.make(cfg, m, (3, 12, 12), 0)
    assert all(bool(torch.isfinite(b).all()) for b in batches)
    assert info["n_bn_terms"] == 2 and torch.isfinite(torch.tensor(info["loss_end"]))


def test_non_finite_activation_names_the_layer():
    m = randomize(SE())
    with torch.no_grad():
        m.se_expand.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="layer fc"):
        make_method("rtn").quantize(m, ctx_for(X, 8, 8, [X]))


# ---- noise in the model's input space ------------------------------------------------------------------


def bundle(mean, std):
    return DataBundle([], 0, 10, None, {"preprocess": {"mean": list(mean), "std": list(std)}})


def test_pixel_noise_is_normalized_like_the_images_and_squant_rule_keeps_raw():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = OmegaConf.structured(Noise.Config(name="noise", num_samples=2000, batch_size=2000))
    pixel = Noise.resolve(cfg, "minmax")
    raw = Noise.resolve(cfg, "squant")
    assert (pixel.space, raw.space, cfg.space) == ("pixel", "raw", "auto")
    xp = Noise.generate(pixel, None, (3, 4, 4), 0, "cpu", bundle(mean, std))[0]
    xr = Noise.generate(raw, None, (3, 4, 4), 0, "cpu", bundle(mean, std))[0]
    assert 0.0 <= float(xr.min()) and float(xr.max()) < 1.0  # the reference's raw U[0, 1)
    for c in range(3):  # U[0, 1) pixels, then (x - mean) / std: range and mean of the normalized draw
        lo, hi = (0 - mean[c]) / std[c], (1 - mean[c]) / std[c]
        assert float(xp[:, c].min()) >= lo - 1e-6 and float(xp[:, c].max()) <= hi + 1e-6
        assert float(xp[:, c].mean()) == pytest.approx((0.5 - mean[c]) / std[c], abs=0.02)
    assert torch.allclose(xp, (xr - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(1, 3, 1, 1))
    with pytest.raises(ValueError, match="data.space=pixel"):
        Noise.generate(pixel, None, (3, 4, 4), 0, "cpu", DataBundle([], 0, 10))


def _run(tmp_path, *overrides):
    return cli(["model=test_cnn", "dataset=fake", "dataset.num_samples=16", f"results_dir={tmp_path}",
                f"hydra.run.dir={tmp_path}/run", *overrides], REPO)


def test_rows_record_the_noise_space_used(tmp_path):
    assert _run(tmp_path, "method=rtn", "wbits=8", "abits=8").returncode == 0
    assert _run(tmp_path, "method=squant", "wbits=8", "abits=8").returncode == 0
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["data"]["space"] for r in rows] == ["pixel", "raw"]


# ---- models by name ------------------------------------------------------------------------------------


def test_any_torchvision_model_by_name_and_unknown_names_fail_up_front(tmp_path):
    from dfq_bench.models.torchvision_timm import torchvision_model

    built = torchvision_model(OmegaConf.create({"name": "shufflenet_v2_x0_5", "weights": None, "sha256": None}))
    assert built.input_size == (3, 224, 224) and built.num_classes == 1000 and built.weights == "random-init"
    assert built.preprocess.resize == 256 and built.preprocess.mean == (0.485, 0.456, 0.406)
    out = _run(tmp_path, "model=torchvision", "model.name=shufflenet_v2_x0_6", "method=rtn")
    assert out.returncode == 2
    assert "unknown torchvision model 'shufflenet_v2_x0_6'; did you mean 'shufflenet_v2_x0_5'" in out.stderr
    assert no_rows(tmp_path)


def test_bn_reestimate_fits_the_statistics_to_the_images():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    built = BuiltModel(model, (1, 8, 8), 4, "random-init", Preprocess(mean=(0.5,), std=(0.25,)))
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    reestimate_bn(built, x, "eval", batch_size=16)
    with torch.no_grad():  # cumulative average of the four batches' statistics
        ys = [model[0](x[i:i + 16]) for i in range(0, 64, 16)]
    bn = model[1]
    assert torch.allclose(bn.running_mean, torch.stack([y.mean((0, 2, 3)) for y in ys]).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([y.var((0, 2, 3)) for y in ys]).mean(0), rtol=1e-5)
    assert built.weights == "random-init+bn_reestimate:64:eval" and not bn.training
    assert bn.momentum == 0.1 and count_bn(model) == 1


def test_non_finite_model_output_at_evaluation_names_the_module():
    from dfq_bench.run.runner import evaluate

    m = randomize(SE())
    q = copy.deepcopy(m)
    with torch.no_grad():
        q.se_reduce.bias[0] = float("nan")
    loader = [(X[:8], torch.zeros(8, dtype=torch.long))]
    with pytest.raises(NonFiniteError, match="quantized model's output.*first non-finite module: se_reduce"):
        evaluate(m, q, loader, "cpu", lambda it, **kw: it)
    assert evaluate(m, m, loader, "cpu", lambda it, **kw: it)["agree_fp32"] == 100.0


def test_bn_statistics_data_refuses_a_model_without_bn(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 5)).eval()
    for source in ("zeroq_cpu", "genie_cpu"):
        with pytest.raises(UnsupportedError, match="has no BatchNorm layer"):
            dfq_bench.make_calib(source, m, example_input=X[:2])
    out = cli(["method=zeroq", "data=zeroq_cpu", "model=timm", "model.name=vit_tiny_patch16_224",
               "model.weights=null", "dataset=fake", "dataset.num_samples=4", f"results_dir={tmp_path}",
               f"hydra.run.dir={tmp_path}/run"], REPO)
    assert out.returncode == 2 and "data=zeroq cannot run on timm:vit_tiny_patch16_224" in out.stderr
    assert no_rows(tmp_path)
