"""Image ingestion: DICOM / PNG / JPEG / NPZ readers and the on-disk cache every epoch reads from.

Intensity rules (what becomes [0, 1] before quantizing to uint8):

- DICOM grayscale: stored values go through the modality transform (RescaleSlope/RescaleIntercept, defaults 1/0,
  or a Modality LUT) to Hounsfield units (or the modality's own units). `ct_window` clips to
  [center - width/2, center + width/2] and maps linearly to [0, 1]; `minmax` stretches each image; `uint8` divides
  8-bit data by 255 and stretches deeper data.
- MONOCHROME1: Hounsfield units are physical, so `read_dicom_hu` never inverts them. The photometric interpretation
  only says how values *display* (the minimum is white), so, as a DICOM viewer does after the VOI (window) step, the
  [0, 1] display image is inverted (1 - x). A MONOCHROME1 radiograph therefore looks like its MONOCHROME2 twin.
- PNG / JPEG / colour DICOM / uint8 arrays are display images: divided by 255 (16-bit ones by 65535), whatever the
  task's kind, because a generator or a scanner already windowed them; only `minmax` restretches them.
- NPZ: the array under key `image` (or the file's only array). `units="HU"` in the file, or an int16 array, means
  Hounsfield units (handled like DICOM); a float array within [0, 1] is used as is; other floats are stretched.
- One image inside an NPZ stack (MedMNIST and similar releases keep every image of a split in one array): the path
  `FILE.npz#NAME/INDEX` names image INDEX of array `NAME_images` (or of array `NAME` itself). The stack is read
  once per process and kept (the last few stacks, keyed by file, size and mtime); each image is then a slice,
  handled like a single NPZ array.

A task with `image.crop_mm` keeps a centred square of that many millimetres of the patient before resizing: the
pixel spacing (DICOM PixelSpacing, row then column; an NPZ's `spacing` array) says how many pixels that is, and an
image in modality units without one is refused under such a task. A field of view smaller than the crop is used
whole. Display images (PNG / JPEG, 8-bit arrays) are not cropped: they are what a generator wrote at the task's
field of view.

Images are resized to S x S with an antialiased bilinear filter (aspect ratio is not kept) and quantized to uint8.

The cache is keyed by the manifest's content hash, its image folder, each image file's size and mtime, the
preprocessing spec and a format version. It holds pixels and the manifest's case ids only: no DICOM header value
is ever written.
"""

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
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BadInput

log = logging.getLogger(__name__)

# Bump whenever a change here could change a cached pixel.
FORMAT_VERSION = 1
FORMATS = "DICOM/PNG/JPEG/NPZ"
_PROBE = 16  # images decoded before deciding whether worker processes pay off
_PARALLEL_MIN_S = 3.0  # estimated serial seconds above which they do (a worker starts in about a second)
_CHUNK = 64
_STALE_TMP_S = 24 * 3600

# What to install for each compressed transfer syntax pydicom cannot decode on its own.
_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg"
_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg"
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG,  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _LIBJPEG,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _LIBJPEG,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",  # RLE (pydicom decodes it natively too)
}


class Unreadable(Exception):
    """Why one image cannot be used (a short reason without the path; callers add it)."""


MEMBER_SEP = "#"
_STACKS_KEPT = 2  # whole NPZ arrays kept in memory; MedMNIST+ 224 px stacks are about 1 GB each
_stacks: OrderedDict[tuple[str, str, int, int], np.ndarray] = OrderedDict()
_stacks_lock = threading.Lock()


def npz_member(path: str | Path) -> tuple[Path, str, int] | None:
    """(npz file, array name, index) if `path` names one image inside an NPZ stack (`FILE.npz#NAME/INDEX`), else
    None. A file that really exists under that name is a file, not a member."""
    s = str(path)
    if MEMBER_SEP not in s:
        return None
    head, _, tail = s.rpartition(MEMBER_SEP)
    name, sep, idx = tail.partition("/")
    if not head.lower().endswith(".npz") or not sep or not name or not idx.isdigit():
        return None
    if Path(s).exists():
        return None
    return Path(head), name, int(idx)


def member_path(npz: str | Path, name: str, index: int) -> str:
    """The image path of image `index` of array `<name>_images` (or `name`) in `npz`."""
    return f"{npz}{MEMBER_SEP}{name}/{int(index)}"


