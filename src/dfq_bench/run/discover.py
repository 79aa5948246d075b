"""What can be run: ``python -m dfq_bench list`` and ``python -m dfq_bench describe <group>=<name>``.

Both read the registries (``METHODS``, ``MODELS``, ``DATASETS``, ``SYNTH``), conf/ and the
config schemas, never a hand-kept list: a method registered in ``catalog.py``, by an entry point or by
``METHODS.register`` at run time is listed with no other edit, and so is a new YAML in a conf/ group.

``list``: one line per entry of each group, its name and what it is: the YAML's leading comment (the
option's own description: ``genie_cpu`` is not ``genie``), else the first sentence of the registered
class's or factory's own docstring, else of its module's docstring; for methods and calibration sources
also the paper the module docstring names (``Paper: ...``). ``describe <group>=<name>`` (groups: method,
model, dataset, data, protocol, experiment, logger): the same line, the docstring's first paragraphs and the
YAML's comment, then every key of the group's schema (the method's or source's ``Config``, or
``ModelConfig``, ``DatasetConfig``, ``ProtocolConfig``, ``LoggerConfig``) with its type, its default as the
option sets it (over the schema's) and its comment; an experiment shows what it sets. An unknown name is
the CLI's one line (``error: unknown method 'squnat'; did you mean 'squant'? ...``) and exit code 2.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dfq_bench.config import CONF_DIR

EXIT_USAGE = 2
USAGE = ("usage: python -m dfq_bench list | python -m dfq_bench describe <group>=<name> "
         "(groups: method, model, dataset, data, protocol, experiment, logger)")
# (group, title, how an entry is chosen on the command line); `describe` takes each group
SECTIONS = (
    ("method", "methods", "method={}"),
    ("model", "models", "model={}"),
    ("dataset", "datasets", "dataset={}"),
    ("data", "calibration sources", "data={}"),
    ("protocol", "protocols", "protocol={}"),
    ("experiment", "experiments", "+experiment={}"),
    ("logger", "loggers", "logger={}"),
)
DESCRIBED = tuple(g for g, _, _ in SECTIONS)
MAX_LINE = 110  # characters of a description in `list`, the paper aside


def _registry(group: str):
    from dfq_bench import catalog  # noqa: F401  (fills the registries)
    from dfq_bench.registry import DATASETS, METHODS, MODELS, SYNTH

    return {"method": METHODS, "model": MODELS, "dataset": DATASETS, "data": SYNTH}.get(group)


def _schema(group: str):
    from dfq_bench import config

    return {"model": config.ModelConfig, "dataset": config.DatasetConfig, "protocol": config.ProtocolConfig,
            "logger": config.LoggerConfig}.get(group)


# --- one entry -------------------------------------------------------------------------------------


@dataclass
class Entry:
    group: str
    name: str
    yaml: Path | None  # conf/<group>/<name>.yaml
    obj: Any = None  # the registered class or factory (None: conf only, or it failed to import)
    error: str | None = None  # why the registered entry could not be imported

    @property
    def comment(self) -> str:
        return yaml_comment(self.yaml) if self.yaml else ""

    @property
    def node(self) -> dict:
        """The YAML's own keys (its defaults list left out)."""
        if self.yaml is None:
            return {}
        node = OmegaConf.to_container(OmegaConf.load(self.yaml)) or {}
        node.pop("defaults", None)
        return node

    def doc(self) -> str:
        """The registered object's own docstring, else its module's."""
        if self.obj is None:
            return ""
        own = getattr(self.obj, "__doc__", None)  # a class's own: Python does not inherit it
        if own:
            return inspect.cleandoc(own)
        module = sys.modules.get(getattr(self.obj, "__module__", ""), None)
        return inspect.cleandoc(module.__doc__ or "") if module is not None else ""

    def module_doc(self) -> str:
        module = sys.modules.get(getattr(self.obj, "__module__", ""), None) if self.obj is not None else None
        return inspect.cleandoc(module.__doc__ or "") if module is not None else ""

    def summary(self) -> str:
        text = first_sentence(self.comment) or first_sentence(self.doc())
        if not text and self.error:
            text = f"(cannot be imported: {self.error})"
        text = _cap(text or "(no description)")
        paper = paper_short(self.module_doc()) if self.group in ("method", "data") else None
        if paper and paper.split(",")[-1].strip() not in text:  # SQuant (ICLR 2022): ... needs no repeat
            text = f"{text} [{paper}]"
        return text


def _cap(text: str) -> str:
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3].rsplit(" ", 1)[0] + "..."


