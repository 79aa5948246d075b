"""``python -m dfq_bench list`` / ``describe <group>=<name>`` (run/discover.py) and the ``dfq-bench`` script.

What they show comes from the registries, conf/ and the config schemas: the tests compare against those,
never against a hand-kept list.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from helpers import REPO, cli
from omegaconf import OmegaConf

from dfq_bench import catalog  # noqa: F401  (fills the registries)
from dfq_bench.config import CONF_DIR
from dfq_bench.core.method import Method
from dfq_bench.registry import DATASETS, METHODS, MODELS, SYNTH
from dfq_bench.run import discover
from dfq_bench.run.cli import unknown_option
from dfq_bench.run.command import hydra_value

REGISTRIES = {"method": METHODS, "model": MODELS, "dataset": DATASETS, "data": SYNTH}


def section(text, group):
    """The lines of ``group``'s section of ``list``'s output."""
    title = dict((g, t) for g, t, _ in discover.SECTIONS)[group]
    block = text.split(f"\n{title} (", 1)[1] if not text.startswith(title) else text[len(title):]
    return block.split("\n\n", 1)[0].splitlines()[1:]


def listed_names(text, group):
    return [line.split()[0] for line in section(text, group)]


def test_list_has_every_registered_and_configured_entry_with_a_description():
    text = discover.list_text()
    for group in discover.DESCRIBED:
        expected = {p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_")}
        if group in REGISTRIES:
            expected |= set(REGISTRIES[group].names())
        assert expected and set(listed_names(text, group)) == expected, group
        for line in section(text, group):
            name, description = line.split(maxsplit=1)
            assert description.strip() and "(no description)" not in description, line
    assert "SQuant (ICLR 2022)" in text and "[M. Nagel et al., ICCV 2019]" in text  # YAML comment; paper


def test_a_method_registered_at_run_time_is_listed_and_described(monkeypatch):
    class Halving(Method):
        """Halving: a method registered while the process runs (test_discover)."""

        name, version = "halving_test", "3"

        @dataclass
        class Config:
            name: str = "halving_test"
            factor: float = 0.5  # what the weights are multiplied by

    monkeypatch.setitem(METHODS._entries, "halving_test", Halving)  # no YAML, no catalog edit
    (line,) = [x for x in section(discover.list_text(), "method") if x.split()[0] == "halving_test"]
    assert "Halving: a method registered while the process runs (test_discover)." in line
    text = discover.describe_text("method", "halving_test")
    assert "version 3" in text and "what the weights are multiplied by" in text
    assert any(x.split()[:3] == ["factor", "float", "0.5"] for x in text.splitlines())


def test_describe_method_squant_prints_every_config_key_with_its_default():
    cls = METHODS.get("squant")
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / "squant.yaml"))
    text = discover.describe_text("method", "squant")
    assert text.startswith("method=squant: ") and "Guo et al." in text  # the docstring's paper paragraph
    lines = {x.split()[0]: x for x in text.split("\nkeys (", 1)[1].splitlines()[1:]}
    for f in dataclasses.fields(cls.Config):
        default = yaml[f.name] if f.name in yaml else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        try:
            shown = hydra_value(default)
        except ValueError:
            shown = repr(default)
        assert f.name in lines and f"  {shown}" in lines[f.name], (f.name, shown)


def test_describe_works_for_every_entry_of_every_group():
    for group in discover.DESCRIBED:
        for name in discover.names(group):
            text = discover.describe_text(group, name)
            assert text.splitlines()[0].startswith(("+" if group == "experiment" else "") + f"{group}={name}: ")
    text = discover.describe_text("protocol", "common")
    assert all(f"\n  {f.name} " in text for f in dataclasses.fields(discover._schema("protocol")))
    assert "sweeps (with -m): wbits=4,6,8" in discover.describe_text("experiment", "squant_table1_resnet18")


def test_an_unknown_name_is_the_clis_did_you_mean_line_and_exit_2(tmp_path):
    done = cli(["describe", "method=squnat"], cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: {unknown_option('method', 'squnat')}\n"
    assert "did you mean 'squant'?" in done.stderr
    assert discover.main(["describe", "modle=resnet18"]) == 2  # an unknown group, in process


def test_the_dfq_bench_script_is_python_m_dfq_bench(tmp_path):
    script = shutil.which("dfq-bench", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                             os.environ.get("PATH", "")]))
    assert script, "dfq-bench is not installed: pip install -e . (scripts/setup.sh does)"
    by_script = subprocess.run([script, "list"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    by_module = cli(["list"], cwd=tmp_path)
    assert by_script.returncode == by_module.returncode == 0, by_script.stderr + by_module.stderr
    assert by_script.stdout == by_module.stdout and by_module.stdout.startswith("methods (method=<name>)\n")
    assert str(REPO) not in by_module.stdout