def _stack(file: Path, name: str) -> np.ndarray:
    try:
        st = file.stat()
    except OSError as e:
        raise Unreadable(f"NPZ file {file} not found") from e
    if not file.is_file():
        raise Unreadable(f"{file} is not a file")
    key = (str(file.resolve()), name, st.st_size, st.st_mtime_ns)
    with _stacks_lock:
        if key in _stacks:
            _stacks.move_to_end(key)
            return _stacks[key]
    try:
        with np.load(file, allow_pickle=False) as z:
            keys = list(z.files)
            for k in (f"{name}_images", name):
                if k in keys:
                    arr = np.asarray(z[k])
                    break
            else:
                raise Unreadable(f"NPZ file {file} holds no array {name + '_images'!r} (arrays: {keys})")
    except Unreadable:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise Unreadable(f"corrupt NPZ file {file}: {e}") from e
    with _stacks_lock:
        _stacks[key] = arr
        while len(_stacks) > _STACKS_KEPT:
            _stacks.popitem(last=False)
    return arr


def _read_member(file: Path, name: str, index: int) -> _Raw:
    arr = _stack(file, name)
    if arr.ndim < 3:
        raise Unreadable(f"array {name!r} of {file} has shape {arr.shape}, not a stack of images")
    if index >= len(arr):
        raise Unreadable(f"index {index} out of range: array {name!r} of {file} holds {len(arr)} images")
    return _numpy_raw(arr[index], None)