def yaml_comment(path: Path) -> str:
    """The leading ``#`` comment of a YAML file (Hydra's ``# @package`` line left out), as text."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if not text.startswith("@package"):
            lines.append(text)
    return "\n".join(lines).strip()


def _plain(text: str) -> str:
    return re.sub(r"``([^`]+)``", r"`\1`", " ".join(text.split()))


def first_sentence(text: str) -> str:
    """The first sentence of the first paragraph, on one line; a line ending in ':' (an example follows)
    ends it too."""
    if not text:
        return ""
    para = []
    for line in text.strip().split("\n\n", 1)[0].splitlines():
        para.append(line.strip())
        if line.rstrip().endswith(":"):
            para[-1] = para[-1].rstrip(":")
            break
    joined = _plain(" ".join(para))
    m = re.search(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bet al)(?<![.\s])\.(?!\.)(\s|$)", joined)  # not "..."
    return joined[:m.start() + 1] if m else joined


def paper_short(doc: str) -> str | None:
    """``Guo et al., ICLR 2022`` from a docstring's ``Paper: Guo et al., "Title", ICLR 2022. ...``."""
    m = re.search(r"^Paper:\s*(.+?)(?:\n\s*\n|\Z)", doc, re.S | re.M)
    if not m:
        m = re.search(r"\(([^()\"]+?),\s*\"[^\"]+\",\s*([A-Za-z]+ \d{4})", doc)  # `(Cai et al., "ZeroQ...", CVPR 2020`
        return f"{_authors(m.group(1))}, {m.group(2)}" if m else None
    text = " ".join(m.group(1).split())
    if text.lower().startswith("none"):
        return None
    m = re.match(r"([^\"]+?),?\s*\"[^\"]+\",?\s*([^.;(]+)", text)
    if not m:
        return None
    return f"{_authors(m.group(1))}, {m.group(2).strip().rstrip(',')}"


def _authors(text: str) -> str:
    text = text.strip().rstrip(",")
    if "et al" in text or "," not in text:
        return text
    return text.split(",")[0].strip() + " et al."


# --- the entries of a group ----------------------------------------------------------------------


def yaml_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_")) if folder.is_dir() else []


def names(group: str) -> list[str]:
    """Every entry of ``group``: its YAML options and its registry's names."""
    registry = _registry(group)
    return sorted(set(yaml_options(group)) | set(registry.names() if registry is not None else []))


def entry(group: str, name: str) -> Entry:
    yaml = CONF_DIR / group / f"{name}.yaml"
    e = Entry(group, name, yaml if yaml.is_file() else None)
    registry = _registry(group)
    if registry is not None:
        key = name
        if name not in registry and e.yaml is not None:  # genie_cpu -> genie
            key = str(e.node.get("name", name))
        if key in registry:
            try:
                e.obj = registry.get(key)
            except Exception as err:  # an entry point whose package is broken: listed, with why
                e.error = f"{type(err).__name__}: {err}"
    return e


def entries(group: str) -> list[Entry]:
    return [entry(group, n) for n in names(group)]


# --- list ----------------------------------------------------------------------------------------


def list_text() -> str:
    out = []
    for group, title, how in SECTIONS:
        items = entries(group)
        out.append(f"{title} ({how.format('<name>')})")
        width = max((len(e.name) for e in items), default=0) + 2
        out += [f"  {e.name:<{width}}{e.summary()}" for e in items]
        out.append("")
    out.append("python -m dfq_bench describe <group>=<name> shows an entry's keys and defaults "
               "(groups: " + ", ".join(DESCRIBED) + ")")
    return "\n".join(out)


# --- describe ------------------------------------------------------------------------------------


def type_name(tp: Any) -> str:
    if tp is None or tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(m.value for m in tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _value_text(value: Any) -> str:
    from dfq_bench.run.command import hydra_value

    if value == "???":
        return "??? (required)"
    try:
        return hydra_value(value)
    except ValueError:
        return repr(value)


def _source_comments(cls: type) -> dict[str, str]:
    """``key: type = default  # comment`` comments of a dataclass's fields (its bases' too)."""
    found: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.M):
            found[m.group(1)] = m.group(2).strip()
    return found


