"""The on-disk image cache every epoch reads from: decode each manifest image once, keyed by content."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BadInput
from bench.imaging.decode import (
    FORMAT_VERSION,
    MEMBER_SEP,
    PreprocessSpec,
    Unreadable,
    _load,
    load_image,
    npz_member,
)
from bench.imaging.masks import preprocess_mask, read_mask
from bench.io import cache_dir

log = logging.getLogger(__name__)

_PROBE = 16  # images decoded before deciding whether worker processes pay off
_PARALLEL_MIN_S = 3.0  # estimated serial seconds above which they do (a worker starts in about a second)
_CHUNK = 64
_STALE_TMP_S = 24 * 3600
# Bump whenever a change could change a cached label map.
MASK_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------------------
# The cache


def default_cache_dir() -> Path:
    return cache_dir()


class ImageCache:
    """A built cache: `images` uint8 [N, C, S, S] (memory-mapped), `case_ids`, `skipped` (image, reason); for a
    segmentation task also `masks` uint8 [N, S, S], each image's label map preprocessed like it (else None)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = json.loads((self.path / "index.json").read_text(encoding="utf-8"))
        self.index = index
        self.case_ids: list[str] = list(index["case_ids"])
        self.skipped: list[tuple[str, str]] = [(str(a), str(b)) for a, b in index["skipped"]]
        self.spec = PreprocessSpec(**index["spec"])
        self.images: np.ndarray = np.load(self.path / "images.npy", mmap_mode="r")
        n, c, s = len(self.case_ids), self.spec.channels, self.spec.size
        if self.images.shape != (n, c, s, s) or self.images.dtype != np.uint8:
            raise ValueError(
                f"{self.path}: images {self.images.shape} {self.images.dtype} != index ({n}, {c}, {s}, {s})"
            )
        self.masks: np.ndarray | None = None
        if (self.path / "masks.npy").exists():
            self.masks = np.load(self.path / "masks.npy", mmap_mode="r")
            if self.masks.shape != (n, s, s) or self.masks.dtype != np.uint8:
                raise ValueError(
                    f"{self.path}: masks {self.masks.shape} {self.masks.dtype} != ({n}, {s}, {s})"
                )
        elif index.get("mask_classes"):
            raise ValueError(f"{self.path}: the index names mask classes but masks.npy is missing")
        self._pos = {cid: i for i, cid in enumerate(self.case_ids)}

    def __len__(self) -> int:
        return len(self.case_ids)

    def __repr__(self) -> str:
        return f"ImageCache({self.path}, n={len(self)}, shape={tuple(self.images.shape)}, skipped={len(self.skipped)})"

    def contains(self, case_ids: Iterable[str]) -> np.ndarray:
        """Boolean mask: which of these case ids have an image in the cache."""
        return np.array([str(c) in self._pos for c in case_ids], dtype=bool)

    def rows(self, case_ids: Iterable[str]) -> np.ndarray:
        """Positions in `images` of these case ids (in their order). Unknown ids raise UnknownCase."""
        ids = [str(c) for c in case_ids]
        missing = [c for c in ids if c not in self._pos]
        if missing:
            skipped = f" ({len(self.skipped)} image(s) were skipped as unreadable)" if self.skipped else ""
            raise UnknownCase(
                f"{len(missing)} case id(s) not in the image cache {self.path}{skipped}: {missing[:10]}"
            )
        return np.fromiter((self._pos[c] for c in ids), dtype=np.int64, count=len(ids))

    def load(self) -> np.ndarray:
        """The whole array in memory (what a training loop wants for fast random batches)."""
        return np.ascontiguousarray(self.images)


