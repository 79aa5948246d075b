"""The command line that reproduces a run: ``command_line(cfg)`` for a run's config (the row's ``command``
field), ``row_command(row)`` for any row (its ``command``, else one rebuilt from the fields it records).

A command is ``python -m dfq_bench`` and, in this order:

- the group choices, always: ``+experiment=<name>`` when the run had one, then ``model= dataset= method=
  protocol= data= logger=`` (``method=<name>`` for an entry-point plugin run as ``method=_plugin``);
- ``wbits= abits= seed=``, always;
- every other key whose value differs from what those group choices give by default (composed with Hydra's
  compose API, as the CLI composes a command line), in config order: ``key=value``, ``+key=value`` for a key
  the defaults lack (a method key its YAML does not set), ``~key`` for one the run removed.

It is meant to be run from the repository root of a clone. Left out: ``hydra.*`` (run dirs, the sweeper: a
multirun job's command is a single run) and ``progress`` (a progress bar; nothing in the row). Kept when not
the default, although the run_id ignores them: ``results_dir``, ``eval_cache``, ``checkpoint_dir``, ``skip_done``
and the ``logger`` keys, since they decide where the row goes, whether the run happens and what it mirrors; and
``device``, which the run_id hashes (the row's ``device``; rows made before that field lack it and ran on the CPU).
Paths: ``results_dir``, ``eval_cache``, ``checkpoint_dir``, ``data.cache_dir``, ``mp.cache_dir`` and a local
``model.weights`` file (identified by its content, not its path) are written relative to the repository root when
inside it (``model.weights``, ``eval_cache`` and ``checkpoint_dir``, which are read with expanduser: ``~/...``
under the home directory, so a committed row holds no absolute path of the machine); ``dataset.root`` is written
as given, because the run_id hashes its text.
Values are written in Hydra's override grammar (quoted where it needs it), then shell-quoted (``shlex``).

"Reproduces" means: running the command gives a row with the same run_id, the same identity fields and the
same metrics, and the same ``command`` (timings, ``started_at``, ``run_dir`` and, with ``eval_cache``, its
hit/miss differ by nature). ``command_line`` checks this before it returns: the command's overrides applied
to the composed defaults must give the run's config back; where they do not (a value the override grammar
cannot hold), it returns None and the row records none.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dfq_bench.config import CONF_DIR, register_configs

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]
PROGRAM = "python -m dfq_bench"
CHOICE_GROUPS = ("model", "dataset", "method", "protocol", "data", "logger")  # always written, in this order
ALWAYS = ("wbits", "abits", "seed")
LEFT_OUT = ("hydra", "progress")
# Written repo-relative; none changes the run_id (a local weights file is hashed by its content, caches not at all).
PATH_KEYS = ("results_dir", "eval_cache", "checkpoint_dir", "model.weights", "data.cache_dir", "mp.cache_dir")
_SIMPLE = re.compile(r"[\w./@:+-]+")


# --- Hydra ----------------------------------------------------------------------------------------


@contextmanager
def _hydra() -> Iterator[None]:
    """Hydra's compose API on conf/, also inside a running ``@hydra.main`` job (whose GlobalHydra is set
    aside meanwhile and restored)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    gh = GlobalHydra.instance()
    outer = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield
    finally:
        if outer is not None:
            GlobalHydra.instance().hydra = outer


@functools.lru_cache(maxsize=256)
def _composed(overrides: tuple[str, ...]) -> tuple[dict, dict]:
    """(resolved config, group choices) of conf/config.yaml composed with ``overrides``; cached."""
    from hydra import compose

    with _hydra():
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if "/" not in k}
    with open_dict(cfg):
        del cfg["hydra"]
    return _container(cfg), choices


def _container(cfg: Any) -> dict:
    d = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if isinstance(cfg, DictConfig) else cfg
    d = copy.deepcopy(d)
    for key in LEFT_OUT:
        d.pop(key, None)
    return d


