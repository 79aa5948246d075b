"""Synthetic data (ZeroQ, GENIE-D), its cache, swing convolution, and GENIE-M reconstruction."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_cfg
from omegaconf import OmegaConf
from torch import nn

from dfq_bench import catalog  # noqa: F401
from dfq_bench.calib.genie import swing_convs
from dfq_bench.config import CONF_DIR, plugin_config, validate_config
from dfq_bench.core.bn import prepare_model
from dfq_bench.core.method import QuantContext
from dfq_bench.core.modules import ActQuant, QuantLayer, quant_layers
from dfq_bench.models.test_cnn import make_test_cnn
from dfq_bench.registry import METHODS, SYNTH
from dfq_bench.run.runner import run

SIZE = (3, 16, 16)


def consistent_cnn() -> nn.Module:
    """test_cnn whose BN running statistics are those of a data distribution (as in a trained
    network), so that inputs reproducing them exist."""
    m = make_test_cnn(0)
    g = torch.Generator().manual_seed(5)
    x = F.avg_pool2d(torch.randn(64, *SIZE, generator=g), 3, 1, 1) * 2
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the pass
    m.train()
    with torch.no_grad():
        m(x)
    return m.eval()


def gen_cfg(name: str, **over):
    gen = SYNTH.get(name)
    return gen, plugin_config(gen, OmegaConf.create({"name": name, "cache": False, **over}), "data")


def generate(name: str, model, seed: int = 0, **over):
    gen, cfg = gen_cfg(name, **over)
    return gen.generate(cfg, model, SIZE, seed, "cpu")


ZEROQ_SMALL = dict(num_samples=16, batch_size=16, steps=50)
GENIE_SMALL = dict(num_samples=16, batch_size=16, steps=100, gen_channels=32)


def test_zeroq_bn_loss_falls_tenfold_and_teacher_is_untouched():
    model = consistent_cnn()
    before = copy.deepcopy(model.state_dict())
    batches = generate("zeroq", model, **ZEROQ_SMALL)
    info = batches.info
    assert info["n_bn_terms"] == 5 and info["loss_end"] * 10 <= info["loss_start"]
    assert [tuple(b.shape) for b in batches] == [(16, *SIZE)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_genie_bn_loss_falls_tenfold():
    model = consistent_cnn()
    batches = generate("genie", model, **GENIE_SMALL)
    info = batches.info
    assert info["n_bn_terms"] == 5 and info["loss_end"] * 10 <= info["loss_start"]
    x = batches[0]
    assert x.shape == (16, *SIZE) and not x.requires_grad
    # the generator ends with a BN without affine: per-channel batch mean 0, std 1
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)


@pytest.mark.parametrize("name,over", [("zeroq", dict(num_samples=8, batch_size=4, steps=5)),
                                       ("genie", dict(num_samples=8, batch_size=4, steps=5, gen_channels=16))])
def test_same_seed_gives_identical_data(name, over):
    model = make_test_cnn(0)
    a, b = generate(name, model, 3, **over), generate(name, model, 3, **over)
    c = generate(name, model, 4, **over)
    assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def reflect(i: int, n: int) -> int:
    return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


def shifted(x, dy: int, dx: int):
    """x[..., i, j] -> x[..., i + dy, j + dx] with mirror borders, by explicit indexing."""
    h, w = x.shape[-2:]
    rows = torch.tensor([reflect(i + dy, h) for i in range(h)])
    cols = torch.tensor([reflect(j + dx, w) for j in range(w)])
    return x[..., rows, :][..., cols]


def test_swing_changes_strided_conv_outputs_only_by_one_pixel_shifts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    strided, plain = model[0], model[1]
    x = torch.randn(2, 3, 9, 10)
    candidates = {(dy, dx): strided(shifted(x, dy, dx)) for dy, dx in itertools.product((-1, 0, 1), repeat=2)}
    seen = set()
    g = torch.Generator().manual_seed(0)
    with swing_convs(model, g) as n_swung:
        assert n_swung == 1
        for _ in range(60):
            out = strided(x)
            match = [s for s, ref in candidates.items() if torch.allclose(out, ref, atol=1e-6)]
            assert len(match) == 1
            seen.add(match[0])
        y = torch.randn(2, 4, 5, 5)
        assert torch.equal(plain(y), F.conv2d(y, plain.weight, plain.bias, padding=1))  # stride 1: unchanged
    assert seen == set(candidates)  # every shift in {-1, 0, 1}^2 occurs
    assert torch.equal(strided(x), candidates[(0, 0)])  # hooks removed on exit


def test_cache_hit_on_second_call_and_corrupt_file_is_regenerated(tmp_path):
    model = make_test_cnn(0)
    gen, cfg = gen_cfg("zeroq", num_samples=4, batch_size=4, steps=3, cache=True, cache_dir=str(tmp_path))
    first = gen.generate(cfg, model, SIZE, 0, "cpu")
    second = gen.generate(cfg, model, SIZE, 0, "cpu")
    assert first.info["cache"] == "miss" and second.info["cache"] == "hit"
    assert torch.equal(first[0], second[0])
    assert second.info["t_generate_s"] == first.info["t_generate_s"]  # when the set was made
    files = list((tmp_path / "synth").glob("zeroq-*.pt"))
    assert len(files) == 1 and not list((tmp_path / "synth").glob(".*tmp"))
    files[0].write_bytes(b"not a torch file")
    third = gen.generate(cfg, model, SIZE, 0, "cpu")
    assert third.info["cache"] == "miss" and torch.equal(third[0], first[0])
    assert gen.generate(cfg, model, SIZE, 0, "cpu").info["cache"] == "hit"
    # other weights, seed or config: other keys
    other = make_test_cnn(1)
    assert gen.generate(cfg, other, SIZE, 0, "cpu").info["cache"] == "miss"
    assert gen.generate(cfg, model, SIZE, 1, "cpu").info["cache"] == "miss"
    _, cfg2 = gen_cfg("zeroq", num_samples=4, batch_size=4, steps=4, cache=True, cache_dir=str(tmp_path))
    assert gen.generate(cfg2, model, SIZE, 0, "cpu").info["cache"] == "miss"
    assert len(list((tmp_path / "synth").glob("zeroq-*.pt"))) == 4


@pytest.mark.parametrize("overrides,method,data,preset", [
    (["method=zeroq"], "zeroq", "zeroq", "paper"),
    (["method=zeroq", "data=zeroq_cpu"], "zeroq", "zeroq", "cpu"),
    (["method=zeroq", "data=real"], "zeroq", "real", None),
    (["method=genie"], "genie", "genie", "paper"),
    (["method=genie_cpu"], "genie", "genie", "cpu"),
    (["method=genie_cpu", "data=noise"], "genie", "noise", None),
    (["method=rtn"], "rtn", "noise", None),
])
def test_method_yaml_chooses_default_data_and_data_override_wins(overrides, method, data, preset):
    cfg = compose_cfg(overrides)
    validate_config(cfg)
    assert (cfg.method.name, cfg.data.name, cfg.data.get("preset")) == (method, data, preset)


def test_zeroq_run_records_preset_data_info_and_minmax_ranges(tmp_path):
    cfg = compose_cfg(["method=zeroq", "model=test_cnn", "dataset=fake", "wbits=8", "abits=8",
                       f"results_dir={tmp_path}", "data.num_samples=8", "data.batch_size=8", "data.steps=3",
                       "data.cache=false"])
    row = run(cfg)
    assert row["status"] == "ok" and row["method"] == "zeroq" and row["data"]["preset"] == "paper"
    assert row["data_info"]["cache"] == "off" and row["data_info"]["n_bn_terms"] == 5
    assert row["act_range"] == "minmax" and row["n_act_quant"] == 5 and row["t_synth_s"] > 0


# ---------------------------------------------------------------------------------------------
# GENIE-M


class BasicBlock(nn.Module):
    """A ResNet basic block: the class name makes it one reconstruction block."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = BasicBlock(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


