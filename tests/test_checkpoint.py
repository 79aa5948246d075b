"""Progress checkpoints (dfq_bench/checkpoint.py). GENIE-M: a run stopped after some blocks and run again
gives the uninterrupted model bit for bit; a checkpoint that is unreadable, made for other data or cannot
be written never fails a run; through the runner, the row says what was resumed, its t_quant_s counts the
earlier part, its run_id and metrics are the uninterrupted run's, and the file is gone once the row is written.
BN-statistics data (zeroq, genie): a generation stopped after some batches continues to the same data."""

import logging

import pytest
import torch
from helpers import compose_cfg, rows_in
from test_synth import SIZE, gen_cfg, tiny_resnet

import dfq_bench
from dfq_bench.calib.bnstats import BNStatsData
from dfq_bench.models.test_cnn import make_test_cnn
from dfq_bench.run.runner import run

STEPS = 12


def calib(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 3, 8, 8, generator=g) for _ in range(2)]


def genie(checkpoint=None, data_seed=1, steps=STEPS, wbits=4):
    model = tiny_resnet()
    return dfq_bench.quantize(model, "genie", wbits=wbits, abits=4, example_input=torch.zeros(2, 3, 8, 8),
                              calib=calib(data_seed), steps=steps, init_samples=32, checkpoint=checkpoint)


def stop_at_block(monkeypatch, n: int):
    """GENIE-M raises KeyboardInterrupt (Ctrl-C) when it starts block ``n`` (0-based)."""
    import dfq_bench.methods.genie as genie_module

    real, calls = genie_module.reconstruct_block, []

    def reconstruct(*args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(genie_module, "reconstruct_block", reconstruct)


def same_model(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted():
    return genie()


@pytest.mark.parametrize("stop", [1, 2])  # after the stem; after the stem and the two-layer residual block
def test_a_stopped_run_resumes_to_the_uninterrupted_model_bit_for_bit(tmp_path, monkeypatch, uninterrupted, stop):
    ref_model, ref_info = uninterrupted
    ckpt = tmp_path / "run.pt"
    with monkeypatch.context() as m:
        stop_at_block(m, stop)
        with pytest.raises(KeyboardInterrupt):
            genie(ckpt)
    assert ckpt.is_file() and not list(tmp_path.glob(".*.tmp"))
    qmodel, info = genie(ckpt)
    assert info["resumed"]["units_done"] == stop and info["resumed"]["n_units"] == 3
    assert info["resumed"]["t_before_s"] > 0
    assert info["recon_blocks"] == ref_info["recon_blocks"]  # the losses of every block, the restored ones too
    assert info["n_act_quant"] == ref_info["n_act_quant"]
    assert same_model(qmodel, ref_model)
    restored = qmodel.block.conv2.act_quant if stop == 2 else qmodel.get_submodule("stem.0")
    assert restored is not None  # the frozen quantizer's Python attributes came back with it:
    if stop == 2:
        ref_aq = ref_model.block.conv2.act_quant
        assert (restored.state, restored.qmin, restored.qmax, restored.lo, restored.hi) == (
            ref_aq.state, ref_aq.qmin, ref_aq.qmax, ref_aq.lo, ref_aq.hi)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(qmodel(x), ref_model(x))


def test_a_checkpoint_for_other_data_or_a_torn_one_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog,
                                                                             uninterrupted):
    ckpt = tmp_path / "run.pt"
    with monkeypatch.context() as m:
        stop_at_block(m, 1)
        with pytest.raises(KeyboardInterrupt):
            genie(ckpt, data_seed=2)  # other calibration data
    with caplog.at_level(logging.WARNING):
        qmodel, info = genie(ckpt)
    assert "resumed" not in info and same_model(qmodel, uninterrupted[0])
    assert "made for other units or data" in caplog.text
    ckpt.write_bytes(b"PK\x03\x04 torn")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        qmodel, info = genie(ckpt)
    assert "resumed" not in info and same_model(qmodel, uninterrupted[0])
    assert "cannot be read" in caplog.text


@pytest.mark.parametrize("other", [dict(steps=STEPS + 1), dict(wbits=3)])
def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path, monkeypatch, caplog, uninterrupted, other):
    ckpt = tmp_path / "run.pt"  # an API caller reusing one path: the fingerprint holds the keys and the bits
    with monkeypatch.context() as m:
        stop_at_block(m, 2)
        with pytest.raises(KeyboardInterrupt):
            genie(ckpt, **other)
    with caplog.at_level(logging.WARNING):
        qmodel, info = genie(ckpt)
    assert "resumed" not in info and same_model(qmodel, uninterrupted[0])
    assert "made for other units or data" in caplog.text


