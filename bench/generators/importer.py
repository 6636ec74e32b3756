"""`import-synthetic`: a folder of a user's generated images + a labels CSV + a generator card -> a synthetic
manifest under the same contract the reference generators write.

Requirements on the images (checked before anything is written; every problem is listed with its file and CSV
row): each file exists and decodes (PNG, JPEG, NPZ or DICOM); all images share one height x width and one channel
count, the first image setting the reference; the channel count equals the task's (1 = grayscale, 3 = RGB). Sizes
need not match the task's size: images are resized when they are read into the cache.

A segmentation task takes image–mask pairs: the CSV's `mask` column names each image's label map (a PNG, NPY or NPZ
array of integers, 0 = background, k = the task's k-th mask class; a DICOM SEG for a DICOM image), relative to
--root like the image. Every image needs its own mask (an all-zero map for an image without lesion, never shared by
two rows), of the image's height x width, with values 0..K. `label` may be left out: it follows from the mask (the
task's `label_from_mask`); where given it must agree. The manifest gets the `mask_path` column.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from bench.errors import BadInput
from bench.generators.card import GeneratorCard, read_card, write_card
from bench.imaging import Unreadable, _read_raw, _sniff, mask_areas, read_mask
from bench.io import read_table
from bench.manifest import Manifest, validate_manifest, write_manifest
from bench.tasks import Task, load_task

log = logging.getLogger(__name__)

OPTIONAL_COLUMNS = ("sex", "age", "case_id")


# Pillow modes the image cache reads as colour (it converts them to RGB); every other mode is read as grayscale.
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def image_shape(path: str | Path) -> tuple[int, int, int]:
    """(height, width, channels) of one image file, as the image cache will read it.

    PNG and JPEG are judged from their header (fast on large sets; a file that fails to decode later is still
    reported, naming it, when the cache is built); DICOM and NPZ are read. Raises ValueError with a short reason
    (no path) if the file cannot be used.
    """
    p = Path(path)
    try:
        kind = _sniff(p)
        if kind in ("png", "jpeg"):
            from PIL import Image

            try:
                with Image.open(p) as im:
                    w, h = im.size
                    mode = im.mode
            except Exception as e:  # noqa: BLE001 - Pillow raises many types for broken files
                raise Unreadable(f"corrupt {kind.upper()} file: {e}") from e
            return int(h), int(w), 3 if mode in _COLOUR_MODES else 1
        raw = _read_raw(p)
    except Unreadable as e:
        raise ValueError(str(e)) from e
    a = raw.array
    if a.ndim == 2:
        return int(a.shape[0]), int(a.shape[1]), 1
    return int(a.shape[0]), int(a.shape[1]), int(a.shape[2])


def check_image_set(paths: list[Path], labels: list[str], channels: int) -> list[str]:
    """Problems with a set of images that must share one size and the task's channel count.

    `labels` names each image in messages (e.g. "row 3: images/a.png").
    """
    problems: list[str] = []
    ref: tuple[int, int, int] | None = None
    ref_name = ""
    for p, name in zip(paths, labels, strict=True):
        try:
            h, w, c = image_shape(p)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if c != channels:
            kind = {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")
            problems.append(f"{name}: {c} channel(s), the task needs {channels} ({kind})")
            continue
        if ref is None:
            ref, ref_name = (h, w, c), name
        elif (h, w) != ref[:2]:
            problems.append(f"{name}: {h}x{w} pixels, but the first image ({ref_name}) is {ref[0]}x{ref[1]}")
    return problems


MASK_COLUMN = "mask"


def read_labels(path: Path, task: Task, root: Path) -> pd.DataFrame:
    df = read_table(path)
    if task.is_segmentation and "label" not in df.columns and MASK_COLUMN in df.columns:
        # Derived from each mask once the masks are checked (check_masks).
        df["label"] = task.masks.empty_label if task.masks else None
        df.attrs["label_from_mask"] = True
    missing = [c for c in ("image", "label") if c not in df.columns]
    if missing:
        raise BadInput(f"{path}: required column(s) {missing} missing (has {list(df.columns)})")
    if df.empty:
        raise BadInput(f"{path}: no rows")
    problems: list[str] = []
    for col in ("image", "label"):
        bad = df.index[df[col].isna() | (df[col].astype(str).str.strip() == "")]
        for i in bad[:20]:
            problems.append(f"row {_csv_row(i)}: empty {col!r}")
    lab = df["label"].astype(str).str.strip()
    bad = df.index[df["label"].notna() & ~lab.isin(task.classes)]
    for i in bad[:50]:
        problems.append(
            f"row {_csv_row(i)}: label {df.at[i, 'label']!r} is not one of the task's classes {task.classes}"
        )
    if len(bad) > 50:
        problems.append(f"... {len(bad) - 50} more rows with unknown labels")
    if "case_id" in df.columns:
        ids = df["case_id"].astype(str)
        for cid, idx in df.groupby(ids).groups.items():
            if len(idx) > 1:
                problems.append(f"rows {[_csv_row(i) for i in idx][:10]}: duplicate case_id {cid!r}")
    inside = Path(os.path.abspath(root))
    for i, rel in df["image"].items():
        if pd.isna(rel):
            continue
        problems += _path_problems(i, "image", rel, root, inside)
    if problems:
        raise BadInput(f"{path}: {len(problems)} problem(s) in the labels CSV", problems)
    df["label"] = lab
    return df


def _path_problems(i: int, what: str, rel: object, root: Path, inside: Path) -> list[str]:
    p = Path(str(rel))
    p = p if p.is_absolute() else root / p
    # Lexically, not through symlinks: a linked-in image folder is fine, `..` or an absolute path elsewhere is
    # not (a real patient's image must not become a "synthetic" one by a wrong path).
    if not Path(os.path.abspath(p)).is_relative_to(inside):
        return [
            f"row {_csv_row(i)}: {what} {str(rel)!r} is outside --root {root}; synthetic {what}s must lie under it"
        ]
    if not p.is_file():
        return [f"row {_csv_row(i)}: {what} {str(rel)!r} not found under {root}"]
    return []


def check_masks(df: pd.DataFrame, task: Task, root: Path, path: Path) -> list[Path]:
    """A segmentation import's masks: one per row, under --root, not shared, readable, the image's height x width,
    values 0..K, and agreeing with a given label. Returns each row's mask path; sets `label` where the CSV left it
    out. Every problem names its CSV row and file."""
    if MASK_COLUMN not in df.columns:
        raise BadInput(
            f"{path}: column {MASK_COLUMN!r} missing; task {task.name!r} is a segmentation task, so each image "
            "needs its mask (a label map: 0 = background, k = the k-th mask class)"
        )
    problems: list[str] = []
    inside = Path(os.path.abspath(root))
    derived = bool(df.attrs.get("label_from_mask"))
    for i in df.index[df[MASK_COLUMN].isna() | (df[MASK_COLUMN].astype(str).str.strip() == "")][:20]:
        problems.append(f"row {_csv_row(i)}: empty {MASK_COLUMN!r} (every image needs its own mask)")
    has = df[MASK_COLUMN].notna() & (df[MASK_COLUMN].astype(str).str.strip() != "")
    masks = [root / Path(str(r)) if not Path(str(r)).is_absolute() else Path(str(r)) for r in df[MASK_COLUMN]]
    keys = pd.Series([os.path.abspath(m) for m in masks], index=df.index)[has]
    for idx in df[has].groupby(keys).groups.values():
        if len(idx) > 1:
            rows = [_csv_row(i) for i in idx][:10]
            problems.append(
                f"rows {rows}: the same mask {str(df.at[idx[0], MASK_COLUMN])!r} (one mask per image)"
            )
    k = len(task.mask_classes)
    for i, img_rel, mask_rel, mask in zip(df.index, df["image"], df[MASK_COLUMN], masks, strict=True):
        if not has[i]:
            continue
        found = _path_problems(i, "mask", mask_rel, root, inside)
        if found:
            problems += found
            continue
        img = Path(str(img_rel))
        img = img if img.is_absolute() else root / img
        if pd.isna(img_rel) or not img.is_file():
            continue  # the image's own problem is already listed
        try:
            label_map, _ = read_mask(img, mask, task.mask_classes)
        except (Unreadable, ValueError) as e:
            problems.append(f"row {_csv_row(i)}: mask {str(mask_rel)!r}: {e}")
            continue
        implied = task.label_from_mask(mask_areas(label_map, k))
        if derived:
            df.at[i, "label"] = implied
        elif df.at[i, "label"] != implied:
            problems.append(
                f"row {_csv_row(i)}: label {df.at[i, 'label']!r}, but mask {str(mask_rel)!r} implies {implied!r} "
                "(its largest class)"
            )
    if problems:
        raise BadInput(f"{path}: {len(problems)} mask problem(s) under {root}", problems)
    return masks


def training_problems(card: GeneratorCard, task: Task) -> list[str]:
    """What in a card's training data the run would refuse: external sites, or splits other than train."""
    problems = []
    ext = sorted(set(card.training.sites) & set(task.sites.external))
    if ext:
        problems.append(
            f"field 'training.sites': {ext} are the task's external site(s); a generator trained on them makes the "
            "external evaluation meaningless (external sites must stay unseen)"
        )
    bad = sorted(set(card.training.splits) - {"train"})
    if bad:
        problems.append(
            f"field 'training.splits': {bad}; a generator may be trained on the 'train' split only"
        )
    return problems


