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

A segmentation task's masks (DICOM SEG or label-map files, `bench.imaging.masks`) are read as uint8 label maps in
their image's pixel grid and go through the same crop and resize, with nearest-neighbour sampling; the cache keeps
them beside the images (`masks.npy`) and its key then covers every mask file.

The cache is keyed by the manifest's content hash, its image folder, each image file's size and mtime, the
preprocessing spec and a format version. It holds pixels and the manifest's case ids only: no DICOM header value
is ever written.
"""

from bench.imaging.cache import (
    FORMAT_VERSION,
    ImageCache,
    UnknownCase,
    build_cache,
    cache_key,
    default_cache_dir,
)
from bench.imaging.decode import (
    FORMATS,
    MEMBER_SEP,
    PreprocessSpec,
    Unreadable,
    _read_raw,
    _sniff,
    check_readable,
    load_image,
    member_path,
    minmax,
    npz_member,
    quantize,
    read_dicom_hu,
    window,
)
from bench.imaging.loader import CachedLoader
from bench.imaging.masks import (
    SEG_SOP_CLASSES,
    SegFile,
    SegHeader,
    class_key,
    geometry_problem,
    image_geometry,
    load_mask,
    mask_areas,
    preprocess_mask,
    read_mask,
    read_seg,
    read_seg_header,
    seg_label_maps,
    segment_values,
)

__all__ = [
    "FORMATS",
    "SEG_SOP_CLASSES",
    "SegFile",
    "SegHeader",
    "class_key",
    "geometry_problem",
    "image_geometry",
    "load_mask",
    "mask_areas",
    "preprocess_mask",
    "read_mask",
    "read_seg",
    "read_seg_header",
    "seg_label_maps",
    "segment_values",
    "FORMAT_VERSION",
    "MEMBER_SEP",
    "CachedLoader",
    "ImageCache",
    "PreprocessSpec",
    "UnknownCase",
    "Unreadable",
    "_read_raw",
    "_sniff",
    "build_cache",
    "cache_key",
    "check_readable",
    "default_cache_dir",
    "load_image",
    "member_path",
    "minmax",
    "npz_member",
    "quantize",
    "read_dicom_hu",
    "window",
]