def tiny_resnet() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = TinyResNet()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / mod.weight[0].numel()) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.2)
    return m.eval()


def rtn_fake(w, bits):
    """Reference RTN: per-output-channel asymmetric min/max (range widened to 0), signed grid."""
    flat = w.reshape(w.shape[0], -1)
    lo, hi = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = (hi - lo) / (qmax - qmin)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    shape = (-1,) + (1,) * (w.dim() - 1)
    scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (torch.clamp(torch.round(w / scale) + zp, qmin, qmax) - zp) * scale


def act_fake(x, lo, hi, bits):
    """Reference per-tensor min/max activation fake-quant (unsigned grid, integer zero-point)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2**bits - 1)
    zp = min(max(round(-lo / scale), 0), 2**bits - 1)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 2**bits - 1) - zp) * scale


def genie_run(steps: int, wbits: int = 4, abits: int = 4):
    model = tiny_resnet()
    protocol = OmegaConf.load(CONF_DIR / "protocol" / "common.yaml")
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(64, 3, 8, 8, generator=g) for _ in range(2)]
    cls = METHODS.get("genie")
    cfg = plugin_config(cls, OmegaConf.create({"name": "genie", "steps": steps}), "method")
    ctx = QuantContext(wbits, abits, protocol, 0, "cpu", torch.zeros(2, 3, 8, 8), calib=calib)
    before = copy.deepcopy(model.state_dict())
    qmodel = cls(cfg).quantize(model, ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # float model untouched
    return model, qmodel, ctx, torch.cat(calib)


def test_genie_m_beats_rtn_on_a_block_and_learned_weights_are_on_the_grid():
    from dfq_bench.methods.genie import capture

    model, qmodel, ctx, x = genie_run(steps=300)
    blocks = {b["block"]: b for b in ctx.info["recon_blocks"]}
    assert list(blocks) == ["stem.0", "block", "fc"] and blocks["block"]["n_layers"] == 2
    assert blocks["block"]["loss_final"] < blocks["block"]["loss_init"]

    # RTN on the same block, same inputs (the quantized stem's outputs), same FP32 targets
    teacher, _ = prepare_model(model, fold=True)
    _, y = capture(teacher, teacher.block, x, 64, output=True)
    x_q, _ = capture(qmodel, qmodel.block, x, 64, output=False)
    tb = teacher.block
    w1, w2 = rtn_fake(tb.conv1.weight, 4), rtn_fake(tb.conv2.weight, 4)
    with torch.no_grad():
        a1 = act_fake(x_q, float(x_q.min()), float(x_q.max()), 4)
        h = F.relu(F.conv2d(a1, w1, tb.conv1.bias, padding=1))
        a2 = act_fake(h, float(h.min()), float(h.max()), 4)
        y_rtn = F.relu(x_q + F.conv2d(a2, w2, tb.conv2.bias, padding=1))
        rtn_loss = float((y_rtn - y).pow(2).sum(1).mean())
        genie_loss = float((qmodel.block(x_q) - y).pow(2).sum(1).mean())
    assert genie_loss == pytest.approx(blocks["block"]["loss_final"], rel=1e-4)
    assert genie_loss < rtn_loss

    # learned weights: integer levels recoverable exactly, on the grid, <= 2^b per channel
    layers = quant_layers(qmodel)
    assert set(layers) == {"stem.0", "block.conv1", "block.conv2", "fc"}
    for name, ql in layers.items():
        bits = 8 if name in ("stem.0", "fc") else 4
        assert ql.w_bits == bits and not ql.layer.weight.requires_grad
        levels = ql.weight_levels()
        assert torch.equal(levels, torch.round(levels))
        assert levels.min() >= -(2 ** (bits - 1)) and levels.max() <= 2 ** (bits - 1) - 1
        assert torch.equal((levels - ql.w_zero_point) * ql.w_scale, ql.layer.weight)
        for row in levels.reshape(levels.shape[0], -1):
            assert len(torch.unique(row)) <= 2**bits
        assert (ql.act_quant is None) == (name == "stem.0")  # the network input stays float
        if ql.act_quant is not None:
            assert isinstance(ql.act_quant, ActQuant) and ql.act_quant.state == "on"
            assert ql.act_quant.qmax == 2 ** (8 if name == "fc" else 4) - 1
    assert not any(p.requires_grad for p in qmodel.parameters())


def test_genie_m_same_seed_same_model():
    _, qa, _, _ = genie_run(steps=20)
    _, qb, _, _ = genie_run(steps=20)
    assert isinstance(qa.block.conv1, QuantLayer)
    assert all(torch.equal(a, b) for a, b in zip(qa.state_dict().values(), qb.state_dict().values(), strict=True))


# ---- ZeroQ's eps and initial noise as the reference ---------------------------------------------


def reference_zeroq_loss(x, bns, bn_inputs, eps=1e-6):
    """The reference's loss written out: one fixed eps in every std (input, samples, BN targets)."""
    def stats(t):
        flat = t.reshape(t.shape[0], t.shape[1], -1)
        return flat.mean(2), torch.sqrt(flat.var(2, unbiased=True) + eps)

    n = x.shape[0]
    m, s = stats(x)
    total = (torch.norm(m) ** 2 + torch.norm(s - 1.0) ** 2) / n
    for bn, inp in zip(bns, bn_inputs, strict=True):
        m, s = stats(inp)
        total = total + (torch.norm(m - bn.running_mean) ** 2
                         + torch.norm(s - torch.sqrt(bn.running_var + eps)) ** 2) / n
    return total


