"""File helpers shared by every step: atomic writes, hashing, tables.

Every step writes its outputs through these so that a crash or a bad input never leaves a half-written file where
a later step (or a resumed run) would trust it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput


def cache_dir() -> Path:
    """medsynbench's own cache: $MEDSYNBENCH_CACHE, else ~/.cache/medsynbench (never needed for correctness)."""
    env = os.environ.get("MEDSYNBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medsynbench"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _make_parent(path: Path) -> None:
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        # mkdir would say "File exists", which hides what is wrong.
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(parent))
    parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    The file keeps mkstemp's owner-only permissions unless `mode` is given (e.g. 0o644 for published pages).
    """
    path = Path(path)
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if mode is not None:
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it becomes `path` only if the block succeeds."""
    path = Path(path)
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = path.with_name(f".{path.name}.old")
            if old.exists():  # left by an earlier swap that was killed between its two renames
                shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the old folder goes back: a failed write never loses it
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, mode: int | None = None) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n", mode)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


class UnreadableJSON(BadInput, ValueError):
    """A JSON file that is not UTF-8 or not valid JSON: exit 2 naming the file; also a ValueError, which is what
    callers that collect problems catch."""


def read_json(path: str | Path) -> Any:
    """Parse a JSON file. Bad bytes or bad JSON raise an exit-2 error naming the file and the place; a missing or
    unreadable file raises the OSError as it is (callers decide whether that is the user's fault)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableJSON(
            f"{path}: not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UnreadableJSON(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def write_table(path: str | Path, df: pd.DataFrame, mode: int | None = None) -> Path:
    """Write Parquet or CSV by suffix, atomically."""
    path = Path(path)
    with atomic_path(path, mode) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            raise ValueError(f"unsupported table format: {path}")
    return path


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path, keep_default_na=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise BadInput(f"{path}: cannot be read as {path.suffix[1:]}: {e}") from e
    raise BadInput(f"{path}: unsupported table format {path.suffix!r} (use .parquet or .csv)")


def portable_path(path: str | Path, bases: tuple[Path, ...]) -> str:
    """`path` relative to the first base folder holding it, else its file name alone: never an absolute path.

    Files meant to leave the machine (records, bundles, pages) name local files this way. A base that is the
    filesystem root would spell the absolute path without its leading slash, so it is skipped.
    """
    p = Path(path).resolve()
    for b in bases:
        b = Path(b).resolve()
        if b.parent != b and p.is_relative_to(b) and p != b:
            return p.relative_to(b).as_posix()
    return p.name
