"""Segmentation masks: reading a DICOM SEG (or a label-map PNG / NPZ) as the label map of one image, preprocessed
exactly like that image.

A label map is a 2-D uint8 array in the image's own pixel grid: 0 is background, k the k-th of the task's mask
classes (`masks.classes`, 1-based). Masks come in two forms:

- **DICOM SEG** (what annotation tools such as 3D Slicer and OHIF export): one multi-frame object per series, each
  frame referencing its source image by SOP Instance UID and stating its plane position. A segment is matched to a
  mask class by its SegmentLabel (case, spaces and hyphens ignored). An image the SEG references but has no frame
  for has an empty mask. Segments of different classes may not overlap: a label map has one class per pixel.
  BINARY, FRACTIONAL (at least half the maximum counts) and LABELMAP SEGs are read through highdicom.
- **A label map file** (PNG, NPY, or NPZ with the array under `mask` or its only array): integer values 0..K in
  the image's pixel grid, the form a generator writes beside its images.

`load_mask` applies the image's preprocessing to the label map: the same `crop_mm` centre crop (from the image's
pixel spacing) and the same resize, with nearest-neighbour sampling (Pillow samples both filters at the same pixel
centres), so that pixel (i, j) of the preprocessed image and of its mask show the same tissue.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BadInput
from bench.imaging.decode import (
    PreprocessSpec,
    Unreadable,
    _pixel_spacing,
    _read_raw,
    _sniff,
    crop_window,
)

log = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_SOP_CLASSES = frozenset({SEG_STORAGE, LABELMAP_SEG_STORAGE})
# Geometry tolerances: exporters round positions and spacings to a few decimals.
_POS_TOL_MM = 0.05
_REL_TOL = 1e-3
_SEGS_KEPT = 8  # decoded SEG files kept per process: a series' slices are read one after another


def class_key(name: Any) -> str:
    """How a segment label is compared with a class name: case, spaces and hyphens do not matter."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


@dataclass
class SegHeader:
    """What a SEG says without its pixels: references, geometry and segments."""

    path: Path
    frame_of_reference: str
    rows: int
    columns: int
    spacing: tuple[float, float] | None
    orientation: tuple[float, ...] | None
    referenced: list[str] = field(default_factory=list)  # every source SOP Instance UID, in order
    positions: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # of each source's frame
    segments: dict[int, str] = field(default_factory=dict)  # segment number -> SegmentLabel


