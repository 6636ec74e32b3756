"""The manifest contract: one row per image, the unit every later step reads.

Required columns: case_id, patient_id, image, label, site, origin, split; `generator` for synthetic rows; subgroup
columns as the task names them (`age_group` may be derived from `age`); `mask_path` for a segmentation task (the
row's mask file, empty for an image without lesion). Image and mask paths are relative to the manifest's own folder
unless absolute.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd

from bench.errors import BadInput
from bench.imaging import Unreadable, check_readable, mask_areas, read_mask
from bench.io import read_table, write_table
from bench.tasks import Task

REQUIRED = ["case_id", "patient_id", "image", "label", "site", "origin", "split"]
ORIGINS = ("real", "synthetic")
# `reserve`: training-site patients set aside by the task (`splits.reserve`), never trained on or evaluated; the
# positive control `real-holdout` draws from them.
SPLITS = ("train", "val", "test", "external", "reserve")
TRAINING_SPLITS = ("train", "val", "test", "reserve")


def manifest_hash(df: pd.DataFrame) -> str:
    """SHA-256 over the manifest's content, independent of row and column order."""
    cols = sorted(df.columns)
    canon = df[cols].copy()
    for c in cols:
        canon[c] = canon[c].map(lambda v: "" if pd.isna(v) else str(v))
    canon = canon.sort_values(cols, kind="mergesort").reset_index(drop=True)
    h = hashlib.sha256()
    h.update(("\x1f".join(cols) + "\n").encode())
    for row in canon.itertuples(index=False, name=None):
        h.update(("\x1f".join(row) + "\n").encode())
    return h.hexdigest()


class Manifest:
    """A manifest table plus the folder its image paths are relative to."""

    def __init__(self, df: pd.DataFrame, root: str | Path, path: Path | None = None):
        self.df = df.reset_index(drop=True)
        self.root = Path(root).resolve()
        self.path = path

    @property
    def sha256(self) -> str:
        return manifest_hash(self.df)

    def image_path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def image_paths(self) -> list[Path]:
        return [self.image_path(r) for r in self.df["image"].astype(str)]

    def subset(self, mask) -> Manifest:
        return Manifest(self.df[mask].reset_index(drop=True), self.root, self.path)

    def __len__(self) -> int:
        return len(self.df)


def read_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    path = Path(path)
    df = read_table(path)
    for col in ("case_id", "patient_id", "image", "label", "site", "split", "origin", "generator"):
        if col in df.columns:
            df[col] = df[col].astype(object).where(df[col].notna(), None)
            df[col] = df[col].map(lambda v: v if v is None else str(v))
    if "mask_path" in df.columns:  # None (not NaN) where a row has no mask, whatever the file format
        df["mask_path"] = pd.Series(
            [str(v) if isinstance(v, str) and v.strip() else None for v in df["mask_path"]],
            index=df.index,
            dtype=object,
        )
    return Manifest(df, root if root is not None else path.resolve().parent, path.resolve())


def write_manifest(df: pd.DataFrame, path: str | Path, image_root: str | Path | None = None) -> Path:
    """Write a manifest with image paths made relative to the manifest's folder (atomic)."""
    path = Path(path).resolve()
    out = df.copy()
    base = path.parent

    def rel(p: str) -> str:
        q = Path(p)
        if not q.is_absolute() and image_root is not None:
            q = Path(image_root).resolve() / q
        if not q.is_absolute():
            return str(q)
        # relpath rather than relative_to: images may live beside, not below, the manifest.
        return os.path.relpath(q.resolve(), base)

    out["image"] = out["image"].astype(str).map(rel)
    if "mask_path" in out.columns:
        out["mask_path"] = out["mask_path"].map(
            lambda p: None if p is None or pd.isna(p) or not str(p) else rel(p)
        )
    return write_table(path, out)


