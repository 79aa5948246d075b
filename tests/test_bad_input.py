"""Bad input as a user types it: one line naming the value and what is valid, exit code 2, no row,
before any model is built (the README's "bad input" section).

The CLI cases run the real command in a subprocess (about 3 s each), so they are the ones where the
exit code, the absence of a row or the multirun path is the point; the others call ``validate_config``
or ``sweep_error`` in-process on the composed config, where the message is what matters.
"""

import pytest
import torch
from helpers import cli, compose_cfg

from dfq_bench.config import CONF_DIR, ConfigError, validate_config
from dfq_bench.registry import METHODS

SMALL = ["model=test_cnn", "dataset=fake"]


def methods_available():
    yamls = {p.stem for p in (CONF_DIR / "method").glob("*.yaml") if not p.stem.startswith("_")}
    return ", ".join(sorted(yamls | set(METHODS.names())))


@pytest.mark.parametrize("overrides,message", [
    (["method=dfq", "method.cle_tol=-1"], "error: method.cle_tol=-1.0 is invalid; valid: a positive float"),
    # was: a full run whose row went to ./runs.jsonl, exit 0
    ([*SMALL, "method=rtn", "results_dir="],
     "error: results_dir='' is invalid; valid: a directory path (default: results)"),
    # was: the wbits=4 job ran and wrote its row, then the wbits=1 job failed, exit 1
    (["-m", *SMALL, "method=rtn", "wbits=4,1"], "error: wbits=1 is invalid; valid: an integer in 2..16"),
    # was: Hydra's "Could not find 'method/squnat'" over 15 lines, exit 1
    (["-m", *SMALL, "method=rtn,squnat"],
     "error: unknown method 'squnat'; did you mean 'squant'? available: {methods}"),
])
def test_bad_input_is_one_line_exit_2_and_no_row(tmp_path, overrides, message):
    out = tmp_path / "results"
    given = any(o.startswith("results_dir=") for o in overrides)
    proc = cli([*overrides, *([] if given else [f"results_dir={out}"])], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [message.format(methods=methods_available())]
    assert not out.exists()  # no row, not even an empty runs.jsonl
    assert not (tmp_path / "runs.jsonl").exists()  # results_dir='' would have written here
    assert not (tmp_path / "multirun").exists()  # no job of a sweep started


@pytest.mark.parametrize("overrides,message", [
    # the method's own keys (were a failed row and exit 1; the CLI case above runs method.cle_tol)
    (["method=dfq", "method.cle_max_iter=0"], "method.cle_max_iter=0 is invalid; valid: an integer >= 1"),
    (["method=genie_cpu", "method.drop_p=2"], "method.drop_p=2.0 is invalid; valid: a probability in [0, 1]"),
    (["method=genie_cpu", "method.steps=-1"], "method.steps=-1 is invalid; valid: an integer >= 0"),
    # was: a failed row (numpy's "Seed must be between 0 and 2**32 - 1"), exit 1
    (["seed=-1"], "seed=-1 is invalid; valid: an integer in 0..4294967295"),
    (["seed=4294967296"], "seed=4294967296 is invalid; valid: an integer in 0..4294967295"),
    (["device=cudax"], "device='cudax' is invalid; valid: cpu, cuda, cuda:N"),
    (["device=cuda:"], "device='cuda:' is invalid; valid: cpu, cuda, cuda:N"),
    (["device=cuda:x"], "device='cuda:x' is invalid; valid: cpu, cuda, cuda:N"),
    (["dataset.limit=0"], "dataset.limit=0 is invalid; valid: a positive integer or null"),
    (["dataset.limit=-5"], "dataset.limit=-5 is invalid; valid: a positive integer or null"),
    (["dataset.batch_size=0"], "dataset.batch_size=0 is invalid; valid: a positive integer"),
    (["dataset.batch_size=-8"], "dataset.batch_size=-8 is invalid; valid: a positive integer"),
    # OmegaConf would turn these into true: the override's own value is checked
    (["protocol.w_symmetric=2"], "protocol.w_symmetric=2 is invalid; valid: true or false"),
    (["protocol.fold_bn=0"], "protocol.fold_bn=0 is invalid; valid: true or false"),
    (["progress=yes"], "progress='yes' is invalid; valid: true, false or null"),
    # the open method and data nodes keep the raw value, from the command line or a YAML
    (["method=dfq", "method.cle=2"], "method.cle=2 is invalid; valid: true or false"),
    (["data=zeroq_cpu", "data.cache=0"], "data.cache=0 is invalid; valid: true or false"),
    (["results_dir=' '"], "results_dir=' ' is invalid; valid: a directory path (default: results)"),
    # was: ignored, a random-init row under a weights file's name, exit 0
    (["model=test_cnn", "model.weights=/nonexistent.pt"],
     "model.weights='/nonexistent.pt' is invalid: model test_cnn takes no weights; valid: null"),
])
def test_bad_value_is_a_one_line_config_error(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate_config(compose_cfg(overrides), overrides)
    assert str(e.value) == message


def test_values_at_the_edges_pass(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for overrides in (["seed=0"], ["seed=4294967295"], ["dataset.limit=1", "dataset.batch_size=1"],
                      ["protocol.w_symmetric=true", "protocol.fold_bn=false", "progress=null"],
                      ["method=dfq", "method.cle=false"], ["device=cuda"], ["device=cuda:1"]):
        validate_config(compose_cfg(overrides), overrides)


@pytest.mark.parametrize("device,count,message", [
    ("cuda", 0, "device='cuda' is invalid (torch sees no CUDA device); valid: cpu"),
    ("cuda:0", 0, "device='cuda:0' is invalid (torch sees no CUDA device); valid: cpu"),
    ("cuda:1", 1, "device='cuda:1' is invalid (torch sees 1 CUDA device); valid: cpu, cuda, cuda:0"),
    ("cuda:4", 2, "device='cuda:4' is invalid (torch sees 2 CUDA devices); valid: cpu, cuda, cuda:0..cuda:1"),
])
def test_cuda_device_that_torch_does_not_see(monkeypatch, device, count, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    cfg = compose_cfg([f"device={device}"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert str(e.value) == message
    validate_config(cfg, device_here=False)  # a job a remote launcher runs checks its device there


@pytest.mark.parametrize("argv,message", [
    (["-m", "protocol.w_symmetric=true,2"], "protocol.w_symmetric=2 is invalid; valid: true or false"),
    (["-m", "dataset.limit=range(-1,3)"], "dataset.limit=-1 is invalid; valid: a positive integer or null"),
    (["--multirun", "method=dfq", "method.cle=true,2"], "method.cle=2 is invalid; valid: true or false"),
    (["-m", "seed=0,1", "device=cpu,cuda"], "device='cuda' is invalid (torch sees no CUDA device); valid: cpu"),
    (["-m", "method=rtn", "protocol.w_granularity=per_channel,per_chanel"],
     "protocol.w_granularity: Invalid value 'per_chanel', expected one of [per_tensor, per_channel]"),
    (["-m", "method=rtn,squant", "wbits=4,8"], None),
    # a key of the swept methods that the default method (squant) lacks: Hydra's own error, and how to set it
    (["-m", "method=gdfq_cpu,adadfq_cpu", "method.iters_per_epoch=2"],
     "method.iters_per_epoch: Key 'iters_per_epoch' is not in struct (a multirun over method= applies "
     "method.iters_per_epoch=2 to the default method first, which lacks the key; write ++method.iters_per_epoch=2 "
     "to set it in every job)"),
    (["-m", "method=gdfq_cpu,adadfq_cpu", "++method.iters_per_epoch=2"], None),
    (["-m", "method=gdfq_cpu,adadfq_cpu", "++method.iters_per_epohc=2"],
     "method.gdfq: Key 'iters_per_epohc' not in 'Config'"),
])
def test_every_job_of_a_multirun_is_checked_first(monkeypatch, argv, message):
    from dfq_bench.run.cli import sweep_error

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert sweep_error(argv) == message


def test_a_slurm_sweep_is_not_held_to_this_machines_devices(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from dfq_bench.run.cli import sweep_error

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert sweep_error(["-m", "hydra/launcher=slurm", "device=cuda", "wbits=4,8"]) is None
    assert sweep_error(["-m", "hydra/launcher=slurm", "device=cudax", "wbits=4,8"]) == (
        "device='cudax' is invalid; valid: cpu, cuda, cuda:N")


def test_a_sweep_expands_an_experiments_params(monkeypatch):
    import dfq_bench.run.cli as cli_module

    seen = []
    monkeypatch.setattr(cli_module, "validate_config", lambda cfg, job, device_here: seen.append(
        (cfg.method.name, cfg.wbits, cfg.abits)))
    assert cli_module.sweep_error(["-m", "+experiment=squant_table1_resnet18", "method=squant,rtn"]) is None
    assert sorted(seen) == sorted((m, b, b) for m in ("squant", "rtn") for b in (4, 6, 8))


def test_a_plugin_method_in_a_multirun_list_is_refused_in_one_line(monkeypatch):
    from dfq_bench.core.method import Method
    from dfq_bench.run.cli import sweep_error

    monkeypatch.setitem(METHODS._entries, "half_rtn", Method)  # a plugin: registered, no conf/method YAML
    assert sweep_error(["-m", "method=rtn,half_rtn"]) == (
        "method=half_rtn has no conf/method/half_rtn.yaml and cannot be one value of a multirun list; "
        "valid: method=half_rtn alone, or add the YAML")


def test_a_missing_launcher_plugin_names_the_extra_to_install(tmp_path):
    """The joblib launcher's plugin made unloadable (a package shadowing it raises ImportError, as a
    missing dependency does): one line naming the extra, exit 2, no job run."""
    shadow = tmp_path / "shadow" / "hydra_plugins" / "hydra_joblib_launcher"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("No module named joblib")\n')
    out = tmp_path / "results"
    proc = cli(["-m", "hydra/launcher=local", *SMALL, "method=rtn,dummy", f"results_dir={out}"], tmp_path,
               env={"PYTHONPATH": str(tmp_path / "shadow")}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: In 'hydra/launcher/local': Could not load 'hydra/launcher/joblib'; its plugin is not installed: "
        "pip install -e '.[joblib]'")
    assert not out.exists()
