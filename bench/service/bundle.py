"""What a team may upload, checked before it is queued, and unpacked safely when a worker takes it.

A synthetic bundle is a .zip or .tar.gz holding `labels.csv` (columns `image`, `label`, optionally `sex`, `age`),
the images it lists and the generator card (`card.yaml` or `card.json`), at the top level or in one folder.
Prediction files are .csv or .parquet with `case_id` and one `prob_<class>` column per class; on a segmentation
board they are one label maps file (.npz, `bench.labelmaps`: a map per evaluation case under its salted id), read
within bounds checked before it expands. A segmentation board's synthetic bundle lists image–mask pairs: labels.csv
has a `mask` column naming each image's label map (`bench.generators.importer`).
"""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath

import pandas as pd

from bench.errors import BadInput
from bench.labelmaps import LabelMaps, load_labelmaps
from bench.leaderboard.archive import MAX_MEMBERS, extract_archive, inspect_archive, is_archive

KINDS = ("synthetic", "predictions")
PREDICTION_SUFFIXES = (".csv", ".parquet")
LABELMAP_SUFFIXES = (".npz",)
LABELS_FILE = "labels.csv"
CARD_FILES = ("card.yaml", "card.yml", "card.json")


MAX_FILENAME = 200


def check_filename(kind: str, filename: str, segmentation: bool = False) -> None:
    """Refuse a file name whose kind or suffix the board does not take (`segmentation`: predictions are label
    maps)."""
    if len(filename) > MAX_FILENAME:
        raise BadInput(f"file name of {len(filename)} characters: the limit is {MAX_FILENAME}")
    if kind not in KINDS:
        raise BadInput(f"field 'kind': {kind!r} is not one of {list(KINDS)}")
    name = filename.lower()
    if kind == "synthetic" and not is_archive(name):
        raise BadInput(f"{filename}: a synthetic bundle must be a .zip or .tar.gz archive")
    if kind == "predictions" and segmentation and not name.endswith(LABELMAP_SUFFIXES):
        raise BadInput(
            f"{filename}: this is a segmentation board: predictions must be a label maps .npz file "
            "(one uint8 map per evaluation case; see bench.labelmaps)"
        )
    if kind == "predictions" and not segmentation and not name.endswith(PREDICTION_SUFFIXES):
        raise BadInput(f"{filename}: predictions must be a .csv or .parquet file")


def _top(names: list[str]) -> str | None:
    """The folder the bundle's files sit in: '' for the top level, 'x' for a single folder."""
    for base in ("", *sorted({PurePosixPath(n).parts[0] for n in names if len(PurePosixPath(n).parts) > 1})):
        prefix = f"{base}/" if base else ""
        if f"{prefix}{LABELS_FILE}" in names and any(f"{prefix}{c}" in names for c in CARD_FILES):
            return base
    return None


def check_bundle(path: Path, filename: str, max_unpacked: int, max_members: int = MAX_MEMBERS) -> None:
    """Reject an unsafe or incomplete bundle before it is queued; messages name the uploaded file, not our copy.

    Every check the worker's unpacking makes of the archive's index is made here, so that a bundle the worker
    would refuse costs no quota."""
    try:
        # Headers and padding on top of the files: a tar.gz inflating further than this is not a bundle.
        members = inspect_archive(
            path, max_unpacked, max_members, max_unpacked + max_members * 1024 + (1 << 20)
        )
    except BadInput as e:
        raise rename(e, path, filename) from None
    files = [str(PurePosixPath(m.name.replace("\\", "/"))) for m in members if m.kind == "file"]
    if _top(files) is None:
        raise BadInput(
            f"{filename}: no {LABELS_FILE} with a generator card ({' or '.join(CARD_FILES)}) beside it, at the top "
            "level or in one folder"
        )


def unpack_bundle(path: Path, dest: Path, max_unpacked: int) -> tuple[Path, Path, Path]:
    """Unpack into `dest`; returns (image root, labels.csv, card)."""
    extract_archive(path, dest, max_unpacked)
    files = [str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()]
    base = _top(files)
    if base is None:
        raise BadInput(f"{path.name}: no {LABELS_FILE} with a generator card beside it")
    root = dest / base if base else dest
    card = next(root / c for c in CARD_FILES if (root / c).is_file())
    return root, root / LABELS_FILE, card


MAX_PREDICTION_ROWS = 1_000_000
MAX_PREDICTION_COLUMNS = 200
_MAX_HEADER = 1 << 16


def _check_shape(filename: str, rows: int | None, columns: int, max_rows: int, max_columns: int) -> None:
    if columns > max_columns:
        raise BadInput(f"{filename}: {columns:,} columns, more than the limit of {max_columns:,}")
    if rows is not None and rows > max_rows:
        raise BadInput(f"{filename}: {rows:,} rows, more than the limit of {max_rows:,}")


def read_predictions(
    data: bytes | Path,
    filename: str,
    max_rows: int = MAX_PREDICTION_ROWS,
    max_columns: int = MAX_PREDICTION_COLUMNS,
) -> pd.DataFrame:
    """A predictions table; BadInput naming the file when it cannot be read or is larger than the limits.

    The limits are checked before the table is loaded: a Parquet file's row and column counts come from its
    metadata (a few kB can declare millions of rows), a CSV's columns from its first line and its rows while read.
    """
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    kind = Path(filename).suffix[1:]
    try:
        if filename.lower().endswith(".parquet"):
            # pyarrow.parquet is slow to import; only a parquet upload needs it
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(src).metadata
            _check_shape(filename, meta.num_rows, meta.num_columns, max_rows, max_columns)
            if isinstance(src, io.BytesIO):
                src.seek(0)
            df = pd.read_parquet(src)
        else:
            head = _first_line(src, filename)
            _check_shape(filename, None, head.count(b",") + 1, max_rows, max_columns)
            if isinstance(src, io.BytesIO):
                src.seek(0)
            df = pd.read_csv(src, dtype={"case_id": str}, nrows=max_rows + 1)
            _check_shape(filename, len(df), len(df.columns), max_rows, max_columns)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure is the file's fault
        raise BadInput(f"{filename}: not a readable {kind} table: {type(e).__name__}") from e
    if df.empty:
        raise BadInput(f"{filename}: no rows")
    return df


def read_labelmaps(
    path: Path, filename: str, *, max_maps: int, max_map_pixels: int, max_bytes: int
) -> LabelMaps:
    """A label maps upload, refused (BadInput naming `filename` and the limit) when its zip directory or array
    headers declare more than the bounds, before anything is decompressed."""
    try:
        return load_labelmaps(path, max_bytes=max_bytes, max_maps=max_maps, max_map_pixels=max_map_pixels)
    except BadInput as e:
        raise rename(e, path, filename) from None


def _first_line(src: io.BytesIO | Path, filename: str) -> bytes:
    if isinstance(src, io.BytesIO):
        head = src.read(_MAX_HEADER)
    else:
        with open(src, "rb") as f:
            head = f.read(_MAX_HEADER)
    line, nl, _ = head.partition(b"\n")
    if not nl and len(head) == _MAX_HEADER:
        raise BadInput(f"{filename}: header line longer than {_MAX_HEADER:,} bytes")
    return line


def rename(e: BadInput, path: Path, filename: str) -> BadInput:
    def fix(t: str) -> str:
        return t.replace(str(path), filename)

    return BadInput(fix(e.args[0] if e.args else ""), [fix(p) for p in e.problems])