def _choice_overrides(choices: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(what to compose the defaults with, what the command writes) for ``choices``; a group whose choice
    is None is left to the defaults (and not written)."""
    compose_with, written = [], []
    if choices.get("experiment"):
        compose_with.append(f"+experiment={choices['experiment']}")
        written.append(f"+experiment={choices['experiment']}")
    for group in CHOICE_GROUPS:
        value = choices.get(group)
        if isinstance(value, tuple):  # ("_plugin", name): an entry-point method without a YAML
            compose_with += ["method=_plugin", f"method.name={value[1]}"]
            written.append(f"method={value[1]}")
        elif value is not None:
            compose_with.append(f"{group}={value}")
            written.append(f"{group}={value}")
    return compose_with, written


def _full_choices(choices: Mapping[str, Any]) -> dict[str, Any]:
    """``choices`` with each group left to the defaults (None) filled in as Hydra composes it: the data a
    method's YAML chooses, ... (a method's YAML and an experiment are the only ones that choose another
    group's default; tests/test_command.py checks it)."""
    out = dict(choices)
    if any(out.get(g) is None for g in CHOICE_GROUPS):
        chosen = {k: out.get(k) for k in ("experiment", "method")}
        composed = _composed(tuple(_choice_overrides(chosen)[0]))[1]
        out.update({g: composed[g] for g in CHOICE_GROUPS if out.get(g) is None})
    return out


def _defaults(choices: Mapping[str, Any], per_group: bool = False) -> dict:
    """The resolved config that ``choices`` compose to with no other override. ``per_group``: assembled
    from the default config and one composition per group option (a few compositions serve many rows),
    which equals the full composition except under an experiment (composed whole)."""
    compose_with = _choice_overrides(choices)[0]
    if not per_group or choices.get("experiment"):
        return _composed(tuple(compose_with))[0]
    base = copy.deepcopy(_composed(())[0])
    for group in CHOICE_GROUPS:
        tokens = _choice_overrides({group: choices[group]})[0]
        base[group] = copy.deepcopy(_composed(tuple(tokens))[0][group])
    return base


# --- values in the override grammar ----------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _parse_value(text: str) -> Any:
    return _parsed(f"k={text}")[2]


@functools.lru_cache(maxsize=4096)
def _parsed(token: str) -> tuple[str, str, Any]:
    """(key, "+" | "~" | "", value) of one override as Hydra parses it (cached: the parser is slow)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    o = OverridesParser.create().parse_override(token)
    return o.key_or_group, "~" if o.is_delete() else "+" if o.is_add() else "", o.value()


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, parsed back to the same value; ValueError where it cannot be."""
    text = _render(value)
    try:
        back = _parse_value(text)
    except Exception as e:
        raise ValueError(f"{value!r} has no override form ({e})") from None
    if not _same(back, value):
        raise ValueError(f"{value!r} has no override form (it reads back as {back!r})")
    return text


def _render(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if "${" in value:
            raise ValueError(f"{value!r} would be read as an interpolation")
        if _SIMPLE.fullmatch(value):
            try:
                if _same(_parse_value(value), value):
                    return value
            except Exception:
                pass
        q = '"' if '"' not in value else "'"  # "..." reads better inside the shell's '...'
        quoted = re.sub(rf"(\\*){q}", lambda m: m.group(1) * 2 + "\\" + q, value)
        return q + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, quoted) + q
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_]\w*", k):
                raise ValueError(f"dict key {k!r} has no override form")
        return "{" + ",".join(f"{k}:{_render(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"{value!r} ({type(value).__name__}) has no override form")


# --- the diff ------------------------------------------------------------------------------------


def _diff(cur: dict, base: dict, prefix: str, out: list[tuple[str, str, Any]]) -> None:
    """(op, dotted key, value) for each leaf of ``cur`` that ``base`` lacks ("+"), holds otherwise (""), or
    holds and ``cur`` lacks ("~"). Dicts on both sides are compared key by key; anything else whole."""
    for k, v in cur.items():
        key = f"{prefix}{k}"
        if not prefix and k in ALWAYS:
            continue
        if k not in base:
            out.append(("+", key, v))
        elif isinstance(v, dict) and isinstance(base[k], dict) and v and base[k]:
            _diff(v, base[k], key + ".", out)
        elif not _same(v, base[k]):
            out.append(("", key, v))
    for k in base:
        if k not in cur and not (not prefix and k in ALWAYS):
            out.append(("~", f"{prefix}{k}", None))


def _get(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def _path(key: str, value: Any) -> Any:
    """A path key's value as the command writes it (relative to the repository root when inside it)."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    if key == "model.weights" and not path.is_file():
        return value  # a library tag (IMAGENET1K_V1, zoo, package, ...)
    resolved = path.resolve()
    if resolved.is_relative_to(REPO):
        return str(resolved.relative_to(REPO)) if resolved != REPO else "."
    if key in ("model.weights", "eval_cache", "checkpoint_dir"):  # read with expanduser: ~/... under home
        from dfq_bench.run.runner import repo_relative

        return repo_relative(resolved)
    return str(resolved)  # results_dir is not expanded: ~ would be a folder named ~


def _build(target: dict, choices: Mapping[str, Any], per_group: bool = False) -> str:
    """The command for the config ``target`` (a resolved container) under the group ``choices``; raises
    ValueError where the command would not give ``target`` back."""
    written = _choice_overrides(choices)[1]
    base = _defaults(choices, per_group)
    target = copy.deepcopy(target)
    for key in PATH_KEYS:
        if not _same(_get(target, key), _get(base, key)):
            _set(target, key, _path(key, _get(target, key)))
    tokens = [*written, *(f"{k}={hydra_value(target.get(k))}" for k in ALWAYS)]
    diff: list[tuple[str, str, Any]] = []
    _diff(target, base, "", diff)
    tokens += [f"~{key}" if op == "~" else f"{op}{key}={hydra_value(v)}" for op, key, v in diff]
    if not _same(_apply(base, tokens), target):
        raise ValueError("the overrides do not give the config back")
    return " ".join([PROGRAM, *(shlex.quote(t) for t in tokens)])


def _apply(base: dict, tokens: list[str]) -> dict:
    """``base`` with the leaf overrides among ``tokens`` applied as Hydra parses them (group choices skipped:
    ``base`` was composed with them)."""
    out = copy.deepcopy(base)
    for token in tokens:
        key, op, value = _parsed(token)
        if key in CHOICE_GROUPS or key == "experiment":
            continue
        if op == "~":
            *parents, last = key.split(".")
            parent = _get(out, ".".join(parents)) if parents else out
            parent.pop(last, None)
        else:
            _set(out, key, copy.deepcopy(value))
    return out


# --- group choices -------------------------------------------------------------------------------


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


@functools.lru_cache(maxsize=256)
def _yaml_node(group: str, option: str) -> str:
    """The option's own keys over its schema's defaults (typed groups), as JSON (cached, hashable)."""
    from dfq_bench import config as schemas

    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), enum_to_str=True) or {}
    node.pop("defaults", None)
    schema = {"model": schemas.ModelConfig, "dataset": schemas.DatasetConfig, "protocol": schemas.ProtocolConfig,
              "logger": schemas.LoggerConfig}.get(group)
    if schema is not None:
        defaults = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
        node = {**{k: v for k, v in defaults.items() if v != "???"}, **node}
    return json.dumps(node)


def _best_option(group: str, node: Any) -> str | None:
    """The YAML option of ``group`` whose keys match ``node`` best: same name (and model source), fewest other
    differences; ties go to the option named like the node."""
    if not isinstance(node, dict):
        return None
    scored = []
    for option in _group_options(group):
        score = 0
        for k, v in json.loads(_yaml_node(group, option)).items():
            if v == "???" or (isinstance(v, str) and "${" in v):
                continue
            if not _same(v, node.get(k)):
                if k in ("name", "source"):
                    break
                score += 1
        else:
            scored.append((score, option != node.get("name"), option))
    return min(scored)[2] if scored else None


def infer_choices(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """Group choices that compose to a config like ``cfg`` (a resolved container): the best-matching YAML
    option of each group (``("_plugin", name)`` for a registered method without one), ``experiment`` by its
    ``paper`` block. A group ``cfg`` lacks (None) is left to the defaults; None where a group has no match."""
    from dfq_bench import catalog  # noqa: F401  (fills the registries)
    from dfq_bench.registry import METHODS

    choices: dict[str, Any] = {"experiment": None}
    if cfg.get("paper") is not None:
        for option in _group_options("experiment"):
            paper = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{option}.yaml")).get("paper")
            if _same(paper, cfg["paper"]):
                choices["experiment"] = option
                break
    for group in CHOICE_GROUPS:
        node = cfg.get(group)
        if node is None:
            choices[group] = None
            continue
        option = _best_option(group, node)
        if option is None and group == "method" and isinstance(node, dict) and node.get("name") in METHODS:
            option = ("_plugin", node["name"])
        if option is None:
            return None
        choices[group] = option
    return choices


# --- the two entry points ------------------------------------------------------------------------


def command_line(cfg: DictConfig | Mapping[str, Any], choices: Mapping[str, str] | None = None) -> str | None:
    """The command that reproduces the run of ``cfg`` (see the module docstring), or None.

    ``choices``: the run's group choices (Hydra's ``runtime.choices``, which the CLI passes); without them
    they are inferred from the config (``infer_choices``). Never raises: a config it cannot write is None,
    with a warning.
    """
    try:
        target = _container(cfg)
        if choices is not None and all(choices.get(g) is not None for g in CHOICE_GROUPS):
            choices = {k: choices.get(k) for k in ("experiment", *CHOICE_GROUPS)}
            if choices["method"] == "_plugin":
                choices["method"] = ("_plugin", target["method"]["name"])
        else:
            choices = infer_choices(target)
            if choices is None:
                raise ValueError("no group option matches this config")
        return _build(target, _full_choices(choices))
    except Exception as e:
        log.warning("no command recorded for this run: %s", e)
        return None


def row_command(row: Mapping[str, Any]) -> str | None:
    """The command that reproduces ``row``: its ``command`` field, else one rebuilt from the config fields
    it records (method_cfg, protocol, data, model, weights, dataset_info, bits, seed, paper, deploy), which
    is returned only if it gives the row's run_id; None where the row does not hold enough (a non-default
    ``dataset.root``, ``batch_size``, ... that rows do not record). Rebuilding composes each distinct set of
    group choices once per process; a row takes milliseconds after that."""
    if row.get("command"):
        return str(row["command"])
    try:
        for target, choices in _row_candidates(row):
            return _build(target, choices, per_group=True)
    except Exception as e:  # a row of an unknown shape: no command
        log.debug("no command for row %s: %s", row.get("run_id"), e)
    return None


@functools.lru_cache(maxsize=256)
def _plugin_defaults(group: str, node: str) -> str:
    """The group node (JSON) merged onto its plugin's ``Config``: every key as the run sees it (JSON)."""
    from dfq_bench import catalog  # noqa: F401
    from dfq_bench.registry import METHODS, SYNTH

    node = json.loads(node)
    schema = OmegaConf.structured((METHODS if group == "method" else SYNTH).get(node["name"]).Config)
    return json.dumps(OmegaConf.to_container(OmegaConf.merge(schema, node), enum_to_str=True))