def test_a_checkpoint_that_cannot_be_written_never_fails_the_run(tmp_path, caplog, uninterrupted):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        qmodel, info = genie(blocker / "run.pt")
    assert same_model(qmodel, uninterrupted[0]) and "resumed" not in info
    assert caplog.text.count("cannot be written") == 1  # one warning, not one per block


def test_runner_resumes_a_stopped_run_and_removes_the_checkpoint_after_the_row(tmp_path, monkeypatch):
    over = ["model=test_cnn", "dataset=fake", "dataset.num_samples=32", "dataset.batch_size=32", "method=genie_cpu",
            "method.steps=8", "method.init_samples=8", "data=noise", "data.num_samples=16", "data.batch_size=16",
            "wbits=4", "abits=8", "progress=false"]
    plain = run(compose_cfg([*over, f"results_dir={tmp_path / 'plain'}"]))
    ck = tmp_path / "ck"
    args = [*over, f"results_dir={tmp_path / 'r'}", f"checkpoint_dir={ck}"]
    with monkeypatch.context() as m:
        stop_at_block(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run(compose_cfg(args))
    assert [p.name for p in ck.iterdir()] == [f"{plain['run_id']}.pt"]  # the run_id ignores checkpoint_dir
    row = run(compose_cfg(args))
    stopped, resumed = rows_in(tmp_path / "r")
    assert stopped["status"] == "failed" and stopped["error"] == "interrupted"
    assert resumed == row and row["status"] == "ok" and row["run_id"] == plain["run_id"]
    assert row["resumed"]["units_done"] == 2 and row["resumed"]["n_units"] == plain["n_blocks"]
    assert row["t_quant_s"] > row["resumed"]["t_before_s"] > 0
    for key in ("top1", "top5", "agree_fp32", "kl_fp32", "recon_blocks", "n_act_quant"):
        assert row[key] == plain[key], key
    assert f"checkpoint_dir={ck}" in row["command"] and "resumed" not in plain
    assert list(ck.iterdir()) == []  # the row holds the result: the checkpoint is removed


@pytest.mark.parametrize("name,keys", [("zeroq", dict(steps=3)), ("genie", dict(steps=3, gen_channels=16))])
def test_a_stopped_data_generation_continues_at_its_next_batch_to_the_same_data(tmp_path, monkeypatch, name, keys):
    model = make_test_cnn(0)
    gen, plain = gen_cfg(name, num_samples=12, batch_size=4, **keys)  # 3 batches, cache off
    reference = gen.generate(plain, model, SIZE, 0, "cpu")
    _, cfg = gen_cfg(name, num_samples=12, batch_size=4, cache=True, cache_dir=str(tmp_path), **keys)
    real, calls = gen.distill_batch, []

    def stop_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(gen, "distill_batch", staticmethod(stop_at_third))
        with pytest.raises(KeyboardInterrupt):
            gen.generate(cfg, model, SIZE, 0, "cpu")
    synth = tmp_path / "synth"
    (partial,) = synth.glob(f"{name}-*.partial.pt")
    assert not list(synth.glob(".*tmp")) and len(list(synth.glob("*.pt"))) == 1  # no entry yet
    batches = gen.generate(cfg, model, SIZE, 0, "cpu")
    assert batches.info["cache"] == "miss" and batches.info["resumed"]["batches_done"] == 2
    assert batches.info["t_generate_s"] > batches.info["resumed"]["t_before_s"] > 0
    assert len(batches) == 3 and all(torch.equal(a, b) for a, b in zip(batches, reference, strict=True))
    assert (batches.info["loss_start"], batches.info["loss_end"]) == (reference.info["loss_start"],
                                                                      reference.info["loss_end"])
    assert not partial.exists() and gen.generate(cfg, model, SIZE, 0, "cpu").info["cache"] == "hit"
    assert issubclass(gen, BNStatsData)
