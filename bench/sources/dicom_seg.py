"""Masks of the `dicom` source: DICOM SEG files found in the export (by SOP Class UID, whatever their names) matched
to the images they reference.

Rules (each broken rule is bad input naming the SEG or image file):

- every image a SEG references (by SOP Instance UID) is in the export: a mask without its image is refused;
- a SEG's frame lies on its image's pixels: same rows and columns, FrameOfReferenceUID, pixel spacing, orientation
  and, per frame, image position (to 0.05 mm);
- every segment's label names one of the task's mask classes;
- an image is referenced by one SEG at most;
- an image of a patient whose label (labels.csv) is a lesion class is referenced by a SEG: a lesion image without a
  mask is refused. A patient labelled with the task's empty label (normal) needs no SEG; an empty one is fine too;
- an image's label follows from its mask (the class of its largest area, the empty label if it has none), and
  that must be the patient's label or the empty label (a slice beyond the lesion's ends).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from bench.imaging import (
    Unreadable,
    geometry_problem,
    mask_areas,
    read_seg,
    segment_values,
)
from bench.tasks import Task

_PROBLEMS_SHOWN = 50


def _geometry(row: Any) -> dict[str, Any]:
    return {
        "uid": row.SOPInstanceUID,
        "frame_of_reference": row.FrameOfReferenceUID,
        "rows": row.Rows,
        "columns": row.Columns,
        "spacing": row.PixelSpacing,
        "orientation": row.ImageOrientationPatient,
        "position": row.ImagePositionPatient,
    }


def match_masks(
    task: Task, headers: pd.DataFrame, segs: list[Path], labels_path: Path
) -> tuple[dict[str, tuple[str | None, str]], list[str]]:
    """For each image path: (its SEG file or None, the label its mask implies), and every problem found."""
    classes = task.mask_classes
    empty = task.masks.empty_label if task.masks else ""
    by_uid = {r.SOPInstanceUID: r for r in headers.itertuples(index=False) if r.SOPInstanceUID}
    owner: dict[str, str] = {}
    implied: dict[str, str] = {}
    problems: list[str] = []
    for seg in segs:
        seg_problems: list[str] = []
        try:
            entry = read_seg(seg, classes)
            head = entry.head
        except Unreadable as e:
            problems.append(f"{seg}: {e}")
            continue
        _, bad_segments = segment_values(head, classes)
        seg_problems += [f"{seg}: {p}" for p in bad_segments]
        missing = [u for u in head.referenced if u not in by_uid]
        if missing:
            seg_problems.append(
                f"{seg}: a mask without its image: references {len(missing)} image(s) (SOP Instance UID) that "
                "are not in the export"
            )
        mine = []
        for uid in head.referenced:
            row = by_uid.get(uid)
            if row is None:
                continue
            if row.path in owner:
                seg_problems.append(f"{seg}: image {row.path} already has a mask in {owner[row.path]}")
                continue
            problem = geometry_problem(head, _geometry(row))
            if problem:
                seg_problems.append(f"{seg}: does not align with image {row.path}: {problem}")
            owner[row.path] = str(seg)
            mine.append(row)
        if seg_problems:
            problems += seg_problems
            continue
        if entry.maps is None:
            problems.append(f"{seg}: {entry.error}")
            continue
        maps = entry.maps
        for row in mine:
            implied[row.path] = task.label_from_mask(mask_areas(maps[row.SOPInstanceUID], len(classes)))

    out: dict[str, tuple[str | None, str]] = {}
    lines = headers["_line"] if "_line" in headers.columns else pd.Series("?", index=headers.index)
    for r, line in zip(headers.itertuples(index=False), lines, strict=True):
        label = implied.get(r.path, empty)
        patient_label = getattr(r, "label", None)
        where = f"{labels_path}: row {line} (label {patient_label!r})"
        if r.path not in owner and patient_label not in (None, empty):
            problems.append(f"{r.path}: image without a mask: no DICOM SEG references it, and {where}")
        elif r.path in implied and label not in (patient_label, empty):
            problems.append(
                f"{owner[r.path]}: the mask of image {r.path} implies {label!r} (its largest class), but {where}"
            )
        out[r.path] = (owner.get(r.path), label)
    if len(problems) > _PROBLEMS_SHOWN:
        problems = problems[:_PROBLEMS_SHOWN] + [f"... and {len(problems) - _PROBLEMS_SHOWN} more"]
    return out, problems