def _csv_row(i: int) -> int:
    """The 1-based data row number as a spreadsheet shows it (header is row 1)."""
    return int(i) + 2


def import_synthetic(
    task: Task | str | Path,
    root: str | Path,
    labels: str | Path,
    card: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Validate a user's synthetic images and write the synthetic manifest `out` plus `<out stem>.card.yaml`."""
    task = load_task(task)
    root, labels, out = Path(root), Path(labels), Path(out)
    if not Path(card).is_file():
        raise BadInput(
            f"--card {card}: generator card not found; a synthetic set is only auditable with its card"
        )
    c = read_card(card)
    card_problems = training_problems(c, task)
    if card_problems:
        raise BadInput(
            f"--card {card}: the generator card cannot be used with task {task.name!r}", card_problems
        )
    if not root.is_dir():
        raise BadInput(f"--root {root}: not a folder")
    if out.suffix not in (".parquet", ".csv"):
        raise BadInput(f"--out {out}: use a .parquet or .csv file name")
    card_out = out.with_name(out.stem + ".card.yaml")
    if not overwrite:
        for p in (out, card_out):
            if p.exists():
                raise BadInput(f"{p}: already exists (pass --overwrite to replace it)")
    df = read_labels(labels, task, root)
    paths = [p if p.is_absolute() else root / p for p in (Path(str(r)) for r in df["image"])]
    names = [f"row {_csv_row(i)} ({r})" for i, r in zip(df.index, df["image"], strict=True)]
    problems = check_image_set(paths, names, task.image.channels)
    if problems:
        raise BadInput(f"{labels}: {len(problems)} image problem(s) under {root}", problems)
    h, w, _ = image_shape(paths[0])
    masks = check_masks(df, task, root, labels) if task.is_segmentation else None

    gen = c.name
    if "case_id" in df.columns:
        ids = df["case_id"].astype(str).tolist()
    else:
        width = max(6, len(str(len(df))))
        ids = [f"syn-{gen}-{i:0{width}d}" for i in range(len(df))]
    syn = pd.DataFrame(
        {
            "case_id": ids,
            # Each synthetic image is its own unit of resampling: there is no patient behind it.
            "patient_id": ids,
            "image": [str(p.resolve()) for p in paths],
            "label": df["label"].tolist(),
            "site": "synthetic",
        }
    )
    if "sex" in df.columns:
        syn["sex"] = df["sex"].to_numpy()
    if "age" in df.columns:
        age = pd.to_numeric(df["age"], errors="coerce")
        bad = df.index[df["age"].notna() & age.isna()]
        if len(bad):
            raise BadInput(f"{labels}: column 'age': not a number in rows {[_csv_row(i) for i in bad[:20]]}")
        syn["age"] = age.to_numpy()
    syn["origin"], syn["generator"], syn["split"] = "synthetic", gen, "train"
    if masks is not None:
        syn["mask_path"] = [str(p.resolve()) for p in masks]
    syn = task.add_subgroup_columns(syn)
    m = Manifest(syn, "/")
    problems = validate_manifest(m, task, check_images=False)
    if problems:
        raise BadInput(f"{labels}: the synthetic manifest has {len(problems)} problem(s)", problems)

    counts = syn["label"].value_counts()
    raw = c.to_dict()
    raw.update(
        samples_per_class={k: int(counts.get(k, 0)) for k in task.classes},
        n_samples=len(syn),
        image={"height": h, "width": w, "size": h if h == w else None, "channels": task.image.channels},
        task=raw.get("task") or {"name": task.name, "version": task.version},
    )
    if masks is not None:
        raw["masks"] = {
            **(raw.get("masks") or {}),
            "pairs": True,
            "classes": list(task.mask_classes),
            "column": "mask_path",
        }
    updated = GeneratorCard.model_validate(raw)
    if c.samples_per_class and c.samples_per_class != updated.samples_per_class:
        log.warning(
            "card %s: samples_per_class %s replaced by the counts found %s",
            card,
            c.samples_per_class,
            updated.samples_per_class,
        )
    # Card first: a manifest is never left without its card; if the manifest write fails the card is removed.
    write_card(card_out, updated)
    try:
        write_manifest(syn, out)
    except BaseException:
        card_out.unlink(missing_ok=True)
        raise
    return out
