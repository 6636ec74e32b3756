"""The `dicom` source: a hospital DICOM export (one folder per patient / study / series) plus `labels.csv`.

`labels.csv` has one row per patient: `patient_id` (the DICOM PatientID), `label`, and optionally `site`, `sex`,
`age`, `contrast` (CE or PL). An empty or missing optional column falls back to the header: InstitutionName,
PatientSex, PatientAge, and ContrastBolusAgent (present = CE). Only headers are read here (no pixel data).

Each DICOM image file becomes one manifest row. For a segmentation task, DICOM SEG files anywhere in the export
(found by SOP Class UID) are matched to the images they reference (`bench.sources.dicom_seg`): each row gets
`mask_path` (the SEG file, empty for an image no SEG references) and the label its mask implies. Identifiers are pseudonymized with `pseudonym(..., salt=task.name)`:
no PatientID, PatientName, birth date or UID reaches the manifest.

With no data root configured, a task whose source options carry `phantom: {patients, slices, size, seed}` uses the
built-in phantom, written once into the cache (`$MEDSYNBENCH_DATA/phantom/<key>` or
`~/.cache/medsynbench/phantom/<key>`, or under `$MEDSYNBENCH_CACHE`); `masks: true` adds the lesion masks (a
different folder, the same images).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BadInput
from bench.imaging import SEG_SOP_CLASSES
from bench.io import cache_dir
from bench.phantom import DEFAULTS, params_key, write_phantom
from bench.sources import pseudonym, register_default_root, register_source
from bench.sources.dicom_seg import match_masks
from bench.tasks import Task

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
_HEADER_TAGS = [
    "PatientID",
    "PatientSex",
    "PatientAge",
    "InstitutionName",
    "ContrastBolusAgent",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "Modality",
    "SOPClassUID",
    "FrameOfReferenceUID",
    "PixelSpacing",
    "ImageOrientationPatient",
]
_SKIP_SUFFIXES = {
    ".csv",
    ".json",
    ".parquet",
    ".txt",
    ".md",
    ".xml",
    ".html",
    ".pdf",
    ".zip",
    ".yaml",
    ".yml",
}
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}


def parse_age(value: Any) -> float | None:
    """Years from a number or a DICOM AS string ('045Y', '030M', '012W', '100D'); None if empty."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    s = str(value).strip()
    if not s:
        return None
    m = re.fullmatch(r"(\d{1,3})\s*([YMWD]?)", s, flags=re.IGNORECASE)
    if m:
        n, unit = float(m.group(1)), (m.group(2) or "Y").upper()
        v = round(n / {"Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[unit], 2)
    else:
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"not an age: {s!r}") from None
    if not 0 <= v <= 130:
        raise ValueError(f"age out of range: {s!r}")
    return v


def _norm_sex(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    s = str(value).strip().lower()
    if not s:
        return None
    if s not in _SEX:
        raise ValueError(f"sex must be M, F or O, got {value!r}")
    return _SEX[s]


def _norm_contrast(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    s = str(value).strip().upper()
    if not s:
        return None
    if s not in ("CE", "PL"):
        raise ValueError(f"contrast must be CE or PL, got {value!r}")
    return s


def read_labels(path: Path, classes: list[str]) -> pd.DataFrame:
    """Read and check labels.csv; every problem names its row (the file's line number) and value."""
    if not path.is_file():
        raise BadInput(
            f"{path}: labels file not found (one row per patient: patient_id,label,site,sex,age,contrast)"
        )
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise BadInput(f"{path}: cannot be read as CSV: {e}") from e
    missing = [c for c in ("patient_id", "label") if c not in df.columns]
    if missing:
        raise BadInput(f"{path}: required column(s) {missing} missing (found {list(df.columns)})")
    problems: list[str] = []
    df = df.copy()
    for c in df.columns:
        df[c] = df[c].str.strip()
    df["_line"] = df.index + 2  # the header is line 1
    for _, r in df.iterrows():
        where = f"row {r['_line']} (patient_id {r['patient_id']!r})"
        if not r["patient_id"]:
            problems.append(f"row {r['_line']}: empty patient_id")
        if r["label"] not in classes:
            problems.append(f"{where}: label {r['label']!r} is not one of the task's classes {classes}")
        for col, fn in (("sex", _norm_sex), ("age", parse_age), ("contrast", _norm_contrast)):
            if col in df.columns:
                try:
                    fn(r[col])
                except ValueError as e:
                    problems.append(f"{where}: column {col!r}: {e}")
    dup = df[df["patient_id"].ne("") & df["patient_id"].duplicated(keep=False)]
    for pid, grp in dup.groupby("patient_id"):
        problems.append(f"rows {', '.join(map(str, grp['_line']))}: patient_id {pid!r} listed more than once")
    if problems:
        raise BadInput(f"{path}: {len(problems)} problem(s)", problems)
    return df


def scan_headers(
    root: Path, skip: set[Path] | None = None, segs: list[Path] | None = None
) -> tuple[pd.DataFrame, int]:
    """One row per DICOM image file under `root` (headers only) and the number of other files skipped. DICOM
    Segmentations (by SOP Class UID) are no images: they are appended to `segs` when given, else skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    skip = {p.resolve() for p in (skip or set())}
    rows = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if fn.startswith(".") or p.suffix.lower() in _SKIP_SUFFIXES or p.resolve() in skip:
                skipped += 1
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError) as e:
                log.debug("skipping %s: not a DICOM file (%s)", p, e)
                skipped += 1
                continue
            if str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES:
                if segs is not None:
                    segs.append(p.resolve())
                else:
                    skipped += 1
                continue
            if "Rows" not in ds:  # DICOMDIR, structured reports, presentation states: no image
                skipped += 1
                continue
            ipp = ds.get("ImagePositionPatient")
            rows.append(
                {
                    "path": str(p.resolve()),
                    "PatientID": str(ds.get("PatientID", "") or "").strip(),
                    "PatientSex": str(ds.get("PatientSex", "") or ""),
                    "PatientAge": str(ds.get("PatientAge", "") or ""),
                    "InstitutionName": str(ds.get("InstitutionName", "") or "").strip(),
                    "ContrastBolusAgent": str(ds.get("ContrastBolusAgent", "") or "").strip(),
                    "SOPInstanceUID": str(ds.get("SOPInstanceUID", "") or ""),
                    "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "") or ""),
                    "InstanceNumber": _num(ds.get("InstanceNumber")),
                    "z": _num(ipp[2]) if ipp is not None and len(ipp) == 3 else None,
                    "frames": int(_num(ds.get("NumberOfFrames")) or 1),
                    # Geometry, for aligning masks (read here, so no image is opened twice).
                    "FrameOfReferenceUID": str(ds.get("FrameOfReferenceUID", "") or ""),
                    "Rows": int(_num(ds.get("Rows")) or 0),
                    "Columns": int(_num(ds.get("Columns")) or 0),
                    "PixelSpacing": _nums(ds.get("PixelSpacing")),
                    "ImageOrientationPatient": _nums(ds.get("ImageOrientationPatient")),
                    "ImagePositionPatient": _nums(ipp),
                }
            )
    return pd.DataFrame(rows), skipped


def _nums(v: Any) -> tuple[float, ...] | None:
    if v is None:
        return None
    try:
        return tuple(
            float(x) for x in (v if not isinstance(v, str | bytes) and hasattr(v, "__len__") else [v])
        )
    except (TypeError, ValueError):
        return None


def _num(v: Any) -> float | None:
    try:
        return float(v) if v is not None and str(v).strip() != "" else None
    except (TypeError, ValueError):
        return None


@register_source("dicom")
def dicom_source(task: Task, root: Path, options: dict[str, Any]) -> pd.DataFrame:
    """Rows for every DICOM image under `root`, labelled from `labels.csv` (option `labels`: another file name,
    relative to the root)."""
    root = Path(root)
    labels_path = Path(options.get("labels") or LABELS_FILE)
    if not labels_path.is_absolute():
        labels_path = root / labels_path
    labels = read_labels(labels_path, task.classes)
    segs: list[Path] | None = [] if task.is_segmentation else None
    headers, skipped = scan_headers(root, skip={labels_path}, segs=segs)
    if headers.empty:
        raise BadInput(f"{root}: no DICOM image files found (expected one folder per patient/study/series)")
    if skipped:
        log.info("%s: skipped %d file(s) that are not DICOM images", root, skipped)

    problems: list[str] = []
    no_pid = headers[headers["PatientID"] == ""]
    if len(no_pid):
        problems.append(f"{len(no_pid)} DICOM file(s) without a PatientID, e.g. {no_pid['path'].iloc[0]}")
    multi = headers[headers["frames"] > 1]
    if len(multi):
        problems.append(
            f"{len(multi)} multi-frame DICOM file(s) (one image per file is expected), e.g. {multi['path'].iloc[0]}"
        )
    dup = headers[headers["SOPInstanceUID"].ne("") & headers["SOPInstanceUID"].duplicated(keep=False)]
    if len(dup):
        first = dup.groupby("SOPInstanceUID")["path"].apply(list).iloc[0]
        problems.append(
            f"{len(dup)} file(s) share a SOPInstanceUID with another file (copies?), e.g. {first}"
        )
    have_images = set(headers["PatientID"])
    listed = set(labels["patient_id"])
    orphans = labels[~labels["patient_id"].isin(have_images)]
    if len(orphans):
        problems.append(
            f"{labels_path}: {_lines(orphans)}: no DICOM images found for patient_id "
            f"{_few(orphans['patient_id'])}"
        )
    unlabeled = headers[headers["PatientID"].ne("") & ~headers["PatientID"].isin(listed)]
    if len(unlabeled):
        pids = sorted(set(unlabeled["PatientID"]))
        problems.append(
            f"{len(unlabeled)} DICOM file(s) of {len(pids)} patient(s) without a row in {labels_path}: "
            f"PatientID {_few(pids)} (e.g. {unlabeled['path'].iloc[0]})"
        )
    if problems:
        raise BadInput(f"{root}: the DICOM export and {labels_path.name} do not match", problems)

    lab = labels.set_index("patient_id")
    df = headers.join(lab, on="PatientID")
    masks: dict[str, tuple[str | None, str]] = {}
    if segs is not None:
        masks, problems = match_masks(task, df, segs, labels_path)
        if problems:
            raise BadInput(f"{root}: the DICOM images and their masks (DICOM SEG) do not match", problems)
    out_rows = []
    for r in df.itertuples(index=False):
        site = (getattr(r, "site", "") or "") or r.InstitutionName
        sex = _norm_sex(getattr(r, "sex", None)) or _header_sex(r.PatientSex)
        age = parse_age(getattr(r, "age", None))
        if age is None:
            try:
                age = parse_age(r.PatientAge)
            except ValueError:
                age = None
        contrast = _norm_contrast(getattr(r, "contrast", None)) or ("CE" if r.ContrastBolusAgent else "PL")
        if not site:
            problems.append(
                f"{labels_path}: row {r._line}: no site (empty `site` and no InstitutionName in {r.path})"
            )
        out_rows.append(
            {
                "case_id": pseudonym(
                    f"{r.PatientID}|{r.SeriesInstanceUID}|{r.SOPInstanceUID or r.path}", task.name
                ),
                "patient_id": pseudonym(r.PatientID, task.name),
                "image": r.path,
                "label": r.label,
                "site": site,
                "sex": sex,
                "age": age,
                "contrast": contrast,
                "_series": r.SeriesInstanceUID,
                "_order": r.z if r.z is not None else r.InstanceNumber,
            }
        )
        if segs is not None:
            # The image's label follows from its mask; the SEG's path addresses it (its frames are found by the
            # image's own SOP Instance UID, so no UID enters the manifest).
            out_rows[-1]["mask_path"], out_rows[-1]["label"] = masks[r.path]
    if problems:
        raise BadInput(f"{root}: {len(problems)} problem(s)", sorted(set(problems)))
    out = pd.DataFrame(out_rows)
    # Slice index within each series, head to feet (DICOM z grows towards the head), else by instance number.
    out["_order"] = pd.to_numeric(out["_order"], errors="coerce")
    out = out.sort_values(["patient_id", "_series", "_order", "image"], ascending=[True, True, False, True])
    out["slice"] = out.groupby(["patient_id", "_series"]).cumcount().astype(int)
    out["age"] = pd.to_numeric(out["age"], errors="coerce")
    if "mask_path" in out.columns:  # None, not NaN, where an image has no mask
        out["mask_path"] = pd.Series(
            [p if isinstance(p, str) else None for p in out["mask_path"]], index=out.index, dtype=object
        )
    return out.drop(columns=["_series", "_order"]).reset_index(drop=True)


def _header_sex(v: str) -> str | None:
    try:
        return _norm_sex(v)
    except ValueError:
        return None


def _lines(df: pd.DataFrame) -> str:
    lines = [str(x) for x in df["_line"]]
    head = "row " if len(lines) == 1 else "rows "
    return head + ", ".join(lines[:20]) + (f", ... ({len(lines)} rows)" if len(lines) > 20 else "")


def _few(values, limit: int = 10) -> str:
    vals = [repr(v) for v in values]
    return ", ".join(vals[:limit]) + (f", ... ({len(vals)} in all)" if len(vals) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# The built-in phantom as the default data root

_ANNOUNCED: set[str] = set()


def phantom_home() -> Path:
    """Where the phantom is written when a task needs it: $MEDSYNBENCH_DATA, else the medsynbench cache."""
    if env := os.environ.get("MEDSYNBENCH_DATA"):
        return Path(env).expanduser() / "phantom"
    return cache_dir() / "phantom"


def phantom_root(params: dict[str, Any] | None = None) -> Path:
    """The phantom export for `params` (patients, slices, size, seed; `masks: true` adds each lesion's DICOM SEG),
    written on first use."""
    p: dict[str, Any] = {k: int((params or {}).get(k, v)) for k, v in DEFAULTS.items()}
    known = [*DEFAULTS, "masks"]
    unknown = sorted(set(params or {}) - set(known))
    if unknown:
        raise BadInput(f"source option 'phantom': unknown key(s) {unknown} (known: {sorted(known)})")
    masks = (params or {}).get("masks", False)
    if not isinstance(masks, bool):
        raise BadInput(f"source option 'phantom.masks': must be true or false, got {masks!r}")
    if masks:
        p["masks"] = True
    root = phantom_home() / params_key(p)
    if not (root / "labels.csv").is_file():
        log.info("writing the built-in phantom (%s) to %s", ", ".join(f"{k}={v}" for k, v in p.items()), root)
        with contextlib.suppress(FileExistsError):  # another process wrote it meanwhile
            write_phantom(root, **p)
    return root


def default_phantom_root(task: Task) -> Path | None:
    """Default-root provider of the `dicom` source: the phantom, when the task's source options describe one."""
    params = task.source.options.get("phantom")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise BadInput(
            f"task {task.name!r}: source option 'phantom' must be a mapping of patients/slices/size/seed"
        )
    root = phantom_root(params)
    if task.name not in _ANNOUNCED:
        _ANNOUNCED.add(task.name)
        log.info("task %s: no data root configured; using the built-in CT phantom at %s", task.name, root)
    return root


register_default_root("dicom")(default_phantom_root)