def _floats(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    seq = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        return tuple(float(v) for v in seq)
    except (TypeError, ValueError):
        return None


def read_seg_header(path: str | Path) -> SegHeader:
    """The SEG's references, geometry and segments (headers only). Raises Unreadable."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise Unreadable(f"not a readable DICOM file: {type(e).__name__}: {e}") from e
    return _header(ds, path)


def _header(ds: Any, path: Path) -> SegHeader:
    if str(ds.get("SOPClassUID", "")) not in SEG_SOP_CLASSES:
        raise Unreadable("not a DICOM Segmentation (SOP Class UID)")
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    measures = shared.get("PixelMeasuresSequence", [None])[0] if shared is not None else None
    plane = shared.get("PlaneOrientationSequence", [None])[0] if shared is not None else None
    spacing = _floats(measures.get("PixelSpacing")) if measures is not None else None
    orientation = _floats(plane.get("ImageOrientationPatient")) if plane is not None else None
    head = SegHeader(
        path=path,
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "") or ""),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        spacing=(spacing[0], spacing[1]) if spacing and len(spacing) == 2 else None,
        orientation=orientation,
    )
    for series in ds.get("ReferencedSeriesSequence", []):
        for inst in series.get("ReferencedInstanceSequence", []):
            uid = str(inst.get("ReferencedSOPInstanceUID", ""))
            if uid and uid not in head.referenced:
                head.referenced.append(uid)
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        pos = None
        for pp in frame.get("PlanePositionSequence", []):
            pos = _floats(pp.get("ImagePositionPatient"))
        if frame.get("PixelMeasuresSequence"):
            own = _floats(frame.PixelMeasuresSequence[0].get("PixelSpacing"))
            if own and len(own) == 2:
                head.spacing = (own[0], own[1])
        if frame.get("PlaneOrientationSequence"):
            head.orientation = _floats(frame.PlaneOrientationSequence[0].get("ImageOrientationPatient"))
        for der in frame.get("DerivationImageSequence", []):
            for src in der.get("SourceImageSequence", []):
                uid = str(src.get("ReferencedSOPInstanceUID", ""))
                if not uid:
                    continue
                if uid not in head.referenced:
                    head.referenced.append(uid)
                if pos is not None and len(pos) == 3:
                    head.positions.setdefault(uid, (pos[0], pos[1], pos[2]))
    for seg in ds.get("SegmentSequence", []):
        head.segments[int(seg.SegmentNumber)] = str(seg.get("SegmentLabel", "") or "")
    return head


def segment_values(head: SegHeader, classes: list[str]) -> tuple[dict[int, int], list[str]]:
    """Each segment's label-map value (1-based index of its class) and, for segments whose label names no mask
    class, the problem."""
    keys = {class_key(c): k + 1 for k, c in enumerate(classes)}
    values, problems = {}, []
    for number, label in sorted(head.segments.items()):
        if number == 0:  # a LABELMAP SEG's background segment
            continue
        v = keys.get(class_key(label))
        if v is None:
            problems.append(
                f"segment {number} is labelled {label!r}, which is not one of the task's mask classes {classes}"
            )
        else:
            values[number] = v
    if not set(head.segments) - {0}:
        problems.append("the SEG defines no segment")
    return values, problems


def image_geometry(path: str | Path) -> dict[str, Any]:
    """The DICOM header fields a mask is aligned against (no pixels read)."""
    import pydicom

    ds = pydicom.dcmread(
        path,
        stop_before_pixels=True,
        specific_tags=[
            "SOPInstanceUID",
            "FrameOfReferenceUID",
            "Rows",
            "Columns",
            "PixelSpacing",
            "ImageOrientationPatient",
            "ImagePositionPatient",
            "SamplesPerPixel",
        ],
    )
    try:
        spacing, spacing_error = _pixel_spacing(ds.get("PixelSpacing", None), "PixelSpacing (0028,0030)")
    except Exception as e:  # noqa: BLE001 - a malformed DS matters only to a crop, as for the image itself
        spacing, spacing_error = None, f"PixelSpacing (0028,0030) cannot be read ({e})"
    return {
        "samples": int(ds.get("SamplesPerPixel", 1) or 1),
        "grid_spacing": spacing,
        "spacing_error": spacing_error,
        "uid": str(ds.get("SOPInstanceUID", "") or ""),
        "frame_of_reference": str(ds.get("FrameOfReferenceUID", "") or ""),
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
        "spacing": _floats(ds.get("PixelSpacing")),
        "orientation": _floats(ds.get("ImageOrientationPatient")),
        "position": _floats(ds.get("ImagePositionPatient")),
    }


def geometry_problem(head: SegHeader, image: dict[str, Any]) -> str | None:
    """Why the SEG's frame for this image does not lie on the image's pixels (None if it does)."""
    if (head.rows, head.columns) != (image["rows"], image["columns"]):
        return f"mask is {head.rows}x{head.columns} pixels, image {image['rows']}x{image['columns']}"
    if (
        head.frame_of_reference
        and image["frame_of_reference"]
        and head.frame_of_reference != image["frame_of_reference"]
    ):
        return "mask and image have different FrameOfReferenceUIDs"
    if (
        head.spacing
        and image["spacing"]
        and not np.allclose(head.spacing, image["spacing"][:2], rtol=_REL_TOL)
    ):
        return f"mask pixel spacing {list(head.spacing)} mm differs from the image's {list(image['spacing'])}"
    if (
        head.orientation
        and image["orientation"]
        and not np.allclose(head.orientation, image["orientation"], atol=_REL_TOL)
    ):
        return (
            f"mask orientation {list(head.orientation)} differs from the image's {list(image['orientation'])}"
        )
    pos = head.positions.get(image["uid"])
    if pos is not None and image["position"] and not np.allclose(pos, image["position"], atol=_POS_TOL_MM):
        return f"mask frame position {list(pos)} mm differs from the image's {list(image['position'])}"
    return None


@dataclass
class SegFile:
    """A decoded SEG: its header, and its label maps by source SOP Instance UID or why there are none."""

    head: SegHeader
    maps: dict[str, np.ndarray] | None
    error: str | None


_segs: OrderedDict[tuple[str, int, int, tuple[str, ...]], SegFile] = OrderedDict()
_segs_lock = threading.Lock()


def read_seg(path: str | Path, classes: list[str]) -> SegFile:
    """The SEG decoded once per process (the last few are kept: a series' slices are read one after another)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, tuple(classes))
    with _segs_lock:
        if key in _segs:
            _segs.move_to_end(key)
            return _segs[key]
    entry = _decode_seg(path, classes)
    with _segs_lock:
        _segs[key] = entry
        while len(_segs) > _SEGS_KEPT:
            _segs.popitem(last=False)
    return entry


def seg_label_maps(path: str | Path, classes: list[str]) -> dict[str, np.ndarray]:
    """Every referenced image's label map in a SEG (uint8 [rows, columns], by source SOP Instance UID). Raises
    Unreadable for segments naming no class and for overlapping segments of different classes."""
    entry = read_seg(Path(path), classes)
    if entry.maps is None:
        raise Unreadable(entry.error or "SEG cannot be used")
    return entry.maps


def _decode_seg(path: Path, classes: list[str]) -> SegFile:
    import highdicom as hd
    import pydicom

    logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise Unreadable(f"not a readable DICOM file: {type(e).__name__}: {e}") from e
    head = _header(ds, path)
    values, problems = segment_values(head, classes)
    if problems:
        return SegFile(head, None, "; ".join(problems))
    try:
        # The dataset already parsed, handed over rather than read a second time.
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        numbers = sorted(values)
        uids = list(head.referenced)
        # [images, rows, columns, segments]; a referenced image without a frame reads as empty.
        arr = seg.get_pixels_by_source_instance(
            uids, segment_numbers=numbers, combine_segments=False, rescale_fractional=True
        )
    except Exception as e:  # noqa: BLE001 - highdicom raises many types; all mean "this SEG cannot be used"
        return SegFile(head, None, f"SEG pixel data cannot be read: {type(e).__name__}: {e}")
    on = np.asarray(arr) >= 0.5
    lut = np.array([values[n] for n in numbers], dtype=np.uint8)
    out: dict[str, np.ndarray] = {}
    for i, uid in enumerate(uids):
        frame = on[i]
        label = np.zeros(frame.shape[:2], dtype=np.uint8)
        for j, v in enumerate(lut):
            m = frame[..., j]
            clash = m & (label > 0) & (label != v)
            if clash.any():
                return SegFile(
                    head,
                    None,
                    f"segments of different classes overlap ({int(clash.sum())} pixel(s) of one frame); a label "
                    "map has one class per pixel",
                )
            label[m] = v
        out[uid] = label
    return SegFile(head, out, None)


def _label_map_file(path: Path, kind: str, n_classes: int) -> np.ndarray:
    if kind == "png":
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise Unreadable(f"a label-map PNG must be single-channel, got mode {im.mode}")
            arr = np.asarray(im)
    elif kind in ("npz", "npy"):
        try:
            with np.load(path, allow_pickle=False) as z:
                if isinstance(z, np.ndarray):
                    arr = z
                else:
                    keys = list(z.keys())
                    name = "mask" if "mask" in keys else keys[0] if len(keys) == 1 else None
                    if name is None:
                        raise Unreadable(f"NPZ with arrays {keys}: expected one named 'mask'")
                    arr = z[name]
        except Unreadable:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            raise Unreadable(f"cannot be read as a numpy array: {e}") from e
    else:
        raise Unreadable(f"a mask must be a DICOM SEG, PNG, NPY or NPZ label map (found {kind})")
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise Unreadable(f"a label map must be 2-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iub":
        raise Unreadable(f"a label map must hold integers, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > n_classes):
        bad = sorted(int(v) for v in np.unique(arr) if v < 0 or v > n_classes)
        raise Unreadable(
            f"label values {bad[:10]} outside 0..{n_classes} (0 = background, k = the k-th mask class)"
        )
    return arr.astype(np.uint8)


@dataclass
class Grid:
    """What a mask's preprocessing needs of its image: pixel grid, spacing, and whether it is in modality units
    (only those are cropped)."""

    shape: tuple[int, int]
    hu: bool
    spacing: tuple[float, float] | None
    spacing_error: str | None = None


def read_mask(image: str | Path, mask: str | Path | None, classes: list[str]) -> tuple[np.ndarray, Grid]:
    """The label map of `image` in its own pixel grid, and the image's grid (for its preprocessing). `mask` None:
    an empty label map. Raises Unreadable for a mask that is unreadable, misaligned, or names classes the task does
    not have. A DICOM image's grid comes from its header; other images are decoded."""
    image = Path(image)
    geo = None
    if _sniff(image) == "dicom":
        geo = image_geometry(image)
        # As the image reader: a grayscale DICOM image is in modality units, a colour one a display image.
        shape = (geo["rows"], geo["columns"])
        grid = Grid(shape, geo["samples"] == 1, geo["grid_spacing"], geo["spacing_error"])
    else:
        raw = _read_raw(image)
        shape = raw.array.shape[:2]
        grid = Grid((shape[0], shape[1]), raw.hu, raw.spacing, raw.spacing_error)
    if mask is None:
        return np.zeros(shape, dtype=np.uint8), grid
    mask = Path(mask)
    kind = _sniff(mask)
    if kind == "dicom":
        if geo is None:
            raise Unreadable("a DICOM SEG mask needs a DICOM image to reference")
        entry = read_seg(mask, classes)
        head = entry.head
        if geo["uid"] not in head.referenced:
            raise Unreadable("the SEG does not reference this image (its SOP Instance UID)")
        problem = geometry_problem(head, geo)
        if problem:
            raise Unreadable(problem)
        if entry.maps is None:
            raise Unreadable(entry.error or "SEG cannot be used")
        label = entry.maps[geo["uid"]]
    else:
        label = _label_map_file(mask, kind, len(classes))
    if label.shape != shape:
        raise Unreadable(f"mask is {label.shape[0]}x{label.shape[1]} pixels, image {shape[0]}x{shape[1]}")
    return label, grid


def preprocess_mask(label: np.ndarray, grid: Grid, spec: PreprocessSpec) -> np.ndarray:
    """A label map through its image's crop and resize (nearest neighbour): uint8 [S, S]."""
    from PIL import Image

    if spec.crop_mm is not None and grid.hu:
        if grid.spacing_error:
            raise Unreadable(f"the task crops {spec.crop_mm:g} mm, but {grid.spacing_error}")
        if grid.spacing is None:
            raise Unreadable(f"the task crops {spec.crop_mm:g} mm, but the image has no pixel spacing")
        rows, cols = crop_window(label.shape, grid.spacing, spec.crop_mm)
        label = label[rows, cols]
    if label.shape != (spec.size, spec.size):
        im = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L")
        label = np.asarray(im.resize((spec.size, spec.size), Image.Resampling.NEAREST), dtype=np.uint8)
    return np.ascontiguousarray(label, dtype=np.uint8)


def load_mask(
    image: str | Path, mask: str | Path | None, spec: PreprocessSpec, classes: list[str]
) -> np.ndarray:
    """The label map of a manifest row, preprocessed like its image: uint8 [S, S]. Raises BadInput naming the
    mask (or the image) if it cannot be used."""
    try:
        label, grid = read_mask(image, mask, classes)
        return preprocess_mask(label, grid, spec)
    except Unreadable as e:
        raise BadInput(f"{mask if mask is not None else image}: {e}") from e


def mask_areas(label: np.ndarray, n_classes: int) -> np.ndarray:
    """Pixels of each mask class (index k-1 for value k)."""
    return np.bincount(np.asarray(label, dtype=np.uint8).ravel(), minlength=n_classes + 1)[1 : n_classes + 1]
