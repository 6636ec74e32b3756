"""Source `ham10000`: the HAM10000 dermatoscopy dataset in its official layout (or the shared sample).

The official release is a metadata table plus images spread over `HAM10000_images_part_1/` and `_part_2/`; mirrors
rearrange the folders, so images are found by `image_id` anywhere under the root. HAM10000 has no patient id: the
lesion (`lesion_id`, several images per lesion) is the closest unit, so it becomes `patient_id` and the task splits
by it.

Options:
  metadata       the metadata file (relative to the root or absolute); default: `HAM10000_metadata.csv` at the root,
                 else the one metadata file found below it
  images         folder to search for images (relative to the root or absolute); default: the root
  allow_missing  drop rows whose image is missing (each is listed in a warning) instead of failing; default false
  cross_site_lesions
                 what to do with a lesion recorded at a training site *and* an external site (a leak between training
                 and external data): `error` (default) stops and names them; `drop` removes every image of such a
                 lesion; `train` keeps only its training-site images; `external` keeps only its external-site images

A lesion recorded at two training sites (the official release has nine, at `vidir_modern` and `vidir_molemax`) or at
two external sites is no leak: it is kept, whole, in one split, and a warning names it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BadInput
from bench.sources import register_source
from bench.tasks import Task

log = logging.getLogger(__name__)

METADATA_NAME = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ["lesion_id", "image_id", "dx", "dataset"]
OPTIONAL_COLUMNS = ["dx_type", "age", "sex", "localization"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
OPTIONS = {"metadata", "images", "allow_missing", "cross_site_lesions", "root"}
CROSS_SITE_MODES = ("error", "drop", "train", "external")

OFFICIAL_METADATA_HINT = (
    "The official metadata (file HAM10000_metadata, with columns lesion_id, image_id, dx, dx_type, age, sex, "
    "localization, dataset) is part of the HAM10000 release on the ISIC archive and on Harvard Dataverse "
    "(doi:10.7910/DVN/DBW86T); use that file, or pass its location with --option metadata=PATH."
)


@register_source("ham10000")
def ham10000_source(task: Task, root: Path, options: dict[str, Any]) -> pd.DataFrame:
    """One row per metadata row: case_id = image_id, patient_id = lesion_id, label = dx, site = dataset."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise BadInput(f"source ham10000: unknown option(s) {unknown} (known: {sorted(OPTIONS - {'root'})})")
    root = Path(root)
    meta_path = _find_metadata(root, options.get("metadata"))
    meta = _read_metadata(meta_path, task)
    meta = _cross_site_lesions(meta, task, meta_path, options.get("cross_site_lesions", "error"))

    search = _resolve(root, options.get("images")) if options.get("images") else root
    if not search.is_dir():
        raise BadInput(f"{search}: image folder (option images) does not exist")
    index = _index_images(search, set(meta["image_id"]))
    found = meta["image_id"].map(index)
    missing = meta.loc[found.isna(), "image_id"].tolist()
    if missing:
        lines = [f"line {ln}: image {iid!r} not found" for ln, iid in _missing_rows(meta, found)]
        if not _as_bool(options.get("allow_missing", False), "allow_missing"):
            head = f"{meta_path}: {len(missing)} of {len(meta)} image(s) in the metadata not found under {search}"
            if len(missing) == len(meta):
                head += " (none at all: is --root the folder that holds the image folders?)"
            head += "; pass --option allow_missing=true to drop them"
            raise BadInput(head, lines)
        log.warning(
            "%s: dropping %d row(s) whose image is missing under %s:\n%s",
            meta_path,
            len(missing),
            search,
            "\n".join(f"  - {m}" for m in lines),
        )
        if len(missing) == len(meta):
            raise BadInput(f"{meta_path}: none of the {len(meta)} images were found under {search}")

    keep = found.notna()
    m = meta.loc[keep]
    out = pd.DataFrame(
        {
            "case_id": m["image_id"].to_numpy(),
            "patient_id": m["lesion_id"].to_numpy(),
            "image": found[keep].to_numpy(),
            "label": m["dx"].to_numpy(),
            "site": m["dataset"].to_numpy(),
            "sex": m["sex"].to_numpy(),
            "age": m["age"].to_numpy(),
            "localization": m["localization"].to_numpy(),
            "dx_type": m["dx_type"].to_numpy(),
        }
    )
    return out.reset_index(drop=True)


