"""Stored segmentation predictions: one compressed npz of uint8 label maps per run and split.

A label map is a 2-D uint8 array per image: 0 is background and k the k-th mask class of the task (1-based, in the
task's `masks.classes` order), so `num_classes` counts the background too. The per-case, per-class counts that
metrics and the bootstrap use are derived from these maps; keeping the maps lets anyone recompute every count.
Read by evaluation and leaderboards without torch, so this module depends on nothing but numpy and bench.io.

File layout (format `medsynbench-labelmaps/1`): arrays `format` (the version string), `case_ids` (unicode, one per
map, unique), `maps` (uint8 `[N, H, W]`) and `num_classes` (an integer scalar).
"""

from __future__ import annotations

import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import BadInput
from bench.io import atomic_path

FORMAT = "medsynbench-labelmaps/1"
_KEYS = ("format", "case_ids", "maps", "num_classes")


@dataclass(frozen=True)
class LabelMaps:
    """Label maps `[N, H, W]` (uint8) of the cases `case_ids`, with values in `0 .. num_classes - 1`."""

    case_ids: list[str]
    maps: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.case_ids)

    def by_case(self) -> dict[str, np.ndarray]:
        return dict(zip(self.case_ids, self.maps, strict=True))


def _problems(case_ids: Sequence[str], maps: np.ndarray, num_classes: int) -> list[str]:
    out = []
    if maps.dtype != np.uint8 or maps.ndim != 3:
        out.append(f"maps: expected uint8 [N, H, W], got {maps.dtype} {tuple(maps.shape)}")
    if len(case_ids) != len(maps):
        out.append(f"case_ids: {len(case_ids)} ids for {len(maps)} maps")
    bad_ids = [c for c in case_ids if not isinstance(c, str) or not c]
    if bad_ids:
        out.append(f"case_ids: {len(bad_ids)} empty or not a string (first: {bad_ids[0]!r})")
    dups = sorted(c for c, n in Counter(case_ids).items() if n > 1)
    if dups:
        out.append(f"case_ids: {len(dups)} repeated, e.g. {dups[:3]}")
    if not 2 <= num_classes <= 256:
        out.append(f"num_classes: {num_classes} (background + at least one mask class, at most 256)")
    elif maps.dtype == np.uint8 and maps.size and int(maps.max()) >= num_classes:
        n_bad = int((maps >= num_classes).any(axis=tuple(range(1, maps.ndim))).sum())
        out.append(
            f"maps: values up to {int(maps.max())} in {n_bad} map(s); expected 0..{num_classes - 1} "
            f"(background + {num_classes - 1} mask classes)"
        )
    return out


def save_labelmaps(
    path: str | Path, case_ids: Sequence[str], maps: np.ndarray, *, num_classes: int, mode: int | None = None
) -> Path:
    """Write `maps` (uint8 `[N, H, W]`, one per case id) to `path` atomically, compressed (owner-only unless `mode`
    says otherwise, e.g. a leaderboard's published files).

    Inconsistent input (ids and maps of different lengths, repeated ids, values outside `0..num_classes-1`) is a
    ValueError: the caller produced it, so nothing is written.
    """
    ids = [str(c) for c in case_ids]
    arr = np.asarray(maps)
    problems = _problems(ids, arr, int(num_classes))
    if problems:
        raise ValueError(f"{path}: label maps not written: " + "; ".join(problems))
    with atomic_path(path, mode) as tmp, tmp.open("wb") as f:
        # A file object, so numpy does not append ".npz" to the temporary name.
        np.savez_compressed(
            f,
            format=np.array(FORMAT),
            case_ids=np.array(ids, dtype=str).reshape(len(ids)),
            maps=np.ascontiguousarray(arr),
            num_classes=np.array(int(num_classes), dtype=np.int64),
        )
    return Path(path)


def load_labelmaps(path: str | Path) -> LabelMaps:
    """Read a file written by `save_labelmaps`; anything malformed is BadInput naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: label maps file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise BadInput(f"{path}: not a label maps file (missing arrays: {', '.join(missing)})")
            fmt, ids, maps, k = (z[key] for key in _KEYS)
    except BadInput:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # ValueError covers pickled (object) arrays, which a label maps file never holds.
        raise BadInput(f"{path}: not a readable label maps file: {e}") from e
    if fmt.shape != () or str(fmt) != FORMAT:
        raise BadInput(f"{path}: format {fmt!r}; this version reads {FORMAT!r}")
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise BadInput(f"{path}: case_ids: expected a 1-D string array, got {ids.dtype} {tuple(ids.shape)}")
    if k.shape != () or k.dtype.kind not in "iu":
        raise BadInput(f"{path}: num_classes: expected an integer, got {k.dtype} {tuple(k.shape)}")
    case_ids = ids.tolist()
    problems = _problems(case_ids, maps, int(k))
    if problems:
        raise BadInput(f"{path}: invalid label maps", problems)
    return LabelMaps(case_ids, maps, int(k))
