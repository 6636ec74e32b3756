"""One registry for every pluggable kind: backbones, generators, data sources, metrics.

Modelled on timm's model registry: objects register under a string name with a decorator, are listed and
looked up by name, and an unknown name is bad input with the closest known names. Third-party packages plug in
through Python entry points (`[project.entry-points."medsynbench.generators"]` and so on); they are loaded the
first time the registry is read, so a team's own package needs no edit here.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from bench.errors import BadInput

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = "builtin"


class Registry(Generic[T]):
    """Name -> object, filled by `@registry.register(name, **meta)` in modules loaded on first use.

    `builtins` are module names imported before the first lookup; `group` is the entry-point group whose entries
    are loaded after them. An entry point names either the object itself or a module that registers on import.
    """

    def __init__(self, kind: str, *, group: str | None = None, builtins: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        self.builtins = builtins
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False
        self._loading = False

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Any:
        """Decorator (`@reg.register("x")`) or call (`reg.register("x", obj)`); a second use of a name is a bug."""

        def deco(o: T) -> T:
            self._add(name, o, meta, origin=meta.pop("_origin", "builtin"))
            return o

        return deco(obj) if obj is not None else deco

    def _add(self, name: str, obj: T, meta: dict[str, Any], origin: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        old = self._entries.get(name)
        if old is not None and old.obj is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({old.origin} and {origin})")
        self._entries[name] = Entry(name, obj, dict(meta), origin)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def load(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for mod in self.builtins:
                importlib.import_module(mod)
            if self.group:
                self._load_entry_points()
        finally:
            self._loading = False
        self._loaded = True

    def _load_entry_points(self) -> None:
        for ep in entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plug-in must not break the suite
                log.warning("%s plug-in %r (%s) failed to load: %s", self.kind, ep.name, ep.value, e)
                continue
            if ep.name in self._entries:
                continue  # a module entry point that registered itself, or a clash with a built-in
            if isinstance(obj, type(importlib)):
                continue  # a module that registers on import
            self._add(ep.name, obj, {}, origin=f"entry point {ep.value}")

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def entry(self, name: str, *, what: str | None = None) -> Entry[T]:
        self.load()
        if name not in self._entries:
            raise BadInput(self.unknown_message(name, what))
        return self._entries[name]

    def get(self, name: str, *, what: str | None = None) -> T:
        """The object registered as `name`; unknown names are bad input with "did you mean"."""
        return self.entry(name, what=what).obj

    def meta(self, name: str) -> dict[str, Any]:
        return self.entry(name).meta

    def items(self) -> list[tuple[str, T]]:
        self.load()
        return [(n, self._entries[n].obj) for n in sorted(self._entries)]

    def unknown_message(self, name: str, what: str | None = None) -> str:
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        return f"{what or self.kind} {name!r}: unknown {self.kind}{hint} (known: {', '.join(known) or 'none'})"

