"""The row's ``command`` (run/command.py): the command line that reproduces a run from the repository root.

A CLI run's recorded command, run again, gives the same row (run_id, identity fields, metrics, and the same
command); the command holds the group choices, bits and seed, and every key away from the defaults; rows
without one (committed rows made before the field) get one rebuilt from their fields, or None.
"""

import json
import shlex
import subprocess
import sys

from helpers import REPO, cli, compose_cfg, rows_in
from omegaconf import open_dict

from dfq_bench.config import CONF_DIR
from dfq_bench.core.method import Method
from dfq_bench.registry import METHODS
from dfq_bench.run.command import CHOICE_GROUPS, PROGRAM, command_line, row_command
from dfq_bench.run.runner import run, run_id

SAME = ("run_id", "method", "method_version", "method_cfg", "model", "weights", "dataset", "wbits", "abits", "seed",
        "protocol", "data", "status", "top1", "top5", "top1_fp32", "top5_fp32", "delta_top1", "agree_fp32",
        "kl_fp32", "n_eval", "dataset_info")
TINY = ["model=test_cnn", "dataset=fake", "dataset.num_samples=32", "dataset.batch_size=32"]


def composed(overrides):
    """(config without its hydra node, Hydra's group choices) of ``overrides``, as the CLI has them."""
    cfg = compose_cfg(overrides, hydra_cfg=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def overrides_of(command):
    argv = shlex.split(command)
    assert " ".join(argv[:3]) == PROGRAM
    return argv[3:]


def test_the_command_in_a_row_reruns_to_the_same_row(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    args = [*TINY, "method=squant", "protocol.fold_bn=false", "seed=3", "results_dir=first",
            f"hydra.run.dir={tmp_path / 'out1'}"]
    done = cli(args, cwd=tmp_path)  # from elsewhere: the command is for the repository root
    assert done.returncode == 0, done.stderr
    (row,) = rows_in(first)
    command = row["command"]
    tokens = overrides_of(command)
    assert tokens[:6] == [f"{g}={v}" for g, v in zip(CHOICE_GROUPS, ("test_cnn", "fake", "squant", "common",
                                                                      "noise", "none"), strict=True)]
    assert {"wbits=4", "abits=4", "seed=3", "protocol.fold_bn=false", "dataset.num_samples=32",
            f"results_dir={first}"} <= set(tokens)
    assert not any(t.startswith(("hydra.", "progress")) for t in tokens)

    argv = shlex.split(command)  # exactly the recorded command, from the repository root, into a fresh dir
    again = subprocess.run([sys.executable, *argv[1:], f"results_dir={second}", f"hydra.run.dir={tmp_path / 'out2'}"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    (rerun,) = rows_in(second)
    assert {k: rerun.get(k) for k in SAME} == {k: row.get(k) for k in SAME}
    assert rerun["command"] == command.replace(f"results_dir={first}", f"results_dir={second}")


def test_the_defaults_give_the_group_choices_bits_and_seed_only():
    cfg, choices = composed([])
    expected = " ".join([PROGRAM, *(f"{g}={choices[g]}" for g in CHOICE_GROUPS),
                         f"wbits={cfg.wbits}", f"abits={cfg.abits}", f"seed={cfg.seed}"])
    assert command_line(cfg, choices) == expected
    assert command_line(cfg) == expected  # choices inferred from the config alone


def test_every_key_away_from_the_defaults_is_written_and_the_command_composes_back():
    overrides = ["method=dfq", "+method.cle_consumers=[conv]", "~method.cle_tol", "protocol.w_symmetric=true",
                 "dataset.limit=7", "dataset.root=/data/a b", "logger.tags=[x,y]", "abits=null", "skip_done=false",
                 "progress=true", f"results_dir={REPO / 'results' / 'x'}", f"eval_cache={REPO / '.cache' / 'ev'}"]
    cfg, choices = composed(overrides)
    command = command_line(cfg, choices)
    tokens = overrides_of(command)
    assert {"+method.cle_consumers=[conv]", "~method.cle_tol", "protocol.w_symmetric=true", "dataset.limit=7",
            'dataset.root="/data/a b"', "logger.tags=[x,y]", "abits=null", "skip_done=false",
            "results_dir=results/x", "eval_cache=.cache/ev"} <= set(tokens)  # repo paths relative to its root
    assert not any(t.startswith("progress") for t in tokens)
    assert run_id(compose_cfg(tokens)) == run_id(cfg)  # Hydra reads the command back as the same run
    assert command_line(cfg) == command


def test_an_eval_cache_under_home_is_written_with_a_tilde_and_read_expanded(tmp_path, monkeypatch):
    from dfq_bench.run.evalcache import EvalCache

    monkeypatch.setenv("HOME", str(tmp_path))  # committed rows hold no absolute path of the machine
    cfg, choices = composed([*TINY, "method=rtn", f"eval_cache={tmp_path / '.cache' / 'ev'}"])
    tokens = overrides_of(command_line(cfg, choices))
    assert 'eval_cache="~/.cache/ev"' in tokens and not any(str(tmp_path) in t for t in tokens)
    assert compose_cfg(tokens).eval_cache == "~/.cache/ev"  # quoted: Hydra's grammar has no bare ~
    assert EvalCache("~/.cache/ev", {}).path.parent == tmp_path / ".cache" / "ev"


def test_a_plugin_method_is_written_as_method_name(monkeypatch):
    class Halfway(Method):
        name, version = "halfway", "1"

    monkeypatch.setitem(METHODS._entries, "halfway", Halfway)  # registered, no conf/method YAML
    cfg, choices = composed([*TINY, "method=_plugin", "method.name=halfway"])
    assert choices["method"] == "_plugin"
    for command in (command_line(cfg, choices), command_line(cfg)):
        tokens = overrides_of(command)
        assert "method=halfway" in tokens and not any("_plugin" in t for t in tokens)


def test_an_experiment_is_written_as_such_also_when_inferred_from_its_paper_block():
    name = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))[0]
    cfg, choices = composed([f"+experiment={name}", "wbits=6"])
    command = command_line(cfg, choices)
    assert command == command_line(cfg)
    tokens = overrides_of(command)
    assert tokens[0] == f"+experiment={name}" and {"wbits=6", "abits=6"} <= set(tokens)
    assert not any(t.startswith("paper") for t in tokens)
    assert run_id(compose_cfg(tokens)) == run_id(cfg)


def test_rows_without_a_command_get_one_rebuilt_that_gives_their_run_id(tmp_path):
    cfg, _ = composed(["model=test_cnn", "dataset=fake", "dataset.num_samples=64", "method=rtn",
                       "protocol.fold_bn=false", "seed=5", f"results_dir={tmp_path}"])
    row = run(cfg)
    assert row["command"] == command_line(cfg)  # inferred choices: the same as the CLI's
    old = {k: v for k, v in row.items() if k != "command"}  # as a row made before the field
    rebuilt = row_command(old)
    assert rebuilt is not None and "dataset.num_samples=64" in rebuilt  # from n_eval
    assert run_id(compose_cfg(overrides_of(rebuilt))) == row["run_id"]
    assert row_command(row) == row["command"]
    assert row_command({**old, "run_id": "0" * 16}) is None  # not enough recorded to give that run_id
    assert row_command({**old, "dataset_info": {**old["dataset_info"], "limit": 20}}) is None

    committed = [json.loads(next(open(p))) for p in sorted((REPO / "results").glob("*/runs.jsonl"))]
    commands = [row_command({k: v for k, v in r.items() if k != "command"}) for r in committed]
    assert any(commands)
    for r, command in zip(committed, commands, strict=True):
        if command is not None:
            assert run_id(compose_cfg(overrides_of(command))) == r["run_id"], command


def test_a_config_that_no_yaml_option_matches_records_no_command():
    cfg, _ = composed([*TINY, "method=rtn"])
    with open_dict(cfg):
        cfg.model.name = "no_such_model_yaml"
    assert command_line(cfg) is None
