"""Readers: DICOM / PNG / JPEG / NPZ files to one uint8 [C, S, S] image per the preprocessing spec (the rules are
in the package docstring)."""

from __future__ import annotations

import json
import logging
import threading
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BadInput

log = logging.getLogger(__name__)

# Bump whenever a change here could change a cached pixel.
FORMAT_VERSION = 1
FORMATS = "DICOM/PNG/JPEG/NPZ"

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
    rows, cols = crop_window(raw.array.shape, raw.spacing, crop_mm)
    return raw.array[rows, cols]


def crop_window(shape: tuple[int, ...], spacing: tuple[float, float], crop_mm: float) -> tuple[slice, slice]:
    """Rows and columns of the centred crop_mm square of an image of `shape` with `spacing` (mm per pixel, rows
    then columns): what `image.crop_mm` keeps, for the image and, the same pixels, for its mask."""
    out = []
    for axis, mm in enumerate(spacing):
        n = shape[axis]
        keep = min(n, max(1, int(round(crop_mm / mm))))
        start = (n - keep) // 2
        out.append(slice(start, start + keep))
    return out[0], out[1]


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
