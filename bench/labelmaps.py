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
# npy headers of the four arrays are a few hundred bytes; numpy's own default cap is 10,000.
_MAX_HEADER = 10_000


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


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and header length of one npz member, decompressing only its first few hundred bytes."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f"{info.filename}: npy format version {version} (1.0 and 2.0 are read)")
        return tuple(int(n) for n in shape), dtype, f.tell()


def _check_declared(
    path: Path,
    zf: zipfile.ZipFile,
    max_bytes: int | None,
    max_maps: int | None,
    max_map_pixels: int | None,
) -> None:
    """Refuse a file whose zip directory or npy headers declare more than the limits, before anything expands.

    Python's zipfile stops a member at the size its directory entry declares (a stream that inflates further fails
    its CRC), and every array must fit in its member, so once these checks pass np.load allocates at most
    `max_bytes`; a header that claims a larger array than its member holds would otherwise make numpy allocate the
    claimed size before finding the data short.
    """
    for key in _KEYS:
        info = zf.getinfo(f"{key}.npy")
        shape, dtype, header = _npy_header(zf, info)
        need = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not dtype.hasobject and need > info.file_size:
            raise BadInput(
                f"{path}: {key}: header declares a {dtype} array of shape {shape} "
                f"({need:,} bytes) in a {info.file_size:,}-byte member"
            )
        if key not in ("case_ids", "maps") or not shape:
            continue
        if max_maps is not None and shape[0] > max_maps:
            raise BadInput(
                f"{path}: {key}: {shape[0]:,} maps declared, over the limit of {max_maps:,} (max_maps)"
            )
        pixels = int(np.prod(shape[1:], dtype=np.int64))
        if key == "maps" and max_map_pixels is not None and pixels > max_map_pixels:
            raise BadInput(
                f"{path}: maps: each map declares {' x '.join(map(str, shape[1:]))} = {pixels:,} pixels, "
                f"over the limit of {max_map_pixels:,} (max_map_pixels)"
            )
    # After the arrays' own limits, which say more (a map of the wrong size), and before anything expands.
    infos = zf.infolist()
    declared = sum(i.file_size for i in infos)
    if max_bytes is not None and declared > max_bytes:
        raise BadInput(
            f"{path}: {len(infos)} member(s) declare {declared:,} bytes uncompressed, "
            f"over the limit of {max_bytes:,} bytes (max_bytes)"
        )


def load_labelmaps(
    path: str | Path,
    *,
    max_bytes: int | None = None,
    max_maps: int | None = None,
    max_map_pixels: int | None = None,
) -> LabelMaps:
    """Read a file written by `save_labelmaps`; anything malformed is BadInput naming the file and what is wrong.

    The limits bound what an untrusted file may make this process allocate: `max_bytes` (uncompressed bytes of all
    members), `max_maps` (number of maps) and `max_map_pixels` (pixels per map). They are checked against the zip's
    central directory and the arrays' npy headers before any array is decompressed; a file declaring more is
    BadInput naming the file and the limit.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: label maps file not found")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            missing = [k for k in _KEYS if f"{k}.npy" not in names]
            if missing:
                raise BadInput(f"{path}: not a label maps file (missing arrays: {', '.join(missing)})")
            _check_declared(path, zf, max_bytes, max_maps, max_map_pixels)
        with np.load(path, allow_pickle=False) as z:
            fmt, ids, maps, k = (z[key] for key in _KEYS)
    except BadInput:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # ValueError covers pickled (object) arrays, which a label maps file never holds, and malformed npy headers.
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