def test_zeroq_loss_uses_the_reference_eps_by_default():
    """Variances near 1e-6 (where the eps matters): the default loss equals the reference's formula,
    the old rule (each BN's eps 1e-5, 0 for the input term) does not."""
    from dfq_bench.calib.zeroq import ZeroQData, zeroq_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)  # input term ~0: the BN term counts
    inp = torch.randn(4, 5, 6, 6, generator=g) * 1e-3 + torch.arange(5.0).reshape(1, 5, 1, 1)
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.arange(5.0))
        bn.running_var.fill_(2e-6)
    assert gen_cfg("zeroq")[1].eps == 1e-6 and ZeroQData.Config.eps == 1e-6
    got = zeroq_loss(x, [bn], [inp], eps=gen_cfg("zeroq")[1].eps)
    assert float(got) == pytest.approx(float(reference_zeroq_loss(x, [bn], [inp])), rel=1e-5)
    old = zeroq_loss(x, [bn], [inp], eps=None)
    assert abs(float(old) / float(got) - 1) > 0.5


def test_zeroq_reference_init_is_the_released_discrete_noise():
    model = consistent_cnn()
    batches = generate("zeroq", model, num_samples=64, batch_size=64, steps=1, lr=1e-12, init="reference")
    x = torch.cat(list(batches))
    k = x * 5418.75 + 127.5  # back to the integers 0..255 (one Adam step of 1e-12 moves nothing visible)
    assert torch.allclose(k, k.round(), atol=1e-3) and float(k.min()) >= -1e-3 and float(k.max()) <= 255 + 1e-3
    assert float(x.std()) == pytest.approx(73.9 / 5418.75, rel=0.02)  # std 0.0136
    with pytest.raises(Exception, match=r"data.init='uniform' is invalid; valid: gaussian, reference"):
        gen_cfg("zeroq", init="uniform")
