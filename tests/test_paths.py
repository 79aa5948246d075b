"""Committed results hold no absolute path of the machine that made them: a row's paths inside the
repository are relative to its root (paths outside it are the user's own and stay as given), and the
reference sweep's commands and SWEEP.md name repository paths relative to the root."""

import importlib.util
import json
import os
import re
import shutil
import sys

import pytest
from helpers import REPO, cli, rows_in

from dfq_bench.run import runner

ABSOLUTE = re.compile(r"(^|[\s=':\"])/")  # a path token that starts at the filesystem root


@pytest.fixture
def in_repo():
    """A scratch folder inside the repository (under the ignored .cache/), removed afterwards."""
    root = REPO / ".cache" / f"pytest_paths_{os.getpid()}"
    root.mkdir(parents=True)
    yield root
    shutil.rmtree(root)


def test_runner_finds_the_repository_root():
    assert runner.REPO == REPO and (REPO / "pyproject.toml").is_file()


def test_a_cli_row_inside_the_repository_holds_relative_paths(in_repo):
    rel = in_repo.relative_to(REPO)
    res = cli(["model=test_cnn", "dataset=fake", "dataset.num_samples=32", "dataset.batch_size=32", "wbits=4",
               "abits=8", "method=zeroq", "data=zeroq_cpu", "data.steps=2", "data.num_samples=4",
               "data.batch_size=4", f"data.cache_dir={in_repo / 'synth'}", f"eval_cache={in_repo / 'eval'}",
               f"results_dir={in_repo / 'results'}", f"hydra.run.dir={in_repo / 'run'}", "progress=false"],
              cwd=REPO)
    assert res.returncode == 0, res.stderr
    text = (in_repo / "results" / "runs.jsonl").read_text()
    assert str(REPO) not in text
    (row,) = rows_in(in_repo / "results")
    assert row["status"] == "ok" and row["run_dir"] == str(rel / "run")
    assert row["data"]["cache_dir"] == str(rel / "synth")
    cache_file = row["data_info"]["cache_file"]
    assert cache_file.startswith(str(rel / "synth") + "/") and (REPO / cache_file).is_file()
    assert json.loads((REPO / row["run_dir"] / "result.json").read_text()) == row


def test_each_path_field_is_relative_inside_the_repository_and_as_given_outside(tmp_path):
    row = {"data": {"name": "zeroq", "cache_dir": None},
           "run_dir": str(tmp_path / "run"), "deploy_dir": str(REPO / "multirun" / "x" / "deploy"),
           "dataset_info": {"root": f"{REPO}/data/val", "train_root": "/usr/share/datasets/train"},
           "data_info": {"cache_file": "/var/cache/dfq_bench/synth/x.pt"},
           "weights": f"file:{REPO}/checkpoints/m.pt sha256:ab"}
    info = row["dataset_info"]
    runner._relative_paths(row)
    assert row == {"data": {"name": "zeroq", "cache_dir": None},
                   "run_dir": str(tmp_path / "run"), "deploy_dir": "multirun/x/deploy",
                   "dataset_info": {"root": "data/val", "train_root": "/usr/share/datasets/train"},
                   "data_info": {"cache_file": "/var/cache/dfq_bench/synth/x.pt"},
                   "weights": "file:checkpoints/m.pt sha256:ab"}
    assert info["root"] == f"{REPO}/data/val"  # the dataset's own info is left alone: the row has a copy


def load_reference_sweep():
    spec = importlib.util.spec_from_file_location("reference_sweep", REPO / "scripts" / "reference_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_reference_sweep_commands_and_sweep_md_name_repository_paths_relatively(tmp_path, capsys):
    ref = load_reference_sweep()
    argv = ["--methods", "rtn", "--models", "test_cnn", "--dataset", "fake", "--out", str(REPO / "results" / "x"),
            "--eval-cache", str(REPO / ".cache" / "eval"), "--sweep-dir", str(REPO / "multirun" / "x"),
            "dataset.limit=8"]
    assert ref.main([*argv, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    steps, commands = ref.sweep_commands(ref.parse_args(argv))
    text = ref.sweep_md(argv, "2026-01-01T00:00:00+00:00", 1.0, sum(s.n_runs for s in steps), commands, "results/x")
    for out in (printed, text):
        assert str(REPO) not in out and not ABSOLUTE.search(out), out
        assert "results_dir=results/x " in out and "eval_cache=.cache/eval " in out
        assert "'hydra.sweep.dir=multirun/x/${now:%Y-%m-%d_%H-%M-%S}'" in out
    assert "`python scripts/reference_sweep.py --methods rtn" in text and "--out results/x " in text
    # outside the repository a path is absolute: the commands run from the repository root
    assert ref.repo_relative(tmp_path / "out") == str(tmp_path / "out")


def test_a_path_under_the_home_directory_is_written_home_relative(tmp_path, monkeypatch):
    from dfq_bench.run.runner import repo_relative

    monkeypatch.setenv("HOME", str(tmp_path))
    assert repo_relative(tmp_path / ".cache" / "dfq_bench" / "x.pt") == "~/.cache/dfq_bench/x.pt"
    assert repo_relative("/usr/share/datasets/fashion-mnist") == "/usr/share/datasets/fashion-mnist"


def test_committed_rows_and_pages_hold_no_path_of_the_machine_that_made_them():
    """Rows and pages under results/ name repository paths relatively and home paths as ``~/...``; a
    system path that is the same on every machine (Debian's /usr/share/datasets/...) may stay."""
    machine = re.compile(r"(?<![\w.~])/(root|home|work|tmp|Users)/")
    files = [p for p in sorted((REPO / "results").rglob("*")) if p.name == "runs.jsonl" or p.suffix == ".html"]
    assert len(files) >= 10
    for p in files:
        text = p.read_text(encoding="utf-8")
        assert str(REPO) not in text, p.relative_to(REPO)
        hit = machine.search(text)
        assert not hit, f"{p.relative_to(REPO)}: {text[max(hit.start() - 60, 0):hit.end() + 60]}"


def test_git_dirty_leaves_out_the_runs_own_results_directory(monkeypatch):
    from omegaconf import OmegaConf

    calls = []
    real = runner._git
    monkeypatch.setattr(runner, "_git", lambda *a: calls.append(a) or real(*a))
    runner.provenance(OmegaConf.create({"results_dir": "results/natural_images", "device": "cpu"}))
    runner.provenance(OmegaConf.create({"results_dir": "/elsewhere/out", "device": "cpu"}))
    status = [c for c in calls if c[0] == "status"]
    assert status[0] == ("status", "--porcelain", "--untracked-files=no", "--", ".",
                         ":(exclude)results/natural_images")
    assert status[1] == ("status", "--porcelain", "--untracked-files=no")  # outside the repository: all of it
    assert real(*status[0]) is not None  # git accepts the pathspec