def _missing_rows(meta: pd.DataFrame, found: pd.Series) -> list[tuple[int, str]]:
    """(CSV line, image_id) of every row whose image was not found."""
    return [(int(meta.at[i, "_line"]), str(meta.at[i, "image_id"])) for i in meta.index[found.isna()]]


def _resolve(root: Path, p: str | Path) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def _find_metadata(root: Path, option: str | None) -> Path:
    if option:
        p = _resolve(root, option)
        if not p.is_file():
            raise BadInput(f"{p}: metadata file (option metadata) not found")
        return p
    p = root / METADATA_NAME
    if p.is_file():
        return p
    # Mirrors move the table into a subfolder or keep Dataverse's `.tab` name.
    cands = sorted(
        q
        for q in root.rglob("HAM10000_metadata*")
        if q.is_file() and q.suffix.lower() in {".csv", ".tab", ".tsv", ""}
    )
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise BadInput(
            f"{root}: no {METADATA_NAME} found at or below the data root. {OFFICIAL_METADATA_HINT}"
        )
    raise BadInput(
        f"{root}: several metadata files found; choose one with --option metadata=PATH",
        [str(c) for c in cands],
    )


def _read_metadata(path: Path, task: Task) -> pd.DataFrame:
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
        sep = "\t" if "\t" in first and "," not in first else ","
        meta = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise BadInput(f"{path}: cannot be read as a metadata table: {e}") from e
    meta.columns = [str(c).strip().strip('"') for c in meta.columns]
    if "dataset" not in meta.columns:
        raise BadInput(
            f"{path}: column 'dataset' is missing. It names the site each image comes from (vidir_modern, "
            "vidir_molemax, rosendahl, vienna_dias); the task needs it to hold sites out as external test sets, so "
            f"a metadata file without it (as some mirrors ship) cannot be used. {OFFICIAL_METADATA_HINT}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise BadInput(
            f"{path}: required column(s) {missing} missing (found: {list(meta.columns)}). {OFFICIAL_METADATA_HINT}"
        )
    if meta.empty:
        raise BadInput(f"{path}: the metadata table has a header but no rows")
    for c in OPTIONAL_COLUMNS:
        if c not in meta.columns:
            log.warning("%s: column %r missing; every row gets an unknown %s", path, c, c)
            meta[c] = None
    for c in REQUIRED_COLUMNS + ["sex", "localization", "dx_type"]:
        meta[c] = meta[c].map(lambda v: v.strip() if isinstance(v, str) else v)
    meta["sex"] = meta["sex"].map(lambda v: v.lower() if isinstance(v, str) and v else "unknown")

    problems: list[str] = []
    for c in REQUIRED_COLUMNS:
        bad = meta.index[meta[c].isna() | (meta[c] == "")]
        if len(bad):
            problems.append(f"column {c!r}: empty on {_lines(bad)}")
    dup = meta["image_id"].dropna()
    dup = dup[dup.duplicated(keep=False)]
    for iid, idx in dup.groupby(dup).groups.items():
        problems.append(f"column 'image_id': {iid!r} appears on {_lines(idx)}")
    bad = meta.index[meta["dx"].notna() & ~meta["dx"].isin(task.classes)]
    if len(bad):
        vals = sorted(set(meta.loc[bad, "dx"]))
        problems.append(f"column 'dx': {vals} not among the task's classes {task.classes} ({_lines(bad)})")
    bad = meta.index[meta["dataset"].notna() & ~meta["dataset"].isin(task.all_sites)]
    if len(bad):
        vals = sorted(set(meta.loc[bad, "dataset"]))
        problems.append(
            f"column 'dataset': {vals} not among the task's sites {task.all_sites} ({_lines(bad)})"
        )
    age = pd.to_numeric(meta["age"], errors="coerce")
    bad = meta.index[age.isna() & meta["age"].notna() & (meta["age"].astype(str).str.strip() != "")]
    if len(bad):
        problems.append(f"column 'age': not a number on {_lines(bad)}")
    meta["age"] = age
    if problems:
        raise BadInput(f"{path}: {len(problems)} problem(s) in the metadata", problems)
    meta["_line"] = meta.index + 2
    return meta.reset_index(drop=True)