def _row_candidates(row: Mapping[str, Any]) -> Iterator[tuple[dict, dict]]:
    """The configs (and group choices) that give the row's run_id, the likeliest first: the row's recorded
    fields over the defaults of the group choices they match, each guessable key the row does not record
    (device, the noise space before ``auto`` resolved it, the fake dataset's size, a weights file) as the
    default or as recorded."""
    import itertools

    label = str(row["model"])
    source, _, arch = label.partition(":") if label.startswith(("timm:", "torchvision:")) else ("zoo", "", label)
    seen = {"model": {"name": arch, "source": source}, "dataset": {"name": row["dataset"]},
            "method": dict(row.get("method_cfg") or {"name": row["method"]}), "protocol": row.get("protocol"),
            "data": row.get("data"), "paper": row.get("paper")}  # data: None when the run made none
    choices = infer_choices(seen)
    if choices is None:
        return
    choices = _full_choices(choices)
    base = _defaults(choices, per_group=True)
    target = copy.deepcopy(base)
    target.update(wbits=row["wbits"], abits=row["abits"], seed=row["seed"])
    target["model"].update(seen["model"])
    target["protocol"].update(row.get("protocol") or {})
    for group, recorded in (("method", row.get("method_cfg")), ("data", row.get("data"))):
        defaults = json.loads(_plugin_defaults(group, json.dumps(target[group])))
        for k, v in (recorded or {}).items():
            if k not in defaults or not _same(v, defaults[k]):
                target[group][k] = v
    info = row.get("dataset_info") or {}
    for k in ("limit", "images"):
        if k in info:
            target["dataset"][k] = info[k]
    weights = str(row.get("weights") or "")
    m = re.search(r"\+bn_reestimate:(\d+):", weights)
    if m:
        target["model"]["bn_reestimate"] = int(m.group(1))
    if row.get("deploy") is not None:
        target["deploy"] = row["deploy"]

    options: list[list[tuple[str, Any]]] = [[("device", target["device"]), ("device", "cuda")]]
    if row.get("data") is not None and _get(base, "data.space") == "auto":  # the row holds the resolved space;
        space = row["data"].get("space") or "raw"  # a row made before the key existed used raw noise
        options.append([("data.space", "auto"), ("data.space", space)])
    if row["dataset"] == "fake" and row.get("n_eval") and info.get("limit") is None:
        options.append([("dataset.num_samples", target["dataset"]["num_samples"]),
                        ("dataset.num_samples", row["n_eval"])])
    m = re.search(r"file:(\S+)", weights)
    if m:
        options.append([("model.weights", target["model"]["weights"]), ("model.weights", m.group(1))])
    guessed = {key for option in options for key, _ in option}
    for group, recorded in (("method", row.get("method_cfg")), ("data", row.get("data"))):
        for k, v in (target[group] if recorded else {}).items():  # a key added after the row was made: the
            key = f"{group}.{k}"  # run_id matches only at a value it does not hash, the one that gives the
            if k not in recorded and key not in guessed and isinstance(v, bool):  # run before the key existed
                options.append([(key, v), (key, not v)])  # (never removed: its Config default may differ)
    away = lambda c: sum(x != o[0] for x, o in zip(c, options, strict=True))  # noqa: E731  (guesses off the defaults)
    from dfq_bench.run.runner import run_id

    cfg = OmegaConf.create(target)  # once: each candidate only sets its few keys
    for combo in sorted(itertools.product(*options), key=away):
        for key, value in combo:
            OmegaConf.update(cfg, key, value, merge=False)
        if run_id(cfg) == row.get("run_id"):
            candidate = copy.deepcopy(target)
            for key, value in combo:
                _set(candidate, key, value)
            yield candidate, choices
