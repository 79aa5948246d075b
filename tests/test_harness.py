"""Registries, config composition and validation, the runner's rows, and the CLI in a subprocess."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import cli, compose_cfg, rows_in
from omegaconf import OmegaConf

from dfq_bench.config import CONF_DIR, ConfigError, validate_config
from dfq_bench.registry import METHODS, Registry, UnknownNameError
from dfq_bench.results import append_row, read_rows
from dfq_bench.run.runner import run

ROW_FIELDS = {
    "run_id", "status", "error", "method", "method_version", "model", "dataset", "wbits", "abits",
    "seed", "protocol", "top1", "top5", "top1_fp32", "top5_fp32", "agree_fp32", "kl_fp32", "n_eval",
    "t_synth_s", "t_quant_s", "t_eval_s", "t_eval_fp32_s", "peak_rss_mb", "git_sha", "git_dirty",
    "versions", "device", "device_name", "started_at",
}
SMOKE = ["method=rtn", "model=test_cnn", "dataset=fake", "wbits=4", "abits=8"]


def test_registry_register_get_list_duplicates_and_did_you_mean():
    reg = Registry("method")
    reg.register("squant", 1)
    reg.register_lazy("rtn", "dfq_bench.methods.rtn:RTN")
    assert reg.names() == ["rtn", "squant"]
    assert reg.get("rtn").name == "rtn"
    with pytest.raises(ValueError, match="duplicate method name 'squant'"):
        reg.register("squant", 2)
    with pytest.raises(UnknownNameError) as e:
        reg.get("squnat")
    assert str(e.value) == "unknown method 'squnat'; did you mean 'squant'? available: rtn, squant"
    with pytest.raises(UnknownNameError, match="^unknown method 'zzz'; available: rtn, squant$"):
        reg.get("zzz")


def all_group_options():
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        for f in sorted(group_dir.glob("*.yaml")):
            if not f.stem.startswith("_"):
                yield group_dir.name, f.stem


@pytest.mark.parametrize("group,option", list(all_group_options()))
def test_every_config_composes_and_validates(group, option):
    prefix = "+" if group == "experiment" else ""
    extra = ["model.name=resnet18"] if (group, option) in (("model", "timm"), ("model", "torchvision")) else []
    cfg = compose_cfg([f"{prefix}{group}={option}", *extra])
    validate_config(cfg)
    if group != "experiment":
        assert cfg[group].name is not None


@pytest.mark.parametrize(
    "override,message",
    [
        ("wbits=1", "wbits=1 is invalid; valid: an integer in 2..16"),
        ("wbits=17", "wbits=17 is invalid"),
        ("abits=0", "abits=0 is invalid; valid: an integer in 2..16 or null"),
        ("protocol.last_abits=1", "protocol.last_abits=1 is invalid"),
        ("protocol.a_granularity=per_channel", "a_granularity='per_channel' is not supported"),
        ("protocol.act_range=minmx", "did you mean 'minmax'?"),
        ("device=tpu", "device='tpu' is invalid"),
        ("+method.bogus=1", "method.squant: Key 'bogus' not in"),
    ],
)
def test_invalid_values_fail_before_any_model_is_built(override, message):
    cfg = compose_cfg([override])
    with pytest.raises((ConfigError, UnknownNameError), match=message.replace("?", r"\?").replace("(", r"\(")):
        validate_config(cfg)


def test_unknown_granularity_fails_at_compose_time(tmp_path):
    with pytest.raises(Exception, match="protocol.w_granularity=per_chanel") as e:
        compose_cfg(["protocol.w_granularity=per_chanel"])
    assert "expected one of [per_tensor, per_channel]" in str(e.value.__cause__)
    res = cli(["protocol.w_granularity=per_chanel"], tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: protocol.w_granularity: Invalid value 'per_chanel', expected one of [per_tensor, per_channel]"
    )
    assert not (tmp_path / "results").exists()


def test_runner_row_is_complete_and_dummy_is_exact(tmp_path):
    cfg = compose_cfg(["model=test_cnn", "dataset=fake", "method=dummy", f"results_dir={tmp_path}"])
    row = run(cfg)
    assert ROW_FIELDS <= set(row)
    assert row["status"] == "ok" and row["error"] is None
    assert row["top1"] == row["top1_fp32"] and row["agree_fp32"] == 100.0
    assert row["kl_fp32"] == pytest.approx(0.0, abs=1e-6)
    assert row["n_eval"] == 512 and row["t_synth_s"] == 0.0  # dummy asks for no calibration data
    rows = list(read_rows(tmp_path / "runs.jsonl"))
    assert len(rows) == 1 and rows[0]["run_id"] == row["run_id"]


def test_run_id_is_stable_and_ignores_results_dir(tmp_path):
    from dfq_bench.run.runner import run_id

    a = run_id(compose_cfg(["results_dir=a"]))
    assert a == run_id(compose_cfg(["results_dir=b"]))
    assert a != run_id(compose_cfg(["wbits=3"]))


def test_rtn_w8a8_on_test_cnn_agrees_with_fp32(tmp_path):
    cfg = compose_cfg(["model=test_cnn", "dataset=fake", "method=rtn", "wbits=8", "abits=8",
                       f"results_dir={tmp_path}"])
    row = run(cfg)
    assert row["agree_fp32"] >= 95.0 and abs(row["delta_top1"]) <= 2.0
    assert row["n_bn_folded"] == 5 and row["act_range"] == "minmax" and row["n_act_quant"] == 5
    cfg4 = compose_cfg(["model=test_cnn", "dataset=fake", "method=rtn", "wbits=2", "abits=2",
                        f"results_dir={tmp_path}"])
    assert run(cfg4)["kl_fp32"] > row["kl_fp32"]


def test_concurrent_appends_keep_every_line(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from dfq_bench.results import append_row
        for i in range(200):
            append_row({str(tmp_path)!r}, {{"writer": int(sys.argv[1]), "i": i, "pad": "x" * 5000}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)]) for k in range(3)]
    assert all(p.wait() == 0 for p in procs)
    rows = list(read_rows(tmp_path / "runs.jsonl"))
    assert len(rows) == 600
    assert {(r["writer"], r["i"]) for r in rows} == {(k, i) for k in range(3) for i in range(200)}


def test_corrupt_line_is_reported_and_skipped(tmp_path):
    append_row(tmp_path, {"a": 1})
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"a": 2, "trunc\n')
    append_row(tmp_path, {"a": 3})
    errors = []
    assert [r["a"] for r in read_rows(tmp_path / "runs.jsonl", errors)] == [1, 3]
    assert len(errors) == 1 and "runs.jsonl:2: corrupt row skipped" in errors[0]


# --- the CLI in a subprocess, as a user runs it ------------------------------------------------


def test_cli_smoke_appends_a_complete_row(tmp_path):
    res = cli(SMOKE, tmp_path)
    assert res.returncode == 0, res.stderr
    rows = rows_in(tmp_path / "results")
    assert len(rows) == 1 and ROW_FIELDS <= set(rows[0]) and rows[0]["status"] == "ok"
    assert (rows[0]["method"], rows[0]["wbits"], rows[0]["abits"]) == ("rtn", 4, 8)
    assert "quantized" in res.stdout and "FP32" in res.stdout
    result_json = Path(rows[0]["run_dir"]) / "result.json"
    assert json.loads(result_json.read_text())["run_id"] == rows[0]["run_id"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["method=squnat"], "error: unknown method 'squnat';"),
        (["model=test_cnnn"], "error: unknown model 'test_cnnn'; did you mean 'test_cnn'?"),
        (["wbits=1"], "error: wbits=1 is invalid; valid: an integer in 2..16"),
        (["abits=0"], "error: abits=0 is invalid"),
        (["results_dir=/proc/no/such"], "error: results_dir='/proc/no/such' is not writable"),
    ],
)
def test_cli_bad_input_gives_one_line_and_no_row(tmp_path, args, message):
    (tmp_path / "results").mkdir()
    append_row(tmp_path / "results", {"keep": "me"})
    res = cli(["model=test_cnn", "dataset=fake", *args], tmp_path)
    assert res.returncode == 2
    err_lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith(message), res.stderr
    assert rows_in(tmp_path / "results") == [{"keep": "me"}]


def test_cli_did_you_mean_squant_once_registered():
    if "squant" not in METHODS.names():
        pytest.skip("squant not registered yet")
    res = cli(["method=squnat"], Path("/tmp"))
    assert "did you mean 'squant'?" in res.stderr


@pytest.fixture
def plugin_path(tmp_path):
    """A third-party package that registers methods through the `dfq_bench.methods` entry point."""
    site = tmp_path / "site"
    (site / "myplug-0.1.dist-info").mkdir(parents=True)
    (site / "myplug-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (site / "myplug-0.1.dist-info" / "entry_points.txt").write_text(
        "[dfq_bench.methods]\nhalf_rtn = myplug:HalfRTN\nbroken = myplug:Broken\n"
    )
    (site / "myplug.py").write_text(textwrap.dedent("""
        from dfq_bench.core.method import Method

        class HalfRTN(Method):
            name, version = "half_rtn", "0.1"

        class Broken(Method):
            name, version = "broken", "0.1"

            def quantize(self, model, ctx):
                raise RuntimeError("boom in quantize")
    """))
    return site


def test_entry_point_plugin_runs_and_failure_writes_failed_row(tmp_path, plugin_path):
    env = {"PYTHONPATH": str(plugin_path)}
    ok = cli(["model=test_cnn", "dataset=fake", "method=half_rtn", "wbits=8", "abits=8"], tmp_path, env)
    assert ok.returncode == 0, ok.stderr
    bad = cli(["model=test_cnn", "dataset=fake", "method=broken"], tmp_path, env)
    assert bad.returncode == 1
    assert "boom in quantize" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    rows = rows_in(tmp_path / "results")
    assert [(r["method"], r["status"]) for r in rows] == [("half_rtn", "ok"), ("broken", "failed")]
    assert rows[1]["error"] == "RuntimeError: boom in quantize" and rows[1]["top1"] is None
    typo = cli(["method=brokn"], tmp_path, env)
    assert "did you mean 'broken'?" in typo.stderr and typo.returncode == 2


def test_composed_protocol_is_recorded_in_row(tmp_path):
    cfg = compose_cfg(["model=test_cnn", "dataset=fake", "method=rtn", "protocol.fold_bn=false",
                       f"results_dir={tmp_path}"])
    row = run(cfg)
    assert row["protocol"] == OmegaConf.to_container(cfg.protocol, enum_to_str=True)
    assert row["protocol"]["fold_bn"] is False and row["n_bn_folded"] == 0