def _cross_site_lesions(meta: pd.DataFrame, task: Task, path: Path, mode: Any) -> pd.DataFrame:
    """Apply the lesion-site rule: the lesion is the splitting unit, so a lesion seen at a training and an
    external site would put the same lesion in training and in the external test; within one side it is harmless."""
    if mode not in CROSS_SITE_MODES:
        raise BadInput(
            f"source option 'cross_site_lesions': expected one of {list(CROSS_SITE_MODES)}, got {mode!r}"
        )
    train, external = set(task.sites.train), set(task.sites.external)
    sites = meta.groupby("lesion_id")["dataset"].agg(lambda s: sorted(set(s)))
    multi = sites[sites.map(len) > 1]
    if multi.empty:
        return meta
    leaks = multi[multi.map(lambda ss: bool(set(ss) & train) and bool(set(ss) & external))]
    harmless = multi.drop(leaks.index)
    if len(harmless):
        log.warning(
            "%s: %d lesion(s) recorded at two sites on the same side (kept, each whole in one split):\n%s",
            path,
            len(harmless),
            "\n".join(
                f"  - {lid}: {', '.join(ss)} ({_lesion_lines(meta, lid)})" for lid, ss in harmless.items()
            ),
        )
    if leaks.empty:
        return meta
    described = [
        f"lesion {lid!r} is recorded at training and external sites {ss} ({_lesion_lines(meta, lid)})"
        for lid, ss in leaks.items()
    ]
    if mode == "error":
        raise BadInput(
            f"{path}: {len(leaks)} lesion(s) recorded at several sites, at a training and an external site: its "
            "images would be in training and in the external test. Pass --option cross_site_lesions=drop (remove "
            "such lesions), =train (keep their training-site images) or =external (keep their external-site images)",
            described,
        )
    in_leak = meta["lesion_id"].isin(leaks.index)
    if mode == "drop":
        remove = in_leak
    elif mode == "train":
        remove = in_leak & meta["dataset"].isin(external)
    else:
        remove = in_leak & meta["dataset"].isin(train)
    log.warning(
        "%s: cross_site_lesions=%s: %d image(s) of %d lesion(s) at training and external sites removed:\n%s",
        path,
        mode,
        int(remove.sum()),
        len(leaks),
        "\n".join(f"  - {d}" for d in described),
    )
    return meta.loc[~remove].reset_index(drop=True)


def _lesion_lines(meta: pd.DataFrame, lesion_id: str) -> str:
    lines = [int(x) for x in meta.loc[meta["lesion_id"] == lesion_id, "_line"]]
    return ("line " if len(lines) == 1 else "lines ") + ", ".join(map(str, lines))


def _index_images(search: Path, wanted: set[str]) -> dict[str, str]:
    """image_id -> absolute path, from one walk of the folder tree."""
    paths: dict[str, list[Path]] = {}
    for p in _walk_files(search):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in wanted and not p.name.startswith("."):
            paths.setdefault(p.stem, []).append(p)
    index: dict[str, str] = {}
    ambiguous: list[str] = []
    for stem, ps in paths.items():
        ps = sorted(ps)
        # Some mirrors ship the same folders twice under different case; identical copies are harmless.
        if len({q.stat().st_size for q in ps}) > 1:
            ambiguous.append(f"{stem}: {', '.join(str(q) for q in ps)}")
        index[stem] = str(ps[0].resolve())
    if ambiguous:
        raise BadInput(
            f"{search}: {len(ambiguous)} image id(s) match several different files; point --option images=FOLDER "
            "at one copy of the images",
            ambiguous,
        )
    return index


def _walk_files(top: Path) -> list[Path]:
    """Every file below `top`, following symlinked folders (data folders are often linked in) but never twice."""
    seen: set[str] = set()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames]
    return out


def _as_bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in {"true", "false", "yes", "no", "1", "0"}:
        return v.lower() in {"true", "yes", "1"}
    raise BadInput(f"source option {name!r}: expected true or false, got {v!r}")


def _lines(idx, limit: int = 20) -> str:
    """CSV line numbers (header = line 1) of 0-based data rows."""
    idx = [int(i) + 2 for i in idx]
    s = ("line " if len(idx) == 1 else "lines ") + ", ".join(str(i) for i in idx[:limit])
    return s + (f", ... ({len(idx)} lines)" if len(idx) > limit else "")
