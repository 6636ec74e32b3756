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
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from bench.errors import BadInput

log = logging.getLogger(__name__)
T = TypeVar("T")

BUILTIN = "builtin"
# What registrations are attributed to while a plug-in's entry point loads: a plug-in module that registers with
# a decorator is then recorded as the plug-in it is, in whichever registry it registers with.
_loading_origin: str | None = None


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = BUILTIN


class Registry(Generic[T]):
    """Name -> object, filled by `@registry.register(name, **meta)` in modules loaded on first use.

    `builtins` are module names imported before the first lookup; `group` is the entry-point group whose entries
    are loaded after them. An entry point names either the object itself or a module that registers on import.
    `coerce(name, obj)` checks (and may adapt) every object registered; it raises TypeError for an object of the
    wrong kind, which is a bug in our code and a warning for a plug-in.
    """

    def __init__(
        self,
        kind: str,
        *,
        group: str | None = None,
        builtins: tuple[str, ...] = (),
        coerce: Callable[[str, Any], T] | None = None,
    ):
        self.kind = kind
        self.group = group
        self.builtins = tuple(builtins)
        self.coerce = coerce
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False
        self._loading = False

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Any:
        """Decorator (`@reg.register("x")`) or call (`reg.register("x", obj)`); a second use of a name is a bug."""
        origin = meta.pop("_origin", None)

        def deco(o: T) -> T:
            return self._add(name, o, meta, origin=origin or _loading_origin or BUILTIN)

        return deco(obj) if obj is not None else deco

    def _add(self, name: str, obj: T, meta: dict[str, Any], origin: str) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        old = self._entries.get(name)
        if old is not None and old.obj is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({old.origin} and {origin})")
        if self.coerce is not None:
            obj = self.coerce(name, obj)
        self._entries[name] = Entry(name, obj, dict(meta), origin)
        return obj

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

    def reset(self) -> None:
        """Forget every plug-in; the next lookup scans the entry points again (a plug-in installed into a running
        process, tests). Built-ins stay: their modules are imported once per process."""
        self._entries = {n: e for n, e in self._entries.items() if e.origin == BUILTIN}
        self._loaded = False

    def _load_entry_points(self) -> None:
        global _loading_origin
        for ep in sorted(entry_points(group=self.group), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            package = f"plug-in {dist.name} {dist.version}" if dist is not None else "plug-in"
            previous, _loading_origin = _loading_origin, package
            try:
                obj = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plug-in must not break the suite
                log.warning("%s plug-in %r (%s) failed to load: %s", self.kind, ep.name, ep.value, e)
                continue
            finally:
                _loading_origin = previous
            if isinstance(obj, types.ModuleType):
                continue  # a module that registers on import
            old = self._entries.get(ep.name)
            if old is not None:
                if old.obj is not obj:
                    log.warning(
                        "%s plug-in %r (%s) ignored: the name is taken by %s",
                        self.kind,
                        ep.name,
                        ep.value,
                        old.origin,
                    )
                continue
            try:
                self._add(ep.name, obj, {}, origin=f"{package} ({ep.value})")
            except (TypeError, ValueError) as e:
                log.warning("%s plug-in %r (%s) ignored: %s", self.kind, ep.name, ep.value, e)

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load()
        return len(self._entries)

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
        """`WHAT 'name': unknown KIND; did you mean 'x'? (known: ...)`; matching ignores case."""
        known = self.names()
        lowered = {k.lower(): k for k in known}
        close = [
            lowered[c] for c in difflib.get_close_matches(str(name).lower(), list(lowered), n=3, cutoff=0.5)
        ]
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        return (
            f"{what or self.kind} {name!r}: unknown {self.kind}{hint} (known: {', '.join(known) or 'none'})"
        )
