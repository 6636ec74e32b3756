"""`generate`: train a registered generator on the real training rows and write a synthetic set.

Output folder (written atomically: it appears complete or not at all):

```
OUT/images/<case_id>.png    8-bit, the task's channel count, at the generator's working size
OUT/manifest.parquet        the synthetic manifest (origin=synthetic, site=synthetic, split=train)
OUT/train_manifest.parquet  the exact real rows the generator was trained on
OUT/card.yaml               the generator card (see bench.generators.card)
OUT/masks/<case_id>.png     segmentation task only: the image's label map (8-bit, 0 = background, k = the k-th
                            mask class), named by the manifest's `mask_path` column
```

A segmentation task's generator learns from image–mask pairs and samples pairs (`Generator.fit_pairs` /
`sample_pairs`; a generator without them is refused). Every synthetic image gets a mask file, an empty one included,
and its `label` is what its mask implies (`Task.label_from_mask`), so the set reads back exactly like real pairs.

Training rows are the real manifest's `split == "train"` rows of the task's training sites, nothing else.
`only={"sex": "M"}` restricts *training* to that subgroup as well as the metadata of the synthetic rows: the
generators are conditioned on class only, so a generator trained on everyone would draw images of every subgroup
and merely label them "M". Training on the subgroup is what makes a set that really under-represents the others.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.generators.base import get_generator, list_generators
from bench.generators.card import CARD_FILE, GeneratorCard, hash_id, write_card
from bench.imaging import build_cache, mask_areas
from bench.io import atomic_dir
from bench.manifest import Manifest, load_valid_manifest, manifest_hash, read_manifest, write_manifest
from bench.tasks import Task, load_task
from bench.threads import threads_per_process, torch_threads

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
TRAIN_MANIFEST_FILE = "train_manifest.parquet"


def parse_only(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise BadInput(f"--only {item!r}: expected COLUMN=VALUE, e.g. sex=M")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def training_rows(
    m: Manifest, task: Task, only: dict[str, str] | None = None, split: str = "train"
) -> pd.DataFrame:
    """The real rows a generator may learn from: `split` (train; reserve for the positive control), a training
    site, origin real, `only` applied."""
    df = m.df
    keep = (df["split"] == split) & df["site"].isin(task.sites.train) & (df["origin"] == "real")
    rows = df[keep]
    for col, val in (only or {}).items():
        if col not in rows.columns:
            raise BadInput(
                f"--only {col}={val}: the real manifest has no column {col!r} (columns: {list(df.columns)})"
            )
        rows = rows[rows[col].astype(str) == val]
    if rows.empty:
        extra = f" with {only}" if only else ""
        if split == "reserve":
            raise BadInput(
                f"{m.path}: no reserve rows (split 'reserve', sites {task.sites.train}){extra}; the positive "
                f"control needs a task with `splits.reserve` > 0 (task {task.name!r} has "
                f"{task.splits.reserve:g}) and a manifest built with it"
            )
        raise BadInput(f"{m.path}: no real training rows (split 'train', sites {task.sites.train}){extra}")
    return rows.reset_index(drop=True)


def class_counts(
    train_labels: pd.Series, classes: list[str], n: int | None = None, per_class: int | None = None
) -> dict[str, int]:
    """Samples per class: the training distribution (default), scaled to `n` by largest remainder, or fixed."""
    counts = train_labels.value_counts()
    base = {c: int(counts.get(c, 0)) for c in classes}
    if n is not None and per_class is not None:
        raise BadInput("--n and --per-class: give one of them")
    if per_class is not None:
        if per_class < 1:
            raise BadInput(f"--per-class {per_class}: must be at least 1")
        return {c: int(per_class) for c in classes}
    if n is None:
        return base
    if n < 1:
        raise BadInput(f"--n {n}: must be at least 1")
    total = sum(base.values())
    exact = {c: n * base[c] / total for c in classes}
    out = {c: int(np.floor(v)) for c, v in exact.items()}
    # Largest remainders get the leftover samples; ties broken by class order for determinism.
    order = sorted(classes, key=lambda c: (-(exact[c] - out[c]), classes.index(c)))
    for c in order[: n - sum(out.values())]:
        out[c] += 1
    return out


def _metadata_columns(task: Task, df: pd.DataFrame) -> list[str]:
    cols = [c for c in ("sex", "age") if c in df.columns]
    for c in task.subgroups.columns:
        if c in df.columns and c not in cols and c not in ("age_group", "site"):
            cols.append(c)
    return cols


def load_pixels(m: Manifest, task: Task, size: int, cache_dir: Path | None = None) -> np.ndarray:
    """uint8 `[N, C, S, S]` in the manifest's row order, through the shared image cache."""
    return load_pairs(m, task, size, cache_dir)[0]