def validate_manifest(
    m: Manifest,
    task: Task,
    *,
    check_images: bool = True,
    allow_origins: tuple[str, ...] = ORIGINS,
) -> list[str]:
    """Every problem with the manifest, each naming its row (0-based, as in the file) or column."""
    df = m.df
    problems: list[str] = []
    missing = [c for c in REQUIRED if c not in df.columns]
    for c in missing:
        problems.append(f"column {c!r}: required column is missing")
    if df.empty:
        problems.append("the manifest has no rows (a header alone is not a dataset)")
    present = [c for c in REQUIRED if c in df.columns]
    for c in present:
        bad = df.index[df[c].isna() | (df[c].astype(str).str.strip() == "")]
        if len(bad):
            problems.append(f"column {c!r}: empty/NaN in rows {_rows(bad)}")

    if "case_id" in df.columns:
        dup = df["case_id"].dropna()
        dup = dup[dup.duplicated(keep=False)]
        for cid, idx in dup.groupby(dup).groups.items():
            problems.append(f"column 'case_id': duplicate {cid!r} in rows {_rows(idx)}")

    if "label" in df.columns:
        bad = df.index[df["label"].notna() & ~df["label"].isin(task.classes)]
        if len(bad):
            vals = sorted(set(df.loc[bad, "label"].astype(str)))
            problems.append(
                f"column 'label': {vals} not among the task's classes {task.classes} (rows {_rows(bad)})"
            )

    if "origin" in df.columns:
        bad = df.index[df["origin"].notna() & ~df["origin"].isin(allow_origins)]
        if len(bad):
            problems.append(f"column 'origin': must be one of {list(allow_origins)} (rows {_rows(bad)})")
        syn = df["origin"] == "synthetic"
        if syn.any():
            if "generator" not in df.columns:
                problems.append("column 'generator': required when there are synthetic rows")
            else:
                bad = df.index[
                    syn & (df["generator"].isna() | (df["generator"].astype(str).str.strip() == ""))
                ]
                if len(bad):
                    problems.append(
                        f"column 'generator': synthetic rows without a generator (rows {_rows(bad)})"
                    )

    if "split" in df.columns:
        bad = df.index[df["split"].notna() & ~df["split"].isin(SPLITS)]
        if len(bad):
            problems.append(f"column 'split': must be one of {list(SPLITS)} (rows {_rows(bad)})")

    if {"patient_id", "split"} <= set(df.columns):
        sub = df.dropna(subset=["patient_id", "split"])
        nsplit = sub.groupby("patient_id")["split"].nunique()
        for pid in nsplit[nsplit > 1].index:
            rows = sub.index[sub["patient_id"] == pid]
            splits = sorted(set(sub.loc[rows, "split"]))
            problems.append(
                f"patient {pid!r} appears in several splits {splits} (rows {_rows(rows)}): leakage"
            )

    if {"site", "split"} <= set(df.columns):
        ext = set(task.sites.external)
        bad = df.index[df["site"].isin(ext) & df["split"].isin(TRAINING_SPLITS)]
        if len(bad):
            problems.append(f"external site rows in a training split (rows {_rows(bad)})")
        known = set(task.all_sites)
        real = df["origin"] == "real" if "origin" in df.columns else pd.Series(True, index=df.index)
        bad = df.index[real & df["site"].notna() & ~df["site"].isin(known)]
        if len(bad):
            vals = sorted(set(df.loc[bad, "site"].astype(str)))
            problems.append(
                f"column 'site': {vals} not among the task's sites {sorted(known)} (rows {_rows(bad)})"
            )
        bad = df.index[df["site"].isin(task.sites.train) & (df["split"] == "external")]
        if len(bad):
            problems.append(f"training-site rows marked 'external' (rows {_rows(bad)})")

    if task.is_segmentation:
        problems += _mask_problems(m, task)
    if check_images and "image" in df.columns:
        readable = []
        for i, rel in df["image"].items():
            if rel is None or pd.isna(rel):
                continue
            p = m.image_path(str(rel))
            err = check_readable(p)
            if err:
                problems.append(f"row {i}: image {str(rel)!r}: {err}")
            else:
                readable.append((i, p))
        if task.is_segmentation and "mask_path" in df.columns:
            # Rows of one SEG one after another, so that each SEG file is decoded once.
            readable.sort(key=lambda ip: str(df.at[ip[0], "mask_path"] or ""))
            for i, p in readable:
                problems += _check_mask(m, task, i, p)
            problems.sort(key=_row_number)
    return problems


def _row_number(problem: str) -> tuple[int, int]:
    """Problems about rows in row order (the others, about columns, first as they came)."""
    head = problem.split(":", 1)[0]
    if head.startswith("row ") and head[4:].isdigit():
        return (1, int(head[4:]))
    return (0, 0)


def _has_mask(v: object) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v)) and bool(str(v).strip())


def _mask_problems(m: Manifest, task: Task) -> list[str]:
    """A segmentation manifest's mask column: present, and set on every row whose label is a lesion class."""
    df = m.df
    if "mask_path" not in df.columns:
        return [f"column 'mask_path': required for segmentation task {task.name!r}"]
    has = df["mask_path"].map(_has_mask)
    empty = task.masks.empty_label if task.masks else None
    bad = df.index[~has & df["label"].notna() & (df["label"] != empty)] if "label" in df.columns else []
    if len(bad):
        return [f"column 'mask_path': rows {_rows(bad)} have a lesion label but no mask"]
    return []


def _check_mask(m: Manifest, task: Task, i: int, image: Path) -> list[str]:
    """The row's mask opens, lies on its image's pixels, names only mask classes, and implies the row's label."""
    v = m.df.at[i, "mask_path"]
    mask = m.image_path(str(v)) if _has_mask(v) else None
    try:
        label_map, _ = read_mask(image, mask, task.mask_classes)
    except Unreadable as e:
        return [f"row {i}: mask {str(v)!r}: {e}"]
    implied = task.label_from_mask(mask_areas(label_map, len(task.mask_classes)))
    label = m.df.at[i, "label"] if "label" in m.df.columns else None
    if label is not None and not pd.isna(label) and implied != label:
        return [f"row {i}: label {label!r}, but its mask {str(v)!r} implies {implied!r} (its largest class)"]
    return []


def _rows(idx, limit: int = 20) -> str:
    idx = list(idx)
    s = ", ".join(str(i) for i in idx[:limit])
    return s + (f", ... ({len(idx)} rows)" if len(idx) > limit else "")


def summary(m: Manifest) -> str:
    df = m.df
    return (
        f"{len(df)} rows, {df['patient_id'].nunique()} patients, {df['site'].nunique()} sites "
        f"({', '.join(sorted(map(str, df['site'].unique())))}), {df['label'].nunique()} classes "
        f"({', '.join(sorted(map(str, df['label'].unique())))})"
    )


def load_valid_manifest(path: str | Path, task: Task, *, check_images: bool = False, **kw) -> Manifest:
    """Read and validate; raise BadInput listing every problem."""
    m = read_manifest(path)
    problems = validate_manifest(m, task, check_images=check_images, **kw)
    if problems:
        raise BadInput(f"{path}: {len(problems)} problem(s) in manifest", problems)
    return m
