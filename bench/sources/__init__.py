"""Sources turn a dataset as users have it (a DICOM export, HAM10000, a folder + CSV) into a real manifest.

A source is a function `(task, root, options) -> DataFrame` registered by name. It returns one row per image with
`case_id`, `patient_id`, `image` (absolute path), `label`, `site` and the subgroup source columns (`sex`, `age`);
`build_manifest` adds `origin`, `generator`, `split` and derived subgroup columns. Sources pseudonymize identifiers
with `pseudonym` so that no hospital identifier reaches the manifest or anything downstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BadInput
from bench.registry import Registry
from bench.splits import assign_splits
from bench.tasks import Task

SourceFn = Callable[[Task, Path, dict[str, Any]], pd.DataFrame]
# Sources that can supply a data root themselves (e.g. a built-in phantom) when a task names none.
DefaultRootFn = Callable[[Task], "Path | None"]


def _callable(kind: str) -> Callable[[str, Any], Any]:
    def check(name: str, obj: Any) -> Any:
        if not callable(obj):
            raise TypeError(f"{kind} {name!r} must be a function, got {obj!r}")
        return obj

    return check


# Built-ins are imported on first use; third-party sources come through the `medsynbench.sources` entry-point
# group (a function `(task, root, options) -> DataFrame`, or a module that uses `register_source` on import).
SOURCES: Registry[SourceFn] = Registry(
    "source",
    group="medsynbench.sources",
    builtins=(
        "bench.sources.dicom",
        "bench.sources.ham10000",
        "bench.sources.folder",
        "bench.sources.medmnist",
    ),
    coerce=_callable("source"),
)
# Filled by the source modules themselves, so it is complete once SOURCES is loaded.
DEFAULT_ROOTS: Registry[DefaultRootFn] = Registry(
    "default-root provider", coerce=_callable("default-root provider")
)


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Decorator: `fn(task, root, options) -> DataFrame` becomes the source a task names as `source.kind: NAME`."""
    return SOURCES.register(name)


def register_default_root(name: str) -> Callable[[DefaultRootFn], DefaultRootFn]:
    """Register a provider `(task) -> Path | None` used by `default_root` for source `name`."""
    return DEFAULT_ROOTS.register(name)


def list_sources() -> list[str]:
    return SOURCES.names()


def get_source(name: str, *, what: str | None = None) -> SourceFn:
    """The source registered as `name`; an unknown name is bad input with the closest known names."""
    return SOURCES.get(name, what=what)


def pseudonym(value: Any, salt: str) -> str:
    """A stable, non-reversible id: 16 hex characters of SHA-256(salt | value)."""
    return hashlib.sha256(f"{salt}|{value}".encode()).hexdigest()[:16]


def build_manifest(task: Task, root: str | Path, options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Read a dataset through the task's source and return a complete real manifest (absolute image paths)."""
    root = Path(root)
    if not root.exists():
        raise BadInput(f"{root}: data root does not exist")
    opts = dict(task.source.options)
    opts.update(options or {})
    where = f"{task.path}: field 'source.kind'" if task.path else f"task {task.name!r}: field 'source.kind'"
    df = get_source(task.source.kind, what=where)(task, root, opts)
    df = df.copy()
    df["origin"] = "real"
    df["generator"] = None
    for col in ("sex", "age"):
        if col not in df.columns:
            df[col] = None
    df = task.add_subgroup_columns(df)
    df = assign_splits(df, task)
    front = ["case_id", "patient_id", "image", "label", "site", "split", "origin", "generator"]
    return df[front + [c for c in df.columns if c not in front]].sort_values("case_id").reset_index(drop=True)


def default_root(task: Task) -> Path:
    """The data root a task uses when none is given: its source's `root` option, else what the source's
    registered default-root provider offers (e.g. the built-in phantom), else a clear error."""
    root = task.source.options.get("root")
    if not root:
        SOURCES.load()
        provider = DEFAULT_ROOTS.get(task.source.kind) if task.source.kind in DEFAULT_ROOTS else None
        found = provider(task) if provider else None
        if found is not None:
            return Path(found)
        raise BadInput(f"task {task.name!r}: no --root given and the task's source has no default root")
    p = Path(root).expanduser()
    if not p.is_absolute() and task.folder is not None:
        p = task.folder / p
    return p
