"""Source `medmnist`: a MedMNIST (v2 or MedMNIST+) `.npz` file as the official release ships it.

One file holds every image and label of the dataset under the keys `train_images`, `train_labels`, `val_images`,
`val_labels`, `test_images`, `test_labels`; images are uint8 `(N, H, W)` (gray) or `(N, H, W, 3)` (RGB), labels
`(N, 1)` class indices. The official split of each image is kept in the column `official_split`, which the
MedMNIST tasks name as their `splits.from_column`, so results refer to the splits papers report on.

The images stay in the file: the manifest's `image` column points into it as `FILE.npz#SPLIT/INDEX` (read by
`bench.imaging`). MedMNIST carries no patient id, no site, no sex and no age: every image is its own patient (so
patient-level leakage cannot be checked), every image has one site, and `sex`/`age` are unknown.

Options:
  file  the .npz file (relative to the root or absolute); the MedMNIST tasks name theirs (e.g.
        `pneumoniamnist.npz`); where that is missing, the one `<name>_<size>.npz` (MedMNIST+) at the root is used.
        Without the option, the one .npz at the root. The root may also be the .npz file itself.
  site  the site every image gets; default: the task's only training site
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.imaging import member_path
from bench.sources import register_source
from bench.tasks import Task

log = logging.getLogger(__name__)

OPTIONS = {"file", "site", "root"}
SPLITS = ("train", "val", "test")
SPLIT_COLUMN = "official_split"
DOWNLOAD_HINT = (
    "MedMNIST files are distributed on Zenodo (doi:10.5281/zenodo.10519652) and by `pip install medmnist`; "
    "download the .npz file and pass its folder with --root (or the file itself)."
)


@register_source("medmnist")
def medmnist_source(task: Task, root: Path, options: dict[str, Any]) -> pd.DataFrame:
    """One row per image of the three official splits: case_id `<split>-<index>`, patient_id = case_id."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise BadInput(f"source medmnist: unknown option(s) {unknown} (known: {sorted(OPTIONS - {'root'})})")
    path = find_npz(Path(root), options.get("file"))
    site = options.get("site")
    if site is None:
        if len(task.sites.train) != 1:
            raise BadInput(
                f"source medmnist: the task has training sites {task.sites.train}; name the site with "
                "--option site=NAME"
            )
        site = task.sites.train[0]
    site = str(site)
    if site not in task.all_sites:
        raise BadInput(
            f"source medmnist: option site {site!r} is not among the task's sites {task.all_sites}"
        )

    shapes = _array_shapes(path)
    labels = _read_labels(path, shapes)
    problems: list[str] = []
    for split in SPLITS:
        key = f"{split}_images"
        if key not in shapes:
            problems.append(f"array {key!r} is missing")
            continue
        shape, dtype = shapes[key]
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
            problems.append(f"array {key!r}: shape {shape} is neither (N, H, W) nor (N, H, W, 3)")
        if split in labels and shape and shape[0] != len(labels[split]):
            problems.append(
                f"array {key!r} holds {shape[0]} images but {split}_labels {len(labels[split])} labels"
            )
        channels = 3 if len(shape) == 4 and shape[-1] == 3 else 1
        if len(shape) in (3, 4) and channels != task.image.channels:
            kind = {1: "grayscale", 3: "RGB"}[channels]
            problems.append(
                f"array {key!r}: {kind} images, but the task reads {task.image.channels} channel(s); is this the "
                "file of another MedMNIST dataset?"
            )
        if dtype != np.uint8:
            log.warning("%s: %s is %s, not uint8 as in the official release", path, key, dtype)
    for split, lab in labels.items():
        bad = np.flatnonzero((lab < 0) | (lab >= len(task.classes)))
        if len(bad):
            problems.append(
                f"array '{split}_labels': values {sorted(set(lab[bad].tolist()))[:10]} at indices "
                f"{bad[:10].tolist()} are not class indices 0..{len(task.classes) - 1} of {task.classes}"
            )
    if problems:
        raise BadInput(f"{path}: not a MedMNIST file the task {task.name!r} can read", problems)

    frames = []
    npz = str(path.resolve())
    for split in SPLITS:
        lab = labels[split]
        ids = [f"{split}-{i:06d}" for i in range(len(lab))]
        frames.append(
            pd.DataFrame(
                {
                    "case_id": ids,
                    "patient_id": ids,
                    "image": [member_path(npz, split, i) for i in range(len(lab))],
                    "label": [task.classes[int(k)] for k in lab],
                    "site": site,
                    SPLIT_COLUMN: split,
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    if out.empty:
        raise BadInput(f"{path}: the file holds no images")
    return out


def find_npz(root: Path, option: Any) -> Path:
    """The .npz file: the option, the root itself, or the one MedMNIST file at the root."""
    if root.is_file():
        # The file given as --root wins over the task's default file name (it may be a MedMNIST+ size variant).
        return root
    if option:
        q = Path(str(option)).expanduser()
        p = q if q.is_absolute() else root / q
        if p.is_file():
            return p
        # MedMNIST+ names the larger images `<name>_64.npz` ... `<name>_224.npz`.
        cands = sorted(root.glob(f"{p.stem}_*.npz")) if not q.is_absolute() and p.suffix == ".npz" else []
        if len(cands) == 1:
            log.info("using %s (MedMNIST+ size variant of %s)", cands[0], p.name)
            return cands[0]
        if cands:
            raise BadInput(
                f"{root}: several size variants of {p.name}; choose one with --option file=NAME",
                [c.name for c in cands],
            )
        raise BadInput(f"{p}: MedMNIST file not found. {DOWNLOAD_HINT}")
    cands = sorted(root.glob("*.npz"))
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise BadInput(f"{root}: no .npz file. {DOWNLOAD_HINT}")
    raise BadInput(f"{root}: several .npz files; choose one with --option file=NAME", [c.name for c in cands])


def _array_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array, from the .npy headers alone (the image arrays are not decompressed)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                out[name[: -len(".npy")]] = (tuple(int(x) for x in shape), np.dtype(dtype))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise BadInput(f"{path}: cannot be read as an .npz file: {e}") from e
    return out


def _read_labels(path: Path, shapes: dict) -> dict[str, np.ndarray]:
    missing = [f"{s}_labels" for s in SPLITS if f"{s}_labels" not in shapes]
    if missing:
        raise BadInput(
            f"{path}: array(s) {missing} missing (found: {sorted(shapes)}); a MedMNIST file has train_images, "
            f"train_labels, val_images, val_labels, test_images and test_labels. {DOWNLOAD_HINT}"
        )
    out = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for split in SPLITS:
                lab = np.asarray(z[f"{split}_labels"])
                if lab.ndim == 2 and lab.shape[1] != 1:
                    raise BadInput(
                        f"{path}: {split}_labels has shape {lab.shape}: a multi-label dataset (such as ChestMNIST) "
                        "does not fit a single-label task"
                    )
                integral = np.issubdtype(lab.dtype, np.integer) or (
                    np.issubdtype(lab.dtype, np.floating) and bool(np.all(lab == np.round(lab)))
                )
                if lab.ndim not in (1, 2) or not integral:
                    raise BadInput(f"{path}: {split}_labels ({lab.shape}, {lab.dtype}) are not class indices")
                out[split] = lab.reshape(-1).astype(np.int64)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise BadInput(f"{path}: cannot be read as an .npz file: {e}") from e
    return out
