"""One small generic registry, used for methods, models, datasets and synthetic-data generators.

Entries are registered eagerly (``@METHODS.register("rtn")``) or lazily by a "module:attr" string,
which is imported on first ``get``. Third-party methods are found through the entry-point group
``dfq_bench.methods``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any


class UnknownNameError(KeyError):
    """An unknown registry key; ``str()`` is the one-line message shown to users."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain sentence
        return str(self.args[0])


class Registry:
    """Maps short snake_case names to objects (classes, factories, specs).

    Args:
        kind: what is registered ("method", "model", ...), used in error messages.
        entry_point_group: optional entry-point group searched for third-party plugins.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._lazy: dict[str, str] = {}
        self._entry_point_group = entry_point_group
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str, obj: Any = None) -> Any:
        """Registers ``obj`` under ``name``; used bare or as a decorator. Duplicates are errors."""
        if obj is None:
            return lambda o: self.register(name, o)
        if name in self._entries or name in self._lazy:
            raise ValueError(f"duplicate {self.kind} name {name!r}")
        self._entries[name] = obj
        return obj

    def register_lazy(self, name: str, target: str) -> None:
        """Registers ``"package.module:attr"``, imported when ``name`` is first requested."""
        if name in self._entries or name in self._lazy:
            raise ValueError(f"duplicate {self.kind} name {name!r}")
        self._lazy[name] = target

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self._entry_point_group):
            if ep.name not in self._entries and ep.name not in self._lazy:
                self._lazy[ep.name] = ep.value

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._load_plugins()
        return sorted(set(self._entries) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str) -> Any:
        """Returns the entry, importing it if lazy; unknown names raise ``UnknownNameError``."""
        self._load_plugins()
        if name not in self._entries:
            if name not in self._lazy:
                raise UnknownNameError(unknown_name_message(self.kind, name, self.names()))
            module, _, attr = self._lazy.pop(name).partition(":")
            self._entries[name] = getattr(importlib.import_module(module), attr)
        return self._entries[name]


def unknown_name_message(kind: str, name: str, available: list[str]) -> str:
    """``unknown method 'squnat'; did you mean 'squant'? available: dummy, rtn, squant``."""
    close = difflib.get_close_matches(name, available, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return f"unknown {kind} {name!r}{hint} available: {', '.join(available)}"


METHODS = Registry("method", entry_point_group="dfq_bench.methods")
MODELS = Registry("model")
DATASETS = Registry("dataset")
SYNTH = Registry("data generator")

Factory = Callable[..., Any]