# --------------------------------------------------------------------------------------------------------------
# The preprocessing spec


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that decides a cached pixel: side, channels and the intensity mapping."""

    size: int
    channels: int = 1
    intensity: str = "uint8"  # ct_window | minmax | uint8
    center: float | None = None
    width: float | None = None
    crop_mm: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise BadInput(f"image size must be a positive integer, got {self.size!r}")
        if self.crop_mm is not None and not (np.isfinite(self.crop_mm) and self.crop_mm > 0):
            raise BadInput(f"image crop_mm must be a positive number of millimetres, got {self.crop_mm!r}")
        if self.channels not in (1, 3):
            raise BadInput(f"image channels must be 1 or 3, got {self.channels!r}")
        if self.intensity not in ("ct_window", "minmax", "uint8"):
            raise BadInput(f"image intensity kind must be ct_window, minmax or uint8, got {self.intensity!r}")
        if self.intensity == "ct_window" and (self.center is None or self.width is None or self.width <= 0):
            raise BadInput("ct_window needs a center and a positive width (in HU)")

    @classmethod
    def from_task(cls, task: Any, size: int | str | None = None) -> PreprocessSpec:
        """The task's spec; `size` overrides the side (an int, or the name of one of the task's size presets)."""
        img = task.image
        if size is None:
            side = img.size
        elif isinstance(size, str) and not size.isdigit():
            if size not in img.presets:
                raise BadInput(
                    f"task {task.name!r}: no image size preset {size!r} (presets: {sorted(img.presets)})"
                )
            side = img.presets[size]
        else:
            side = int(size)
        it = img.intensity
        ct = it.kind == "ct_window"
        return cls(
            size=int(side),
            channels=int(img.channels),
            intensity=it.kind,
            center=float(it.center) if ct else None,
            width=float(it.width) if ct else None,
            crop_mm=float(img.crop_mm) if img.crop_mm is not None else None,
        )

    def key(self) -> str:
        """A stable JSON string naming the spec (part of the cache key)."""
        d = asdict(self)
        if d["crop_mm"] is None:
            del d["crop_mm"]  # specs without a crop keep the keys their caches were written under
        return json.dumps({"format": FORMAT_VERSION, **d}, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------------------------
# Raw readers. Each returns (array, meta): array [H, W] or [H, W, C]; meta says how to map it to [0, 1].


@dataclass
class _Raw:
    array: np.ndarray
    hu: bool  # values are in modality units (HU for CT): windowed by ct_window
    invert: bool = False  # MONOCHROME1: minimum displays white
    bits: int | None = None  # for display images: the bit depth their maximum corresponds to
    spacing: tuple[float, float] | None = None  # mm per pixel, rows then columns
    spacing_error: str | None = None  # why a spacing the file states cannot be used (raised only if needed)


def _sniff(path: Path) -> str:
    if npz_member(path) is not None:
        return "npz-member"
    if not path.exists():
        raise Unreadable("file not found")
    if not path.is_file():
        raise Unreadable("not a file")
    with open(path, "rb") as f:
        head = f.read(132)
    if not head:
        raise Unreadable("empty file")
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "npz"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    # DICOM files written without the 128-byte preamble still start with a group 0x0002/0x0008 tag.
    if path.suffix.lower() in (".dcm", ".dicom", "") and head[:2] in (b"\x02\x00", b"\x08\x00"):
        return "dicom"
    raise Unreadable(f"not a {FORMATS} file")


def _read_raw(path: Path) -> _Raw:
    member = npz_member(path)
    if member is not None:
        return _read_member(*member)
    kind = _sniff(path)
    if kind == "dicom":
        return _read_dicom(path)
    if kind in ("png", "jpeg"):
        return _read_pil(path, kind)
    return _read_numpy(path, kind)


def _dicom_dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as f:
            has_preamble = f.read(132)[128:132] == b"DICM"
        ds = pydicom.dcmread(path, force=not has_preamble)
    except InvalidDicomError as e:
        raise Unreadable(f"not a valid DICOM file: {e}") from e
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise Unreadable(f"corrupt DICOM file: {type(e).__name__}: {e}") from e
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise Unreadable("DICOM file without pixel data")
    return ds


def _transfer_syntax(ds):
    meta = getattr(ds, "file_meta", None)
    return getattr(meta, "TransferSyntaxUID", None) if meta is not None else None


def _decode_dicom_pixels(ds) -> np.ndarray:
    ts = _transfer_syntax(ds)
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoders raise many types; all mean "cannot decode this file"
        first = str(e).strip().splitlines()
        detail = " ".join(x.strip() for x in first[:3])[:300]
        if ts is not None and ts.is_compressed:
            hint = _DECODER_HINTS.get(str(ts), "install a DICOM decoder plugin (see pydicom's documentation)")
            if "missing dependencies" in str(e) or "no available" in str(e).lower():
                raise Unreadable(
                    f"compressed transfer syntax {ts} ({ts.name}) needs a decoder: {hint}"
                ) from e
            raise Unreadable(
                f"compressed transfer syntax {ts} ({ts.name}) could not be decoded ({detail}); "
                f"a full decoder may help: {hint}"
            ) from e
        raise Unreadable(f"corrupt DICOM pixel data: {detail}") from e
    return np.asarray(arr)


def _middle_frame(ds, arr: np.ndarray) -> np.ndarray:
    # A multi-frame object (a volume or a cine loop) becomes one 2-D image: its middle frame.
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        log.debug("multi-frame DICOM with %d frames: using frame %d", frames, frames // 2)
        return arr[frames // 2]
    return arr


def _modality_values(ds, arr: np.ndarray) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    slope = 1.0 if slope is None or slope == "" else float(slope)
    intercept = 0.0 if intercept is None or intercept == "" else float(intercept)
    if slope == 1.0 and intercept == 0.0:
        return arr.astype(np.float32)
    return (arr.astype(np.float64) * slope + intercept).astype(np.float32)


def _read_dicom(path: Path) -> _Raw:
    ds = _dicom_dataset(path)
    arr = _middle_frame(ds, _decode_dicom_pixels(ds))
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if samples > 1 or arr.ndim == 3:
        bits = int(getattr(ds, "BitsStored", 8) or 8)
        return _Raw(arr, hu=False, bits=bits)
    if arr.ndim != 2:
        raise Unreadable(f"unexpected DICOM pixel array shape {arr.shape}")
    field = "PixelSpacing (0028,0030)"
    try:
        spacing, problem = _pixel_spacing(ds.get("PixelSpacing", None), field)
    except Exception as e:  # noqa: BLE001 - a strict pydicom raises on a malformed DS; it matters only to a crop
        spacing, problem = None, f"{field} cannot be read ({e})"
    return _Raw(
        _modality_values(ds, arr),
        hu=True,
        invert=photometric == "MONOCHROME1",
        spacing=spacing,
        spacing_error=problem,
    )


def _pixel_spacing(value: Any, field: str) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm from a DICOM PixelSpacing or an NPZ `spacing` array (one value: square
    pixels), or the reason it cannot be used."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    shown = value.tolist() if isinstance(value, np.ndarray) else value
    try:
        vals = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=object)).ravel()]
    except (TypeError, ValueError):
        return None, f"{field} {shown!r} is not numeric"
    if len(vals) == 1:
        vals *= 2
    if len(vals) != 2 or not all(np.isfinite(v) and v > 0 for v in vals):
        return None, f"{field} {shown!r} is not one or two positive numbers of millimetres"
    return (vals[0], vals[1]), None


def _read_pil(path: Path, kind: str) -> _Raw:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
                im = im.convert("RGB")
            elif mode in ("1", "LA"):
                im = im.convert("L")
            elif mode == "RGBA":
                im = im.convert("RGB")
            arr = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for broken files
        raise Unreadable(f"corrupt {kind.upper()} file: {e}") from e
    if arr.dtype == np.uint8:
        return _Raw(arr, hu=False, bits=8)
    if arr.dtype == np.uint16 or mode.startswith("I;16"):
        return _Raw(arr.astype(np.uint16), hu=False, bits=16)
    return _Raw(arr.astype(np.float32), hu=False, bits=None)


def _read_numpy(path: Path, kind: str) -> _Raw:
    units, spacing = None, None
    try:
        if kind == "npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.files)
                if "units" in keys:
                    units = str(z["units"]).strip()
                if "spacing" in keys:
                    spacing = z["spacing"]
                arrays = [k for k in keys if k not in ("units", "spacing")]
                if "image" in keys:
                    arr = z["image"]
                elif len(arrays) == 1:
                    arr = z[arrays[0]]
                else:
                    raise Unreadable(
                        f"NPZ file needs an array named 'image' (or a single array); it holds {keys}"
                    )
    except Unreadable:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise Unreadable(f"corrupt NPZ/NPY file: {e}") from e
    raw = _numpy_raw(arr, units)
    raw.spacing, raw.spacing_error = _pixel_spacing(spacing, "array 'spacing'")
    return raw


def _numpy_raw(arr: np.ndarray, units: str | None) -> _Raw:
    arr = np.asarray(arr)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise Unreadable(f"array of dtype {arr.dtype} is not an image")
    arr = _to_hw_or_hwc(arr)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise Unreadable("array contains NaN or infinite values")
    hu = (units is not None and units.upper() == "HU") or arr.dtype == np.int16
    if hu:
        if arr.ndim != 2:
            raise Unreadable(f"an HU array must be 2-D, got shape {arr.shape}")
        return _Raw(arr.astype(np.float32), hu=True)
    if arr.dtype == np.uint8:
        return _Raw(arr, hu=False, bits=8)
    if arr.dtype == np.uint16:
        return _Raw(arr, hu=False, bits=16)
    is_float = np.issubdtype(arr.dtype, np.floating)
    arr = arr.astype(np.float32)
    if is_float and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        return _Raw(arr, hu=False, bits=0)  # bits=0: already in [0, 1]
    return _Raw(arr, hu=False, bits=None)


def _to_hw_or_hwc(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3:
        # Channels first unless the last axis can only be channels; (3, 4, 4) is an RGB image, not 3 rows of RGBA.
        if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            return arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
        if arr.shape[-1] in (1, 3, 4):
            return arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]
        # A stack of slices: like a multi-frame DICOM, use the middle one.
        return arr[arr.shape[0] // 2]
    raise Unreadable(f"array of shape {arr.shape} is not a 2-D image")


# --------------------------------------------------------------------------------------------------------------
# Public readers


def check_readable(path: Path) -> str | None:
    """None if the image opens and decodes, else a short reason (without the path)."""
    try:
        _read_raw(Path(path))
    except Unreadable as e:
        return str(e)
    return None


def read_dicom_hu(path: str | Path) -> np.ndarray:
    """A grayscale DICOM image in modality units (HU for CT): pixel_array * RescaleSlope + RescaleIntercept.

    float32 [H, W]. Not inverted for MONOCHROME1 (units are physical; see the module notes). Multi-frame objects
    give their middle frame. Raises BadInput naming the file for anything unreadable, including a compressed
    transfer syntax without an installed decoder, or a colour image.
    """
    path = Path(path)
    try:
        if _sniff(path) != "dicom":
            raise Unreadable("not a DICOM file")
        raw = _read_dicom(path)
    except Unreadable as e:
        raise BadInput(f"{path}: {e}") from e
    if not raw.hu:
        raise BadInput(f"{path}: a colour DICOM image has no Hounsfield units")
    return raw.array


def window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Clip to [center - width/2, center + width/2] and map linearly onto [0, 1]."""
    lo = center - width / 2.0
    return np.clip((np.asarray(x, dtype=np.float32) - np.float32(lo)) / np.float32(width), 0.0, 1.0)


def minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) / np.float32(hi - lo)


def _to_unit(raw: _Raw, spec: PreprocessSpec) -> np.ndarray:
    a = raw.array
    if spec.intensity == "minmax":
        out = minmax(a)
    elif raw.hu:
        if spec.intensity == "ct_window":
            out = window(a, spec.center, spec.width)  # type: ignore[arg-type]
        elif a.size and a.min() >= 0 and a.max() <= 255 and np.all(a == np.round(a)):
            out = a.astype(np.float32) / 255.0  # 8-bit data under a `uint8` task
        else:
            out = minmax(a)
    elif raw.bits == 0:
        out = a.astype(np.float32)
    elif raw.bits:
        out = a.astype(np.float32) / np.float32(2**raw.bits - 1)
    else:
        out = minmax(a)
    out = np.clip(out, 0.0, 1.0)
    return 1.0 - out if raw.invert else out


def _to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """[H, W] or [H, W, C] -> [channels, H, W]."""
    if x.ndim == 2:
        x = x[None]
    else:
        x = np.moveaxis(x[..., :3], -1, 0)
        if x.shape[0] == 1:
            pass
        elif channels == 1:
            # ITU-R 601-2 luma, as Pillow's "L" conversion.
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None].astype(np.float32)
    if x.shape[0] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=0)
    return x


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> [C, size, size]; Pillow's bilinear filter widens its support when shrinking,
    so downsampling is antialiased."""
    from PIL import Image

    if x.shape[1] == size and x.shape[2] == size:
        return x
    out = np.empty((x.shape[0], size, size), dtype=np.float32)
    for c in range(x.shape[0]):
        im = Image.fromarray(np.ascontiguousarray(x[c], dtype=np.float32), mode="F")
        out[c] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return out


def quantize(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounding half up."""
    return np.floor(np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _crop(raw: _Raw, crop_mm: float) -> np.ndarray:
    """The centred crop_mm x crop_mm square of an image in modality units."""
    if raw.spacing_error:
        raise Unreadable(f"the task crops {crop_mm:g} mm, but {raw.spacing_error}")
    if raw.spacing is None:
        raise Unreadable(
            f"the task crops {crop_mm:g} mm around the centre, so an image in modality units needs its pixel "
            "spacing (DICOM PixelSpacing, or a 'spacing' array in the NPZ), and this one has none"
        )
    a = raw.array
    out = []
    for axis, mm in enumerate(raw.spacing):
        n = a.shape[axis]
        keep = min(n, max(1, int(round(crop_mm / mm))))
        start = (n - keep) // 2
        out.append(slice(start, start + keep))
    return a[out[0], out[1]]


def _load(path: Path, spec: PreprocessSpec) -> np.ndarray:
    raw = _read_raw(path)
    if spec.crop_mm is not None and raw.hu:
        raw.array = _crop(raw, spec.crop_mm)
    x = _to_channels(_to_unit(raw, spec), spec.channels)
    return quantize(_resize(x, spec.size))


def load_image(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """One image as uint8 [C, S, S] per the spec. Raises BadInput naming the file if it cannot be used."""
    path = Path(path)
    try:
        return _load(path, spec)
    except Unreadable as e:
        raise BadInput(f"{path}: {e}") from e


# --------------------------------------------------------------------------------------------------------------
# The cache


def default_cache_dir() -> Path:
    env = os.environ.get("MEDSYNBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medsynbench"


class ImageCache:
    """A built cache: `images` uint8 [N, C, S, S] (memory-mapped), `case_ids`, `skipped` (image, reason)."""

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


def cache_key(manifest: Any, spec: PreprocessSpec) -> str:
    """sha256 of the manifest's content and image files (path, size, mtime), the spec and the format version."""
    h = hashlib.sha256()
    h.update(f"medsynbench-image-cache\n{FORMAT_VERSION}\n{manifest.sha256}\n{spec.key()}\n".encode())
    for p in manifest.image_paths():
        member = npz_member(p)
        try:
            st = (member[0] if member else p).stat()
            h.update(f"{p}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\x1fmissing\n".encode())
    return h.hexdigest()


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
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(manifest, spec)
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
            kept_ids = [case_ids[i] for i in keep]
        else:
            arr.flush()
            del arr
            kept_ids = case_ids
        index = {
            "format": FORMAT_VERSION,
            "key": key,
            "manifest_sha256": manifest.sha256,
            "spec": asdict(spec),
            "n": len(kept_ids),
            "case_ids": kept_ids,
            "skipped": skipped,
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


# --------------------------------------------------------------------------------------------------------------
# Batches for training


class CachedLoader:
    """Batches of float tensors in [0, 1] from cached uint8 images, for a training or prediction loop.

    The chosen rows are copied into memory once (uint8, a quarter of float32's size); each batch is gathered and
    converted on the fly, so an epoch costs a memory copy, not a decode. On CUDA the uint8 rows are kept on the GPU
    when they fit comfortably (`on_device=None` decides), else each batch travels pinned and asynchronously.
    Shuffling is seeded per epoch (`seed + epoch`), so a run is repeatable.
    """

    def __init__(
        self,
        images: np.ndarray,
        rows: Sequence[int] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: Any = "cpu",
        on_device: bool | None = None,
        channels_last: bool = False,
    ):
        import torch

        rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
        if labels is not None and len(labels) != len(rows):
            raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.batch_size, self.shuffle, self.seed, self.drop_last = (
            int(batch_size),
            shuffle,
            int(seed),
            drop_last,
        )
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.epoch = 0
        data = np.ascontiguousarray(images[np.sort(rows)] if len(rows) else images[:0])
        # `images[sorted rows]` reads the memmap sequentially; map each requested row to its place in that copy.
        order = np.argsort(rows, kind="stable")
        self._pos = np.empty(len(rows), dtype=np.int64)
        self._pos[order] = np.arange(len(rows))
        self._labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        cuda = self.device.type == "cuda"
        if cuda and on_device is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            on_device = data.nbytes < 0.25 * free
        self.on_device = bool(cuda and on_device)
        self._np = data
        self._data = torch.from_numpy(data)
        if self.on_device:
            self._data = self._data.to(self.device)
            if self._labels is not None:
                self._labels = self._labels.to(self.device)
        self._pin = cuda and not self.on_device

    def __len__(self) -> int:
        n = len(self._pos)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def n(self) -> int:
        return len(self._pos)

    def __iter__(self):
        import torch

        n = len(self._pos)
        if self.shuffle:
            perm = np.random.default_rng(self.seed + self.epoch).permutation(n)
        else:
            perm = np.arange(n)
        self.epoch += 1
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for k in range(0, stop, self.batch_size):
            sel = perm[k : k + self.batch_size]
            pos = self._pos[sel]
            if self.device.type == "cpu":
                # numpy, single-threaded: torch's intra-op threads wait on each other at every small op, which
                # costs milliseconds per batch when the cores are busy (the training step is using them).
                x = torch.from_numpy(np.divide(self._np[pos], np.float32(255.0), dtype=np.float32))
                if self.channels_last:
                    x = x.contiguous(memory_format=fmt)
            else:
                if self.on_device:
                    x = self._data.index_select(0, torch.from_numpy(pos).to(self.device))
                else:
                    x = self._data.index_select(0, torch.from_numpy(pos))
                    if self._pin:
                        x = x.pin_memory()
                    x = x.to(self.device, non_blocking=True)
                x = x.to(dtype=torch.float32).div_(255.0).contiguous(memory_format=fmt)
            if self._labels is None:
                yield x
            else:
                y = self._labels.index_select(0, torch.from_numpy(sel).to(self._labels.device))
                yield x, y.to(self.device, non_blocking=True)