def _yaml_comments(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^(\w+):[^#\n]*#\s*(.+)$", path.read_text(), re.M)}


def key_rows(e: Entry) -> list[tuple[str, str, str, str]]:
    """(key, type, default, comment) of every key of the entry's schema, its YAML's values over the schema's."""
    schema = _schema(e.group)
    if schema is None and e.obj is not None:
        schema = getattr(e.obj, "Config", None)
    if schema is None or not dataclasses.is_dataclass(schema):
        return [(k, "", _value_text(v), "") for k, v in e.node.items()]
    hints = typing.get_type_hints(schema)
    node, comments = e.node, {**_source_comments(schema), **_yaml_comments(e.yaml)}
    rows = []
    for f in dataclasses.fields(schema):
        if f.name in node:
            default = node[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "???"
        if isinstance(default, enum.Enum):
            default = default.value
        rows.append((f.name, type_name(hints.get(f.name)), _value_text(default), comments.get(f.name, "")))
    rows += [(k, "(not in the schema)", _value_text(v), comments.get(k, "")) for k, v in node.items()
             if k not in {f.name for f in dataclasses.fields(schema)}]
    return rows


def _paragraphs(text: str, n: int) -> list[str]:
    return [_plain(p) for p in re.split(r"\n\s*\n", text.strip()) if p.strip()][:n]


def describe_text(group: str, name: str) -> str:
    e = entry(group, name)
    how = dict((g, h) for g, _, h in SECTIONS)[group].format(name)
    out = [f"{how}: {e.summary()}"]
    where = []
    if e.yaml is not None:
        where.append(str(e.yaml.relative_to(CONF_DIR.parent)))
    if e.obj is not None:
        where.append(f"{e.obj.__module__}:{e.obj.__qualname__}")
        if getattr(e.obj, "version", None) is not None and group == "method":
            where.append(f"version {e.obj.version}")
    if where:
        out.append("  " + "; ".join(where))
    doc = _paragraphs(e.doc(), 2)
    if "module docstring" in " ".join(doc) and e.module_doc() != e.doc():  # the docstring points there
        doc += _paragraphs(e.module_doc(), 2)
    for paragraph in doc:
        out += ["", _wrap(paragraph)]
    if e.comment and (not doc or first_sentence(e.comment) != first_sentence(e.doc())):
        out += ["", _wrap(_plain(e.comment))]
    if group == "experiment":
        out += ["", *_experiment_lines(e)]
        return "\n".join(out)
    if group == "method" and e.obj is not None:
        rule = getattr(e.obj, "default_act_range", None)
        facts = [f"its activation range rule: {rule} (protocol.act_range overrides it)",
                 "uses calibration data itself" if getattr(e.obj, "needs_data", False)
                 else "calibration data only for activation ranges"]
        out += ["", "; ".join(facts)]
    rows = key_rows(e)
    prefix = "+" if group == "experiment" else ""
    schema = _schema(group) or getattr(e.obj, "Config", None)
    label = f"{schema.__qualname__}" if schema is not None else "the YAML"
    out += ["", f"keys ({prefix}{group}.<key>=<value>; defaults: {e.yaml.name + ' over ' if e.yaml else ''}{label}):"]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    for key, tp, default, comment in rows:
        line = f"  {key:<{widths[0]}}  {tp:<{widths[1]}}  {default:<{widths[2]}}"
        out.append((line + (f"  # {comment}" if comment else "")).rstrip())
    return "\n".join(out)


def _experiment_lines(e: Entry) -> list[str]:
    raw = OmegaConf.load(e.yaml)
    lines = ["sets:"]
    for d in raw.get("defaults", []) or []:
        if isinstance(d, str):
            lines.append(f"  {d}")
        else:
            for k, v in d.items():
                lines.append(f"  {str(k).replace('override /', '')}={v}")
    body = OmegaConf.to_container(raw)
    for key in ("defaults", "hydra"):
        body.pop(key, None)
    sweep = OmegaConf.select(raw, "hydra.sweeper.params")
    for key, value in body.items():
        if key == "paper" and isinstance(value, dict):
            lines.append(f"  paper: {value.get('source', '...')} (recorded in every row; "
                         f"methods: {', '.join(value.get('top1', {}))})")
        else:
            lines.append(f"  {key}={value}")
    if sweep:
        lines.append("sweeps (with -m): " + " ".join(f"{k}={v}" for k, v in sweep.items()))
    return lines


def _wrap(text: str, width: int = 100) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


# --- the command ---------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``list`` or ``describe <group>=<name> ...``; returns the exit code."""
    from dfq_bench.registry import UnknownNameError, unknown_name_message
    from dfq_bench.run.cli import unknown_option

    command, args = argv[0], argv[1:]
    if command == "list":
        if args:
            print(f"error: list takes no arguments; {USAGE}", file=sys.stderr)
            return EXIT_USAGE
        return _print(list_text())
    if not args:
        print(f"error: {USAGE}", file=sys.stderr)
        return EXIT_USAGE
    texts = []
    for arg in args:
        group, eq, name = arg.lstrip("+").partition("=")
        try:
            if group not in DESCRIBED:
                raise UnknownNameError(unknown_name_message("group", group, list(DESCRIBED)))
            if not eq or not name:
                print(f"error: describe {arg}: give a name ({group}=<name>); {USAGE}", file=sys.stderr)
                return EXIT_USAGE
            if name not in names(group):
                raise unknown_option(group, name)
        except UnknownNameError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        texts.append(describe_text(group, name))
    return _print("\n\n".join(texts))


def _print(text: str) -> int:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `list | head`: the reader has gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