class UnknownCase(BadInput, KeyError):
    """A case id with no image in the cache (also a KeyError, as a lookup failure)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return BadInput.__str__(self)


def cache_key(manifest: Any, spec: PreprocessSpec, mask_classes: Sequence[str] | None = None) -> str:
    """sha256 of the manifest's content and image files (path, size, mtime), the spec and the format version; with
    `mask_classes` (a segmentation task) also of the classes and every mask file."""
    h = hashlib.sha256()
    h.update(f"medsynbench-image-cache\n{FORMAT_VERSION}\n{manifest.sha256}\n{spec.key()}\n".encode())
    for p in manifest.image_paths():
        member = npz_member(p)
        try:
            st = (member[0] if member else p).stat()
            h.update(f"{p}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\x1fmissing\n".encode())
    if mask_classes:
        h.update(f"masks {MASK_FORMAT_VERSION}\x1f{json.dumps(list(mask_classes))}\n".encode())
        for q in mask_paths(manifest):
            try:
                st = q.stat() if q is not None else None
                h.update(f"{q}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode() if st else b"-\n")
            except OSError:
                h.update(f"{q}\x1fmissing\n".encode())
    return h.hexdigest()


def mask_paths(manifest: Any) -> list[Path | None]:
    """Each row's mask file (`mask_path`, relative to the manifest's folder unless absolute), None where empty."""
    if "mask_path" not in manifest.df.columns:
        return [None] * len(manifest.df)
    out: list[Path | None] = []
    for v in manifest.df["mask_path"]:
        if v is None or (isinstance(v, float) and np.isnan(v)) or not str(v).strip():
            out.append(None)
        else:
            out.append(manifest.image_path(str(v)))
    return out


def _mask_classes(task: Any, manifest: Any) -> list[str] | None:
    if getattr(task, "kind", "classification") != "segmentation":
        return None
    if "mask_path" not in manifest.df.columns:
        where = manifest.path or manifest.root
        raise BadInput(f"{where}: column 'mask_path' is missing (task {task.name!r} is a segmentation task)")
    return list(task.mask_classes)


def _decode_masks(
    manifest: Any, spec: PreprocessSpec, classes: list[str], masks: np.ndarray, ok: np.ndarray, reasons: dict
) -> None:
    """Fill `masks` for every row whose image decoded; a mask that cannot be used marks its row unreadable."""
    images = manifest.image_paths()
    rels = manifest.df["mask_path"].tolist()
    masks_of = mask_paths(manifest)
    # Rows of one SEG one after another: each SEG file is then decoded once (read_seg keeps a few).
    for i in sorted(range(len(images)), key=lambda k: str(masks_of[k] or "")):
        img, mask = images[i], masks_of[i]
        if not ok[i]:
            continue
        try:
            label, grid = read_mask(img, mask, classes)
            masks[i] = preprocess_mask(label, grid, spec)
        except Unreadable as e:
            reasons[i] = f"mask {rels[i]!s}: {e}"
            ok[i] = False


def _decode_chunk(
    items: Sequence[tuple[int, str]], spec: PreprocessSpec
) -> list[tuple[int, np.ndarray | None, str]]:
    out = []
    for i, p in items:
        try:
            out.append((i, _load(Path(p), spec), ""))
        except Unreadable as e:
            out.append((i, None, str(e)))
    return out


def _decode_serial(items: Sequence[tuple[int, str]], spec: PreprocessSpec):
    # Through the public `load_image`, so a test (or a profiler) can observe every decode.
    for i, p in items:
        try:
            yield i, load_image(p, spec), ""
        except BadInput as e:
            reason = str(e)
            prefix = f"{p}: "
            yield i, None, reason[len(prefix) :] if reason.startswith(prefix) else reason


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _clean_stale(root: Path) -> None:
    # Temporary folders of builders that died (killed, power loss) are never renamed into place.
    now = time.time()
    for d in root.glob(".building-*"):
        with contextlib.suppress(OSError):
            if now - d.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(d, ignore_errors=True)


def _open_existing(final: Path) -> ImageCache | None:
    if not (final / "index.json").exists():
        return None
    try:
        return ImageCache(final)
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        log.warning("image cache %s is damaged (%s); rebuilding it", final, e)
        return None


def _check_skipped(cache: ImageCache, manifest: Any, skip_corrupt: bool) -> ImageCache:
    if cache.skipped:
        problems = [f"{img}: {why}" for img, why in cache.skipped]
        if not skip_corrupt:
            where = manifest.path or manifest.root
            raise BadInput(
                f"{where}: {len(problems)} image(s) cannot be read (pass skip_corrupt / --skip-corrupt to leave "
                "them out)",
                problems,
            )
        log.warning(
            "%d unreadable image(s) skipped:\n%s", len(problems), "\n".join(f"  - {p}" for p in problems)
        )
    return cache


def build_cache(
    manifest: Any,
    task: Any,
    size: int | str | None = None,
    cache_dir: Path | None = None,
    skip_corrupt: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> ImageCache:
    """Decode every manifest image once into an on-disk cache and return it; a later call with the same manifest,
    image files and spec reads the cache without decoding anything.

    With `skip_corrupt=False` any unreadable image raises BadInput listing every one (and no cache entry is kept
    in use); with True they are left out of the cache and listed in `.skipped`.
    """
    spec = PreprocessSpec.from_task(task, size)
    _check_ids(manifest)
    classes = _mask_classes(task, manifest)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(manifest, spec, classes)
    final = root / key
    hit = _open_existing(final)
    if hit is not None:
        log.debug("image cache hit: %s", final)
        return _check_skipped(hit, manifest, skip_corrupt)

    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    paths = [str(p) for p in manifest.image_paths()]
    case_ids = [str(c) for c in manifest.df["case_id"]]
    images_col = [str(x) for x in manifest.df["image"]]
    n = len(paths)
    c, s = spec.channels, spec.size

    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        arr = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, c, s, s))
        ok = np.zeros(n, dtype=bool)
        reasons: dict[int, str] = {}
        items = list(enumerate(paths))
        nworkers = _default_workers() if workers is None else max(1, int(workers))
        with _progress(progress, n, f"decoding {n} images") as advance:
            # Time a few decodes first: worker processes pay off only when the rest would take a while.
            probe, rest = items[:_PROBE], items[_PROBE:]
            t0 = time.perf_counter()
            for i, img, why in _decode_serial(probe, spec):
                _store(arr, ok, reasons, i, img, why)
                advance(1)
            per_image = (time.perf_counter() - t0) / max(len(probe), 1)
            # Images inside NPZ stacks are slices of one array read once: workers would each read it again.
            members = any(MEMBER_SEP in p and npz_member(p) is not None for p in paths)
            if rest and nworkers > 1 and not members and per_image * len(rest) > _PARALLEL_MIN_S:
                chunks = [rest[k : k + _CHUNK] for k in range(0, len(rest), _CHUNK)]
                # spawn, not fork: forking a process that runs threads (torch, a progress bar) can deadlock.
                ctx = multiprocessing.get_context("spawn")
                with cf.ProcessPoolExecutor(nworkers, mp_context=ctx) as pool:
                    futures = [pool.submit(_decode_chunk, ch, spec) for ch in chunks]
                    for fut in cf.as_completed(futures):
                        results = fut.result()
                        for i, img, why in results:
                            _store(arr, ok, reasons, i, img, why)
                        advance(len(results))
            else:
                for i, img, why in _decode_serial(rest, spec):
                    _store(arr, ok, reasons, i, img, why)
                    advance(1)
        masks = None
        if classes is not None:
            masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, s, s))
            _decode_masks(manifest, spec, classes, masks, ok, reasons)
        skipped = [(images_col[i], reasons[i]) for i in sorted(reasons)]
        if skipped and not skip_corrupt:
            where = manifest.path or manifest.root
            raise BadInput(
                f"{where}: {len(skipped)} image(s) cannot be read (pass skip_corrupt / --skip-corrupt to leave "
                "them out)",
                [f"{img}: {why}" for img, why in skipped],
            )
        if skipped:
            keep = np.flatnonzero(ok)
            arr.flush()
            del arr
            full = np.load(tmp / "images.npy", mmap_mode="r")
            packed = np.lib.format.open_memmap(
                tmp / "images.packed.npy", mode="w+", dtype=np.uint8, shape=(len(keep), c, s, s)
            )
            for k in range(0, len(keep), 1024):
                packed[k : k + 1024] = full[keep[k : k + 1024]]
            packed.flush()
            del packed, full
            os.replace(tmp / "images.packed.npy", tmp / "images.npy")
            if masks is not None:
                masks.flush()
                kept_masks = np.ascontiguousarray(masks[keep])
                del masks
                np.save(tmp / "masks.npy", kept_masks)
            kept_ids = [case_ids[i] for i in keep]
        else:
            arr.flush()
            del arr
            if masks is not None:
                masks.flush()
                del masks
            kept_ids = case_ids
        index = {
            "format": FORMAT_VERSION,
            "key": key,
            "manifest_sha256": manifest.sha256,
            "spec": asdict(spec),
            "n": len(kept_ids),
            "case_ids": kept_ids,
            "skipped": skipped,
            **({"mask_classes": classes} if classes is not None else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # index.json is written last: a folder holding it is complete.
        (tmp / "index.json").write_text(json.dumps(index) + "\n", encoding="utf-8")
        try:
            if final.exists():  # a damaged entry found above
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError:
            # Another builder renamed its (identical) cache into place first: use theirs.
            if _open_existing(final) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    cache = ImageCache(final)
    log.info("image cache written: %s (%d images, %d skipped)", final, len(cache), len(cache.skipped))
    return _check_skipped(cache, manifest, skip_corrupt)


def _check_ids(manifest: Any) -> None:
    where = manifest.path or manifest.root
    df = manifest.df
    missing = [c for c in ("case_id", "image") if c not in df.columns]
    if missing:
        raise BadInput(f"{where}: the manifest has no {' / '.join(missing)} column")
    ids = df["case_id"].astype(str)
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        raise BadInput(f"{where}: duplicate case_id(s) {sorted(set(dup))[:10]} (rows {list(dup.index[:20])})")


def _store(arr, ok, reasons, i: int, img: np.ndarray | None, why: str) -> None:
    if img is None:
        reasons[i] = why
    else:
        arr[i] = img
        ok[i] = True


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str):
    if not enabled or total == 0:
        yield lambda k: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        t = bar.add_task(label, total=total)
        yield lambda k: bar.advance(t, k)