def load_pairs(
    m: Manifest, task: Task, size: int, cache_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images uint8 `[N, C, S, S]` and, for a segmentation task, label maps uint8 `[N, S, S]` (else None), in the
    manifest's row order, through the shared image cache."""
    cache = build_cache(m, task, size=int(size), cache_dir=cache_dir, progress=False)
    rows = cache.rows(m.df["case_id"].astype(str))
    masks = np.ascontiguousarray(cache.masks[rows]) if cache.masks is not None else None
    return np.ascontiguousarray(cache.images[rows]), masks


def mask_labels(masks: np.ndarray, task: Task) -> np.ndarray:
    """The label index each label map implies (the task's `label_from_mask`)."""
    k = len(task.mask_classes)
    return np.array(
        [task.classes.index(task.label_from_mask(mask_areas(mk, k))) for mk in masks], dtype=np.int64
    )


def _check_pairs(
    generator: str, images: np.ndarray, masks: np.ndarray, n: int, task: Task, size: int
) -> None:
    k = len(task.mask_classes)
    if masks.shape != (n, size, size) or masks.dtype != np.uint8:
        raise RuntimeError(
            f"{generator}: sampled masks {masks.shape} {masks.dtype}, expected uint8 {(n, size, size)}"
        )
    if masks.size and int(masks.max()) > k:
        raise RuntimeError(
            f"{generator}: sampled mask values up to {int(masks.max())}, the task has {k} mask classes"
        )


def _mask_info(task: Task, gen: Any, counts: dict[str, int], masks: np.ndarray) -> dict[str, Any]:
    """What the card says about a set of pairs: the mask classes, the file format, how masks were made, what was
    asked for per class (samples_per_class holds what the masks show) and how many masks are empty."""
    return {
        "pairs": True,
        "classes": list(task.mask_classes),
        "format": "png label map (0 = background, k = the k-th mask class)",
        "column": "mask_path",
        "method": str(getattr(gen, "mask_method", "")) or None,
        "requested_per_class": {c: int(k) for c, k in counts.items()},
        "n_empty": int(sum(not mk.any() for mk in masks)),
    }


def _describe(cls: type) -> str:
    doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _fitted(gen: Any, task: Task) -> Any:
    """What the generator learned, as it reports it; per-class entries keyed by class name, not index."""
    f = gen.fitted_
    if isinstance(f, dict) and f and all(str(k).isdigit() and int(k) < len(task.classes) for k in f):
        return {task.classes[int(k)]: v for k, v in f.items()}
    return f


def _pair_support(cls: type, generator: str, task: Task) -> None:
    if not cls.supports(task.kind):
        kinds = " and ".join(cls.task_kinds)
        if task.is_segmentation:
            why = "it does not produce image–mask pairs"
        else:
            why = f"it serves {kinds} tasks only"
        raise BadInput(
            f"--generator {generator}: task {task.name!r} is a {task.kind} task and {why} (generators for "
            f"{task.kind}: {', '.join(n for n in list_generators() if get_generator(n).supports(task.kind))})"
        )


def _save_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    if img.shape[0] == 1:
        Image.fromarray(np.ascontiguousarray(img[0])).save(path)
    else:
        Image.fromarray(np.ascontiguousarray(np.moveaxis(img, 0, -1))).save(path)


def generate(
    task: Task | str | Path,
    generator: str,
    real: str | Path,
    out: str | Path,
    *,
    n: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    size: int | None = None,
    preset: str | None = None,
    only: dict[str, str] | None = None,
    config: str | dict[str, Any] | None = None,
    device: str | None = None,
    overwrite: bool = False,
    cache_dir: Path | None = None,
    threads: int | None = None,
) -> Path:
    """Train `generator` on the real training rows of `real` and write the synthetic set to `out`.

    `threads`: CPU threads for a torch generator (default: every core this process may use)."""
    task = load_task(task)
    out = Path(out)
    if out.exists() and not overwrite:
        raise BadInput(f"--out {out}: already exists (pass --overwrite to replace it)")
    if size is not None and preset is not None:
        raise BadInput("--size and --preset: give one of them")
    cls = get_generator(generator)
    _pair_support(cls, generator, task)
    gen = cls(config=config, seed=seed, device=device)
    if size is None:
        size = task.image.size_for(preset) if preset else gen.default_size(task.image.size)
    if int(size) < 8:
        raise BadInput(f"--size {size}: must be at least 8 pixels")
    if threads is not None and threads < 1:
        raise BadInput(f"--threads {threads}: must be at least 1")
    n_threads = int(threads or threads_per_process(1))

    m = load_valid_manifest(real, task)
    only = dict(only or {})
    rows = training_rows(m, task, only, cls.source_split)
    if cls.source_split != "train" and n is None and per_class is None:
        # Sizes matched: as many images as the real training set, in the pool's class proportions (the pool is
        # drawn without replacement first, then the shortfall with replacement).
        n = len(training_rows(m, task, only))
    counts = class_counts(rows["label"], task.classes, n, per_class)
    have = rows["label"].value_counts()
    short = [f"{c} ({int(have.get(c, 0))})" for c, k in counts.items() if k > 0 and have.get(c, 0) < 2]
    if short:
        raise BadInput(
            f"{real}: classes with fewer than 2 training images{' in ' + str(only) if only else ''}: {short}; "
            "a generator cannot learn a class from one image without copying it"
        )
    train_m = Manifest(rows, m.root, m.path)
    x, x_masks = load_pairs(train_m, task, int(size), cache_dir)
    y = rows["label"].map({c: i for i, c in enumerate(task.classes)}).to_numpy(np.int64)
    log.info(
        "%s: training on %d images (%d patients) at %d px%s",
        generator,
        len(x),
        rows["patient_id"].nunique(),
        size,
        f", {n_threads} CPU thread(s)" if gen.uses_torch else "",
    )
    n_mask = len(task.mask_classes)
    gen.patients = rows["patient_id"].astype(str).to_numpy()
    with torch_threads(n_threads) if gen.uses_torch else contextlib.nullcontext(n_threads):
        if x_masks is not None:
            gen.fit_pairs(x, x_masks, y, len(task.classes), n_mask)
        else:
            gen.fit(x, y, len(task.classes))

    labels = np.concatenate([np.full(k, task.classes.index(c), dtype=np.int64) for c, k in counts.items()])
    rng = np.random.default_rng(seed + 7919)
    labels = labels[rng.permutation(len(labels))]
    masks = None
    with torch_threads(n_threads) if gen.uses_torch else contextlib.nullcontext(n_threads):
        if x_masks is not None:
            images, masks = gen.sample_pairs(labels)
        else:
            images = gen.sample(labels)
    if images.shape != (len(labels), task.image.channels, int(size), int(size)) or images.dtype != np.uint8:
        raise RuntimeError(
            f"{generator}: sampled {images.shape} {images.dtype}, expected uint8 {len(labels)} images"
        )
    requested = labels
    if masks is not None:
        _check_pairs(generator, images, masks, len(labels), task, int(size))
        # A pair is labelled by what its mask shows, as a real image is; the class asked for only steered sampling.
        labels = mask_labels(masks, task)

    meta_cols = _metadata_columns(task, rows)
    # Metadata (sex, age, ...) is drawn jointly from a random training row of the same class, so subgroup columns
    # follow the training distribution within each class.
    donors = np.empty(len(labels), dtype=np.int64)
    have_rows = rows["label"].to_numpy()
    for ci, c in enumerate(task.classes):
        where = np.flatnonzero(labels == ci)
        if len(where):
            pool = np.flatnonzero(have_rows == c)
            if len(pool) == 0:
                # A pair whose mask shows a class no training image has: metadata of the class it was asked for.
                donors[where] = [
                    rng.choice(np.flatnonzero(have_rows == task.classes[requested[i]])) for i in where
                ]
            else:
                donors[where] = rng.choice(pool, size=len(where))
    width = max(6, len(str(len(labels))))
    ids = [f"syn-{generator}-{i:0{width}d}" for i in range(len(labels))]
    syn = pd.DataFrame(
        {
            "case_id": ids,
            "patient_id": ids,
            "image": [f"images/{cid}.png" for cid in ids],
            "label": [task.classes[int(li)] for li in labels],
            "site": "synthetic",
        }
    )
    for col in meta_cols:
        syn[col] = rows[col].to_numpy()[donors]
    syn["origin"], syn["generator"], syn["split"] = "synthetic", generator, "train"
    if masks is not None:
        syn["mask_path"] = [f"masks/{cid}.png" for cid in ids]
    syn = task.add_subgroup_columns(syn)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        for rel, img in zip(syn["image"], images, strict=True):
            _save_png(tmp / rel, img)
        if masks is not None:
            (tmp / "masks").mkdir()
            for rel, mk in zip(syn["mask_path"], masks, strict=True):
                _save_png(tmp / rel, mk[None])
        write_manifest(syn, tmp / MANIFEST_FILE)
        tr = rows.copy()
        tr["image"] = [str(p) for p in train_m.image_paths()]
        if "mask_path" in tr.columns:
            tr["mask_path"] = [
                str(train_m.image_path(v)) if isinstance(v, str) else None for v in tr["mask_path"]
            ]
        write_manifest(tr, tmp / TRAIN_MANIFEST_FILE)
        # The hash is of the training manifest as written (image paths relative to it), which is what the privacy
        # audit is given and checks.
        written = read_manifest(tmp / TRAIN_MANIFEST_FILE).df
        card = GeneratorCard(
            name=generator,
            version=cls.version,
            description=_describe(cls),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            seed=int(seed),
            task={"name": task.name, "version": task.version},
            samples_per_class=(
                {c: int(k) for c, k in counts.items()}
                if masks is None
                else {c: int(np.sum(labels == i)) for i, c in enumerate(task.classes)}
            ),
            n_samples=int(len(labels)),
            image={"size": int(size), "channels": int(task.image.channels), "format": "png"},
            masks=None if masks is None else _mask_info(task, gen, counts, masks),
            only=only or None,
            training={
                "manifest_sha256": manifest_hash(written),
                "manifest": TRAIN_MANIFEST_FILE,
                "sites": sorted(set(rows["site"].astype(str))),
                "patients": sorted({hash_id(p) for p in rows["patient_id"]}),
                "n_images": int(len(rows)),
                "n_patients": int(rows["patient_id"].nunique()),
                "splits": [cls.source_split],
            },
            control=cls.control.to_dict() if cls.control is not None else None,
            config={
                **gen.config,
                **({"fitted": _fitted(gen, task)} if getattr(gen, "fitted_", None) else {}),
            },
        )
        write_card(tmp / CARD_FILE, card)
    log.info(
        "wrote %s: %d synthetic images (%s)",
        out,
        len(labels),
        ", ".join(f"{c}={k}" for c, k in counts.items()),
    )
    return out
